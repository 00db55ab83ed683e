"""Running hash chains over the frames of one session on one edge, for receipts.

A node that keeps a session's receipt records every frame of it that it sends or receives,
per peer and direction, as the frame is in plaintext (before sealing, after opening). The
sender's chain for an edge and the receiver's chain for the same edge must then be equal:
that is what `shard receipt verify` compares.

Canonical bytes of a frame (what a chain entry digests)::

    "shard/v1 receipt frame\\0" || len(session_id) (4, big-endian) || session_id (UTF-8)
    || chunk_id, epoch, start_pos, num_tokens, num_outputs, kind, replay_first_stage,
       replay_last_stage (8 bytes each, big-endian)
    || sha256(plaintext payload)

entry = sha256(canonical bytes); head_0 = 32 zero bytes; head_n = sha256(head_{n-1} || entry_n).

Left out on purpose: sender and receiver (the chain is per edge already), the frame counter
and the stream (an edge re-sends unacknowledged frames on a new stream after a break), and
the trace context. A frame whose entry the chain already holds (such a re-send) is not
counted again, on either side, so a reconnect does not make two honest chains differ."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

_MAGIC = b"shard/v1 receipt frame\x00"
_FIELDS = struct.Struct(">QQQQQQQQ")
_LEN = struct.Struct(">I")
GENESIS = bytes(32)


def frame_entry(*, session_id: str, chunk_id: int, epoch: int, start_pos: int, num_tokens: int,
                num_outputs: int, kind: int, replay_first_stage: int = 0, replay_last_stage: int = 0,
                payload: bytes = b"") -> bytes:
    """The digest a chain records for one frame (the layout is in the module's docstring)."""
    session = session_id.encode()
    return hashlib.sha256(b"".join((
        _MAGIC, _LEN.pack(len(session)), session,
        _FIELDS.pack(chunk_id, epoch, start_pos, num_tokens, num_outputs, kind, replay_first_stage,
                     replay_last_stage),
        hashlib.sha256(payload).digest(),
    ))).digest()


def header_entry(header, payload: bytes) -> bytes:
    """frame_entry of a FrameHeader and its plaintext payload."""
    return frame_entry(session_id=header.session_id, chunk_id=header.chunk_id, epoch=header.epoch,
                       start_pos=header.start_pos, num_tokens=header.num_tokens, num_outputs=header.num_outputs,
                       kind=int(header.kind), replay_first_stage=header.replay_first_stage,
                       replay_last_stage=header.replay_last_stage, payload=payload)


@dataclass
class Chain:
    """One direction of one edge for one session: a running hash, a count and counts per kind."""

    head: bytes = GENESIS
    count: int = 0
    kinds: dict[int, int] = field(default_factory=dict)
    _seen: set[bytes] = field(default_factory=set, repr=False)

    def add(self, entry: bytes, kind: int) -> bool:
        """Record a frame's entry; False (and nothing recorded) for one already recorded."""
        if entry in self._seen:
            return False
        self._seen.add(entry)
        self.head = hashlib.sha256(self.head + entry).digest()
        self.count += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        return True

    def summary(self, kind_names) -> dict:
        """The chain as a receipt states it: head (hex), count, frames per kind name."""
        return {"head": self.head.hex(), "count": self.count,
                "kinds": {kind_names(k): n for k, n in sorted(self.kinds.items())}}


def chain_of(entries) -> bytes:
    """The head of a chain over `entries` (digests), in order: what a verifier recomputes."""
    head = GENESIS
    for entry in entries:
        head = hashlib.sha256(head + entry).digest()
    return head
