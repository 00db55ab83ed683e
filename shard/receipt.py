"""Checking a run's receipt offline: `shard receipt verify FILE [--ca ca.pem]`.

Needs only the receipt (and the deployment's CA certificate to tie signers to the
deployment): no swarm, no model, no torch. What each check proves, and what no receipt
can, is in docs/receipts.md. `replay` (--replay MODEL_DIR) is the check of the
computation itself: it lives in shard.receipt_replay, which needs the server extra."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from shard.v1 import frame_pb2
from shard.wire.certs import Identity
from shard.wire.chain import GENESIS, chain_of, frame_entry
from shard.wire.ids import ids_sha256
from shard.wire.signing import SignatureError, digest, fingerprint, verify_signed

FORMAT = "shard-receipt/1"
ENVELOPE = "shard/v1 receipt"
ATTESTATION = "shard/v1 stage attestation"
_EMPTY_CHAIN = {"head": GENESIS.hex(), "count": 0}


class ReceiptInvalid(ValueError):
    """The receipt does not prove what it claims; the message says why."""


@dataclass(frozen=True)
class Decision:
    """Where the tail chose an output token: output row `row` of its answer to chunk
    `chunk_id`, computed on the committed tokens before it, under `spec` (the chunk's
    SamplingSpec: settings, seed and the drafted tokens' q; None for argmax ids)."""

    chunk_id: int
    row: int
    spec: frame_pb2.SamplingSpec | None


@dataclass
class Verified:
    """What a valid receipt shows."""

    envelope: dict
    stages: dict[str, dict]  # node id -> its attestation's statement
    lost: dict[str, str] = field(default_factory=dict)  # unattested node -> why
    # Edges touching a lost node, and edges of a superseded ring whose chains differ (frames in
    # flight when a new plan closed the edge; the session was replayed into the new ring).
    unchecked_edges: list[tuple[str, str]] = field(default_factory=list)
    checked_edges: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)  # signer -> sha256 of its certificate
    with_ca: bool = False
    transcript_checked: bool = False
    # From the transcript: output position -> every answer of the tail that chose its token.
    decisions: dict[int, list[Decision]] = field(default_factory=dict)


def load(path: str | Path) -> dict:
    """The receipt in a file; OSError or ValueError when it cannot be read as JSON."""
    receipt = json.loads(Path(path).read_text())
    if not isinstance(receipt, dict):
        raise ValueError("not a JSON object")
    return receipt


def verify(receipt: dict, ca_pem: bytes | None = None) -> Verified:
    """Check everything a receipt claims that can be checked without the model; raises
    ReceiptInvalid with the first reason it fails."""
    try:
        return _verify(receipt, ca_pem)
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise ReceiptInvalid(f"malformed receipt: {type(error).__name__} {error}") from None


def _verify(receipt: dict, ca_pem: bytes | None) -> Verified:
    if receipt.get("format") != FORMAT:
        raise ReceiptInvalid(f"not a {FORMAT} receipt (format {receipt.get('format')!r})")
    signed_envelope = receipt["envelope"]
    envelope = signed_envelope["statement"]
    if envelope.get("kind") != ENVELOPE or envelope.get("role") != "coordinator":
        raise ReceiptInvalid("the envelope is not a coordinator's receipt statement")
    made_at = envelope["made_at"]
    _check_signature(signed_envelope, Identity("coordinator", envelope["node_id"]), ca_pem, made_at, "the envelope")
    stages = _check_attestations(receipt["attestations"], envelope, ca_pem, made_at)
    verified = Verified(envelope, stages, with_ca=ca_pem is not None)
    verified.fingerprints = {signed["statement"]["node_id"]: fingerprint(signed["certificate"])
                             for signed in [signed_envelope, *receipt["attestations"]]}
    verified.lost = _check_plan(envelope, stages)
    _check_chains(envelope, stages, verified)
    _check_output(envelope)
    if "transcript" in envelope:
        verified.decisions = _check_transcript(envelope)
        verified.transcript_checked = True
    return verified


def _check_signature(signed: dict, claimed: Identity, ca_pem: bytes | None, at: float, what: str) -> None:
    try:
        verify_signed(signed, claimed=claimed, ca_pem=ca_pem, at=at)
    except SignatureError as error:
        raise ReceiptInvalid(f"bad signature on {what}: {error}") from None


def _check_attestations(attestations: list, envelope: dict, ca_pem: bytes | None, at: float) -> dict[str, dict]:
    """Every attestation signed by the stage it names and bound into the envelope."""
    bound = {entry["node_id"]: entry["sha256"] for entry in envelope["attestations"]}
    if len(bound) != len(envelope["attestations"]):
        raise ReceiptInvalid("the envelope binds two attestations of one node")
    stages: dict[str, dict] = {}
    for signed in attestations:
        statement = signed["statement"]
        node_id = statement["node_id"]
        if statement.get("kind") != ATTESTATION or statement.get("role") != "stage":
            raise ReceiptInvalid(f"the attestation of {node_id} is not a stage's attestation")
        _check_signature(signed, Identity("stage", node_id), ca_pem, at, f"the attestation of {node_id}")
        if statement["session_id"] != envelope["session_id"]:
            raise ReceiptInvalid(f"the attestation of {node_id} is of session {statement['session_id']}, "
                                 f"not {envelope['session_id']}: spliced from another run")
        if node_id in stages:
            raise ReceiptInvalid(f"two attestations of {node_id}")
        if bound.get(node_id) != digest(statement):
            raise ReceiptInvalid(f"the attestation of {node_id} is not the one the coordinator signed"
                                 if node_id in bound else f"the coordinator signed no attestation of {node_id}")
        stages[node_id] = statement
    missing = sorted(set(bound) - set(stages))
    if missing:
        raise ReceiptInvalid(f"the attestation of {', '.join(missing)} was removed (the coordinator signed for it)")
    return stages


def _check_plan(envelope: dict, stages: dict[str, dict]) -> dict[str, str]:
    """The final layout tiles the model's layers once, each block attested by its holder
    with the model's config; nodes of earlier layouts that did not attest were lost in a
    fail-over that replayed the session. Returns the lost nodes."""
    layouts = envelope["layouts"]
    if not layouts:
        raise ReceiptInvalid("the receipt names no plan")
    final, num_layers = layouts[-1], envelope["model"]["num_layers"]
    at = 0
    for index, entry in enumerate(final):
        if entry["layer_start"] != at or entry["layer_end"] < at:
            raise ReceiptInvalid(f"the blocks do not tile the model's {num_layers} layers once: {entry['node_id']} "
                                 f"holds [{entry['layer_start']}, {entry['layer_end']}) after layer {at}")
        at = entry["layer_end"]
        statement = stages.get(entry["node_id"])
        if statement is None:
            raise ReceiptInvalid(f"{entry['node_id']}, in the final plan, did not attest")
        block = statement["block"]
        expected = (entry["layer_start"], entry["layer_end"], index == 0, index == len(final) - 1)
        if (block["layer_start"], block["layer_end"], block["first"], block["last"]) != expected:
            raise ReceiptInvalid(f"{entry['node_id']} attests layers [{block['layer_start']}, {block['layer_end']}) "
                                 f"but the plan gives it [{expected[0]}, {expected[1]})")
    if at != num_layers:
        raise ReceiptInvalid(f"the blocks do not tile the model's {num_layers} layers once: they end at {at}")
    for node_id, statement in stages.items():
        if statement["model_config_sha256"] != envelope["model"]["config_sha256"]:
            raise ReceiptInvalid(f"{node_id} served another model (config {statement['model_config_sha256'][:12]})")
    in_plans = {entry["node_id"] for layout in layouts for entry in layout}
    strangers = sorted(set(stages) - in_plans)
    if strangers:
        raise ReceiptInvalid(f"{', '.join(strangers)} attested but is in no plan of the session")
    unattested = {entry["node_id"]: entry["reason"] for entry in envelope["unattested"]}
    lost = {node_id: unattested.get(node_id, "") for node_id in sorted(in_plans - set(stages))}
    if lost.keys() != unattested.keys():
        raise ReceiptInvalid("the envelope's list of stages that did not attest does not match the plans")
    if lost:
        replayed = any("REPLAY" in chain.get("kinds", {}) for s in stages.values() for chain in s["received"].values())
        if envelope["stats"]["replays"] < 1 or not replayed:
            raise ReceiptInvalid(f"{', '.join(lost)} did not attest, and no fail-over replay shows its "
                                 "work recomputed")
    return lost


def _check_chains(envelope: dict, stages: dict[str, dict], verified: Verified) -> None:
    """Every edge's sender chain equals its receiver's, where both sides attest (on an edge
    only a superseded ring used, after a replay, a difference is reported, not fatal); the
    final ring's edges all carried frames."""
    coordinator = envelope["node_id"]
    sides = {coordinator: envelope, **stages}
    ring = [coordinator, *(entry["node_id"] for entry in envelope["layouts"][-1]), coordinator]
    final_edges = set(zip(ring, ring[1:]))
    edges = {(a, b) for a, s in sides.items() for b in s["sent"]} | {
        (a, b) for b, s in sides.items() for a in s["received"]}
    for a, b in sorted(edges):
        if a in verified.lost or b in verified.lost:
            verified.unchecked_edges.append((a, b))
            continue
        if a not in sides or b not in sides:
            raise ReceiptInvalid(f"frames on edge {a} -> {b}, but {b if a in sides else a} is in no plan")
        sent, received = sides[a]["sent"].get(b, _EMPTY_CHAIN), sides[b]["received"].get(a, _EMPTY_CHAIN)
        if (sent["head"], sent["count"]) != (received["head"], received["count"]):
            if (a, b) not in final_edges and envelope["stats"]["replays"] >= 1:
                verified.unchecked_edges.append((a, b))
                continue
            raise ReceiptInvalid(f"the chains of edge {a} -> {b} differ: {a} sent {sent['count']} frames "
                                 f"(chain {sent['head'][:12]}), {b} received {received['count']} "
                                 f"(chain {received['head'][:12]})")
        verified.checked_edges += 1
    for a, b in zip(ring, ring[1:]):
        if not sides[a]["sent"].get(b, _EMPTY_CHAIN)["count"]:
            raise ReceiptInvalid(f"the final plan's edge {a} -> {b} carried no frames")


def _check_output(envelope: dict) -> None:
    for part in ("prompt", "output"):
        record = envelope[part]
        ids = record.get("ids")
        if ids is not None and (ids_sha256(ids) != record["sha256"] or len(ids) != record["tokens"]):
            raise ReceiptInvalid(f"the {part} token ids do not match the {part} hash the coordinator signed")


def _payload(entry: dict) -> bytes:
    try:
        return base64.b64decode(entry["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise ReceiptInvalid(f"unreadable payload in the transcript (chunk {entry['chunk_id']})") from None


def _entry(session_id: str, entry: dict) -> bytes:
    first, last = entry["replay_stages"]
    return frame_entry(session_id=session_id, chunk_id=entry["chunk_id"], epoch=entry["epoch"],
                       start_pos=entry["start_pos"], num_tokens=entry["num_tokens"],
                       num_outputs=entry["num_outputs"], kind=frame_pb2.FrameKind.Value("FRAME_KIND_" + entry["kind"]),
                       replay_first_stage=first, replay_last_stage=last, payload=_payload(entry))


def _ids(entry: dict) -> list[int]:
    tensor = frame_pb2.Tensor.FromString(_payload(entry))
    if tensor.dtype != frame_pb2.DTYPE_INT64 or len(tensor.data) != 8 * (tensor.shape[0] if tensor.shape else 0):
        raise ReceiptInvalid(f"the transcript's chunk {entry['chunk_id']} does not hold token ids")
    return [int.from_bytes(tensor.data[i:i + 8], "little", signed=True) for i in range(0, len(tensor.data), 8)]


def _check_transcript(envelope: dict) -> dict[int, list[Decision]]:
    """The coordinator's transcript reproduces its chains (which the stages' chains equal),
    and every output token is what the tail returned for its position (the argmax, or its
    sampled choice under the recorded settings), computed on the committed tokens before
    it. Returns where each output token was decided."""
    session_id, transcript = envelope["session_id"], envelope["transcript"]
    for direction in ("sent", "received"):
        for peer, chain in envelope[direction].items():
            entries = transcript[direction].get(peer, [])
            head = chain_of(_entry(session_id, e) for e in entries)
            if (head.hex(), len(entries)) != (chain["head"], chain["count"]):
                raise ReceiptInvalid(f"the transcript of frames {direction} {'to' if direction == 'sent' else 'from'} "
                                     f"{peer} does not match the coordinator's chain")
    if "ids" not in envelope["output"] or "ids" not in envelope["prompt"]:
        return {}
    sequence = envelope["prompt"]["ids"] + envelope["output"]["ids"]
    prompt_length = len(envelope["prompt"]["ids"])
    results = {e["chunk_id"]: e for entries in transcript["received"].values() for e in entries
               if e["kind"] == "RESULT"}
    chunks = sorted((e for entries in transcript["sent"].values() for e in entries
                     if e["kind"] in ("FORWARD", "REPLAY")), key=lambda e: e["chunk_id"])
    returned: dict[int, set[int]] = {}
    decisions: dict[int, list[Decision]] = {}
    for chunk, on_committed in _contexts(chunks, sequence):
        if not on_committed or chunk["chunk_id"] not in results or chunk["kind"] != "FORWARD":
            continue
        spec = _spec(chunk, envelope["decoding"])
        result = results[chunk["chunk_id"]]
        chosen = _ids(result) if spec is None else _choices(result, chunk)
        tokens, start, n = _ids(chunk), chunk["start_pos"], chunk["num_tokens"]
        skip = n - (chunk["num_outputs"] or n)  # the tail answers for the last positions only
        for j, token in enumerate(chosen):
            fed = skip + j + 1  # inputs [start, start + fed) produced this token
            position = start + fed
            if position >= len(sequence) or tokens[:fed] != sequence[start:start + fed]:
                continue  # computed on a draft the output rejected: says nothing of it
            returned.setdefault(position, set()).add(token)
            decisions.setdefault(position, []).append(Decision(chunk["chunk_id"], j, spec))
    for position in range(prompt_length, len(sequence)):
        found = returned.get(position, set())
        if found != {sequence[position]}:
            said = "no result of the ring" if not found else f"the tail returned {sorted(found)}"
            raise ReceiptInvalid(f"output token {position - prompt_length} ({sequence[position]}) is not what the "
                                 f"ring computed: {said} for position {position}")
    return decisions


def _spec(chunk: dict, decoding: dict) -> frame_pb2.SamplingSpec | None:
    """The sampling spec a chunk carried (None: the tail returned argmax ids), which must
    hold the settings and seed the receipt records."""
    if "sampling" not in chunk:
        if decoding["sampling"] != "greedy":
            raise ReceiptInvalid(f"chunk {chunk['chunk_id']} carried no sampling spec, but the receipt records "
                                 "sampled decoding")
        return None
    try:
        spec = frame_pb2.SamplingSpec.FromString(base64.b64decode(chunk["sampling"], validate=True))
    except (binascii.Error, ValueError, DecodeError):
        raise ReceiptInvalid(f"unreadable sampling spec in the transcript (chunk {chunk['chunk_id']})") from None
    carried = _settings(spec.temperature, spec.top_p, spec.top_k, spec.min_p, spec.seed)
    recorded = _settings(decoding["temperature"], decoding["top_p"], decoding["top_k"], decoding["min_p"],
                         decoding["seed"] or 0)
    if carried != recorded:
        raise ReceiptInvalid(f"chunk {chunk['chunk_id']} was decided with {_describe(carried)}, but the receipt "
                             f"records {_describe(recorded)}")
    return spec


def _settings(temperature: float, top_p: float, top_k: int, min_p: float, seed: int) -> tuple:
    """Sampling settings as the wire carries them (floats in float32)."""
    def f32(x: float) -> float:
        return struct.unpack("<f", struct.pack("<f", x))[0]

    return f32(temperature), f32(top_p), int(top_k), f32(min_p), int(seed)


def _describe(settings: tuple) -> str:
    temperature, top_p, top_k, min_p, seed = settings
    return f"temperature {temperature:.6g}, top_p {top_p:.6g}, top_k {top_k}, min_p {min_p:.6g}, seed {seed}"


def _choices(result: dict, chunk: dict) -> list[int]:
    """The tokens the tail chose for a sampled chunk, which it says it chose under the
    transcript's spec: its answer (pinned by its signed chain) names the spec's sha256."""
    try:
        choices = frame_pb2.ChunkChoices.FromString(_payload(result))
    except DecodeError:
        raise ReceiptInvalid(f"the tail's answer to chunk {chunk['chunk_id']} holds no chosen tokens") from None
    if choices.spec_sha256 != hashlib.sha256(base64.b64decode(chunk["sampling"])).digest():
        named = choices.spec_sha256.hex()[:12] or "none"
        raise ReceiptInvalid(f"the tail chose the tokens of chunk {chunk['chunk_id']} under another sampling spec "
                             f"(sha256 {named}) than the transcript holds")
    return list(choices.ids)


def _contexts(chunks: list[dict], sequence: list[int]):
    """Each chunk (in the order the stages computed them) and whether the KV it was
    computed on held the committed tokens: positions are absolute, so a chunk at start_pos
    s sees what the chunks before it wrote at [0, s) (a REPLAY rewrites committed tokens)."""
    kv: list[int] = []
    for chunk in chunks:
        start = chunk["start_pos"]
        tokens = _ids(chunk) if chunk["payload"] else sequence[start:start + chunk["num_tokens"]]
        yield chunk, len(kv) >= start and kv[:start] == sequence[:start]
        kv = kv[:start] + tokens


def summary(verified: Verified) -> list[str]:
    """A few lines for a person."""
    e = verified.envelope
    stats, output = e["stats"], e["output"]
    sampled = e["decoding"]["sampling"] != "greedy"
    lines = [f"receipt of session {e['session_id']}: VALID"
             + ("" if verified.with_ca else " (signatures checked, signers NOT tied to a CA: give --ca)"),
             f"model: config {e['model']['config_sha256'][:16]}, tokenizer {e['model']['tokenizer_sha256'][:16]}, "
             f"{e['model']['num_layers']} layers",
             "decoding: " + _decoding(e["decoding"]),
             f"coordinator {e['node_id']} ({_where(e['node'])}), "
             f"certificate {verified.fingerprints[e['node_id']][:16]}"]
    for entry in e["layouts"][-1]:
        s = verified.stages[entry["node_id"]]
        block = s["block"]
        extras = "".join((" + embedding" if block["first"] else "", " + head" if block["last"] else ""))
        lines.append(f"  stage {entry['node_id']}: layers [{block['layer_start']}, {block['layer_end']}){extras}, "
                     f"weights {block['weights_sha256'][:16]}, {_where(s['node'])}, certificate "
                     f"{verified.fingerprints[entry['node_id']][:16]}, skipped {len(s['skipped_chunks'])} stale chunks")
    for node_id, reason in verified.lost.items():
        lines.append(f"  LOST {node_id} (did not attest: {reason}); its block was recomputed by the replay "
                     "into the final plan's holder")
    ring = [e["node_id"], *(entry["node_id"] for entry in e["layouts"][-1]), e["node_id"]]
    sides = {e["node_id"]: e, **verified.stages}
    rtts = [f"{a}->{b} {sides[a]['rtts'][b] * 1e3:.1f} ms" for a, b in zip(ring, ring[1:]) if b in sides[a]["rtts"]]
    lines.append("round trips (measured by the sender, signed): " + (", ".join(rtts) or "none measured"))
    lines.append(f"{output['tokens']} tokens ({output['finish']}) in {stats['seconds']:.2f} s: "
                 f"{stats['tokens_per_second']:.1f} tok/s, acceptance {stats['acceptance_rate']:.2f}, "
                 f"chunks sent/wasted/cancelled {stats['chunks_sent']}/{stats['chunks_wasted']}/"
                 f"{stats['chunks_cancelled']}, replays {stats['replays']}")
    lines.append(f"output sha256 {output['sha256'][:16]}; {verified.checked_edges} edges' chains match"
                 + (f", {len(verified.unchecked_edges)} edges of lost nodes or superseded rings unchecked"
                    if verified.unchecked_edges else "")
                 + (f"; every output token is the tail's {'choice' if sampled else 'argmax'} (transcript)"
                    if verified.transcript_checked else "; private: no transcript"))
    return lines


def _decoding(decoding: dict) -> str:
    draft = f"draft {decoding['draft']}, K {decoding['spec_k']}, W {decoding['in_flight']}"
    if decoding["sampling"] == "greedy":
        return f"greedy, {draft}"
    settings = _settings(decoding["temperature"], decoding["top_p"], decoding["top_k"], decoding["min_p"],
                         decoding["seed"])
    return f"sampled, {_describe(settings)}, {draft}"


def _where(node: dict) -> str:
    device = node.get("device_name") or "?"
    if node.get("device_id") and node["device_id"] != device:
        device += f" {node['device_id']}"
    return device + (f", region {node['region']}" if node.get("region") else "")

