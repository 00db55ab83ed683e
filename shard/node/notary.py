"""What a node keeps for the receipts of its sessions: per session that asked for one (its
frames carry the `receipt` flag), a hash chain per peer and direction over the session's
frames (shard.wire.chain), recorded in plaintext as the node sees them.

A stage signs an attestation once the session's END frame has passed through it (so that
no frame of the session is still on its way), and forgets the session. The coordinator's
side (CoordinatorNotary) also keeps a transcript of the frames it sent and received, so
that a verifier can recompute its chains and check the output against what the tail
returned."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc

from shard.errors import ShardError
from shard.v1 import frame_pb2
from shard.wire.chain import Chain, header_entry
from shard.wire.signing import Signer

K = frame_pb2
ATTESTATION = "shard/v1 stage attestation"
# Chains of sessions whose END never comes (a coordinator that died) are dropped oldest
# first beyond this many, or once idle as long as a stage keeps an idle session's KV; each
# costs a few hundred bytes plus a digest per frame.
SESSIONS_KEPT = 1024
ATTEST_WAIT_SECONDS = 10.0
# A session whose END passed and that nobody asked to attest (its generation failed) is
# dropped this long after its END.
UNCLAIMED_SECONDS = 60.0
_COMPUTED = (K.FRAME_KIND_FORWARD, K.FRAME_KIND_REPLAY)


def kind_name(kind: int) -> str:
    return K.FrameKind.Name(kind).removeprefix("FRAME_KIND_")


def describe_node(capabilities) -> dict:
    """The node as its own attestation states it (from its registry capabilities)."""
    return {"device_name": capabilities.device_name, "device_id": capabilities.device_id,
            "region": capabilities.region, "trust": capabilities.trust}


@dataclass
class _Session:
    received: dict[str, Chain] = field(default_factory=dict)
    sent: dict[str, Chain] = field(default_factory=dict)
    received_chunks: set[int] = field(default_factory=set)  # FORWARD / REPLAY chunk ids taken in
    sent_chunks: set[int] = field(default_factory=set)
    end_in: asyncio.Event = field(default_factory=asyncio.Event)  # END accepted
    end_out: asyncio.Event = field(default_factory=asyncio.Event)  # END passed on (or, at the tail, done)
    last_seen: float = field(default_factory=time.monotonic)


class StageNotary:
    """A stage's chains for the sessions that asked for a receipt, and its attestations."""

    def __init__(self, node_id: str, signer: Signer | None):
        self.node_id, self._signer = node_id, signer
        self.node: dict = {}  # describe_node() of this stage, set once it joins
        self.rtts: dict[str, float] = {}  # measured round trips to peers (the membership's, live)
        self.block: dict | None = None  # the loaded block and its weight hash
        self.model_config_sha256 = ""
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session()
            while len(self._sessions) > SESSIONS_KEPT:
                self._sessions.popitem(last=False)
        return session

    def received(self, header: frame_pb2.FrameHeader, payload: bytes) -> None:
        """An opened frame from upstream (header.sender)."""
        if not header.receipt:
            return
        session = self._session(header.session_id)
        session.last_seen = time.monotonic()
        session.received.setdefault(header.sender, Chain()).add(header_entry(header, payload), header.kind)
        if header.kind in _COMPUTED:
            session.received_chunks.add(header.chunk_id)
        elif header.kind == K.FRAME_KIND_END:
            session.end_in.set()

    def sent(self, receiver: str, frame: frame_pb2.Frame) -> None:
        """A frame handed to the edge to `receiver`, in plaintext."""
        header = frame.header
        if not header.receipt:
            return
        session = self._session(header.session_id)
        session.sent.setdefault(receiver, Chain()).add(header_entry(header, frame.payload), header.kind)
        if header.kind == K.FRAME_KIND_END:
            session.end_out.set()
        else:
            session.sent_chunks.add(header.chunk_id)

    def expire(self, idle_seconds: float) -> None:
        """Drop the chains of sessions idle that long, or ended and not attested for a while."""
        now = time.monotonic()
        for session_id, session in list(self._sessions.items()):
            ended = session.end_in.is_set() and session.end_out.is_set()
            if now - session.last_seen > (min(idle_seconds, UNCLAIMED_SECONDS) if ended else idle_seconds):
                del self._sessions[session_id]

    def ended(self, session_id: str) -> None:
        """The tail is through with the session's END (it sends nothing on for it)."""
        session = self._sessions.get(session_id)
        if session is not None:
            session.end_out.set()

    async def attest(self, session_id: str, wait_seconds: float = ATTEST_WAIT_SECONDS) -> dict:
        """The signed attestation of the session, once its END has passed; forgets it."""
        if self._signer is None:
            raise ShardError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{self.node_id} has no node key (--insecure): it cannot sign receipts")
        session = self._sessions.get(session_id)
        if session is None:
            raise ShardError(grpc.StatusCode.NOT_FOUND, f"{self.node_id} keeps no receipt chains for {session_id!r}")
        try:
            await asyncio.wait_for(asyncio.gather(session.end_in.wait(), session.end_out.wait()), wait_seconds)
        except asyncio.TimeoutError:
            raise ShardError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"the END of session {session_id!r} did not pass {self.node_id} within "
                             f"{wait_seconds:.0f} s") from None
        self._sessions.pop(session_id, None)
        statement = {
            "kind": ATTESTATION, "session_id": session_id, "role": "stage", "node_id": self.node_id,
            "node": self.node, "block": self.block, "model_config_sha256": self.model_config_sha256,
            "rtts": dict(sorted(self.rtts.items())),
            "received": {peer: c.summary(kind_name) for peer, c in sorted(session.received.items())},
            "sent": {peer: c.summary(kind_name) for peer, c in sorted(session.sent.items())},
            # Chunks taken in and never passed on: skipped as stale (a cancelled epoch).
            "skipped_chunks": sorted(session.received_chunks - session.sent_chunks),
            "signed_at": time.time(),
        }
        return self._signer.signed(statement)


def _transcribed(header: frame_pb2.FrameHeader, payload: bytes, spec: bytes = b"") -> dict:
    entry = {"chunk_id": header.chunk_id, "epoch": header.epoch, "start_pos": header.start_pos,
             "num_tokens": header.num_tokens, "num_outputs": header.num_outputs, "kind": kind_name(header.kind),
             "replay_stages": [header.replay_first_stage, header.replay_last_stage],
             "payload": base64.b64encode(payload).decode()}
    if spec:
        # Sealed for the tail on the wire, outside the chains: the tail's answer names its hash.
        entry["sampling"] = base64.b64encode(spec).decode()
    return entry


@dataclass
class CoordinatorRecord:
    """One session's record at the coordinator."""

    transcript: bool
    sent: dict[str, Chain] = field(default_factory=dict)
    received: dict[str, Chain] = field(default_factory=dict)
    sent_frames: dict[str, list[dict]] = field(default_factory=dict)
    received_frames: dict[str, list[dict]] = field(default_factory=dict)
    unclaimed: list[int] = field(default_factory=list)  # results no chunk waited for any more
    layouts: list[tuple] = field(default_factory=list)  # every ring layout the session used, in order

    def received_from(self, peer: str) -> int:
        chain = self.received.get(peer)
        return chain.count if chain else 0


class CoordinatorNotary:
    """The coordinator's chains (and transcripts) of the sessions that asked for a receipt."""

    def __init__(self):
        self._records: dict[str, CoordinatorRecord] = {}

    def open(self, session_id: str, *, transcript: bool) -> CoordinatorRecord:
        record = self._records[session_id] = CoordinatorRecord(transcript)
        return record

    def wants(self, session_id: str) -> bool:
        return session_id in self._records

    def close(self, session_id: str) -> None:
        self._records.pop(session_id, None)

    def sent(self, receiver: str, header: frame_pb2.FrameHeader, payload: bytes, layout: tuple,
             spec: bytes = b"") -> None:
        """`spec`: a sampled chunk's SamplingSpec in plaintext."""
        record = self._records.get(header.session_id)
        if record is None:
            return
        if not record.layouts or record.layouts[-1] != layout:
            record.layouts.append(layout)
        if record.sent.setdefault(receiver, Chain()).add(header_entry(header, payload), header.kind) \
                and record.transcript:
            record.sent_frames.setdefault(receiver, []).append(_transcribed(header, payload, spec))

    def received(self, sender: str, header: frame_pb2.FrameHeader, payload: bytes, claimed: bool) -> None:
        record = self._records.get(header.session_id)
        if record is None:
            return
        if record.received.setdefault(sender, Chain()).add(header_entry(header, payload), header.kind):
            if record.transcript:
                record.received_frames.setdefault(sender, []).append(_transcribed(header, payload))
            if not claimed:
                record.unclaimed.append(header.chunk_id)
