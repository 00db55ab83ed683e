"""The coordinator's receipts: once a session that asked for one has ended on the ring,
collect every stage's signed attestation, bind them in an envelope with the coordinator's
own chains, the plan, the timings and the output, and sign it (docs/receipts.md)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import asdict

import grpc

from shard.decode.speculative import DecodeStats
from shard.node.notary import CoordinatorRecord, kind_name
from shard.node.ring import Ring
from shard.wire.ids import ids_sha256
from shard.wire.signing import Signer, digest

log = logging.getLogger(__name__)

FORMAT = "shard-receipt/1"
ENVELOPE = "shard/v1 receipt"
# After the stages attest, results the tail sent may still be on their way in.
RESULTS_WAIT_SECONDS = 5.0


class ReceiptMaker:
    def __init__(self, node_id: str, signer: Signer | None, *, model: dict):
        """`model`: the config and tokenizer hashes and the layer count."""
        self.node_id, self.signer, self.model = node_id, signer, model
        self.node: dict = {}  # describe_node() of the coordinator, set once it joins
        self.rtts: dict[str, float] = {}  # its measured round trips (the membership's, live)

    async def make(self, ring: Ring, session_id: str, record: CoordinatorRecord, *, prompt_ids: list[int],
                   stats: DecodeStats, decoding: dict, private: bool, finish: str) -> str:
        """The signed receipt (JSON) of a session whose END has been sent."""
        stage_ids = list(dict.fromkeys(stage[0] for layout in record.layouts for stage in layout))
        replies = await asyncio.gather(*(ring.attest(node_id, session_id) for node_id in stage_ids),
                                       return_exceptions=True)
        attestations, unattested = [], []
        for node_id, reply in zip(stage_ids, replies):
            if isinstance(reply, BaseException):
                reason = (f"{reply.code().name}: {reply.details()}" if isinstance(reply, grpc.aio.AioRpcError)
                          else str(reply))
                unattested.append({"node_id": node_id, "reason": reason})
                log.warning("session %s: %s did not attest (%s)", session_id, node_id, reason)
                continue
            attestations.append({"statement": json.loads(reply.statement),
                                 "signature": _b64(reply.signature), "certificate": reply.certificate_pem})
        await self._results_in(record, attestations)
        output = stats.output_ids
        envelope = {
            "kind": ENVELOPE, "session_id": session_id, "made_at": time.time(),
            "role": "coordinator", "node_id": self.node_id, "node": self.node,
            "model": self.model, "decoding": decoding,
            "prompt": _ids_record(prompt_ids, private), "output": {**_ids_record(output, private), "finish": finish},
            "stats": _stats(stats),
            "layouts": [[{"node_id": s[0], "layer_start": s[2], "layer_end": s[3]} for s in layout]
                        for layout in record.layouts],
            "rtts": dict(sorted(self.rtts.items())),
            "sent": {peer: c.summary(kind_name) for peer, c in sorted(record.sent.items())},
            "received": {peer: c.summary(kind_name) for peer, c in sorted(record.received.items())},
            "unclaimed_results": record.unclaimed,
            "attestations": [{"node_id": a["statement"]["node_id"], "sha256": digest(a["statement"])}
                             for a in attestations],
            "unattested": unattested,
        }
        if record.transcript:
            envelope["transcript"] = {"sent": record.sent_frames, "received": record.received_frames}
        return json.dumps({"format": FORMAT, "envelope": self.signer.signed(envelope), "attestations": attestations})

    async def _results_in(self, record: CoordinatorRecord, attestations: list[dict]) -> None:
        """Wait (briefly) until every frame the stages say they sent to the coordinator is in."""
        expected = {a["statement"]["node_id"]: a["statement"]["sent"][self.node_id]["count"]
                    for a in attestations if self.node_id in a["statement"].get("sent", {})}
        deadline = time.monotonic() + RESULTS_WAIT_SECONDS
        while any(record.received_from(node) < count for node, count in expected.items()):
            if time.monotonic() > deadline:
                return  # the verifier will name the edge whose chains differ
            await asyncio.sleep(0.01)


def _ids_record(ids: list[int], private: bool) -> dict:
    record = {"tokens": len(ids), "sha256": ids_sha256(ids)}
    if not private:
        record["ids"] = list(ids)
    return record


def _stats(stats: DecodeStats) -> dict:
    fields = {k: v for k, v in asdict(stats).items() if k != "output_ids" and k != "finish"}
    tokens = len(stats.output_ids)
    fields.update(tokens=tokens, tokens_per_second=tokens / stats.seconds if stats.seconds else 0.0,
                  acceptance_rate=stats.acceptance_rate, tokens_per_traversal=stats.tokens_per_traversal)
    return fields


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
