"""A stage's KV caches, one per session, measured in bytes against the stage's budget.

A store is dynamic (a session holds the bytes of the positions its cache holds, growing
and shrinking with them) or static (`session_positions` set: every session's cache is
preallocated to that many positions, so it holds `session_bytes` from its creation to its
end, and no chunk may take it past them).

A session belongs to the coordinator incarnation that was current when it was created:
when that coordinator is gone (a new incarnation registered, or its lease ended) nothing
can continue its sessions, so they are dropped at once rather than left to idle out.

Besides its KV, a session keeps the block's outputs for the positions its cache holds
(what the stage sent on), so that when the next stage dies the one that replaces it can
be fed those positions again without recomputing them here (a partial replay). They are
cropped with the cache and counted in the same budget.

Only the compute thread changes the store; others may read its counters."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from shard.errors import ShardError
from shard.model.block import CacheGapError


@dataclass
class Session:
    cache: Any
    incarnation: str
    positions: int = 0  # positions its cache holds after the last chunk
    # The block's outputs for positions [0, positions) in wire form, a row per position
    # (shorter after a failed chunk); empty where the store keeps none (the tail).
    outputs: bytearray = field(default_factory=bytearray)
    last_used: float = field(default_factory=time.monotonic)


class KVStore:
    def __init__(self, new_cache: Callable[..., Any], *, bytes_per_position: int, budget_bytes: int,
                 max_sessions: int, idle_seconds: float, session_positions: int | None = None,
                 session_bytes: int | None = None, release: Callable[[Any], None] = lambda cache: None,
                 output_bytes_per_position: int = 0):
        """`bytes_per_position` of KV; `output_bytes_per_position` of the block's output kept
        per position (0: none kept); `session_bytes` (static stores: the preallocated KV)
        defaults to `session_positions` positions' KV; `release(cache)` is called for the
        cache of every session freed."""
        self._new_cache, self._release = new_cache, release
        self.session_positions = session_positions
        if session_positions is not None and session_bytes is None:
            session_bytes = session_positions * bytes_per_position
        self.session_bytes = session_bytes
        self.output_bytes_per_position = output_bytes_per_position
        self.bytes_per_position = bytes_per_position + output_bytes_per_position
        self.budget_bytes = budget_bytes
        self._max_sessions, self.idle_seconds = max_sessions, idle_seconds
        self._sessions: dict[str, Session] = {}
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def items(self) -> list[tuple[str, Session]]:
        return list(self._sessions.items())

    @property
    def max_sessions(self) -> int:
        return self._max_sessions

    def bytes_of(self, session: Session) -> int:
        return self.bytes_at(session.positions)

    def bytes_at(self, positions: int) -> int:
        """What a session holds when its cache holds `positions` positions (and its outputs
        as many): a static cache holds all its bytes from the start, kept outputs grow."""
        if self.session_bytes is None:
            return positions * self.bytes_per_position
        return self.session_bytes + positions * self.output_bytes_per_position

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def reserve(self, session_id: str, incarnation: str, end_pos: int, declared_positions: int = 0) -> Session:
        """The session (created under `incarnation` if new, its cache made by
        `new_cache(positions=declared_positions)`: the most it said it would hold, 0 if
        unsaid), with room for its cache to hold `end_pos` positions. RESOURCE_EXHAUSTED when
        that would take the sessions past the byte budget or the session cap; nothing
        changes then."""
        session = self._sessions.get(session_id)
        if self.session_positions is not None and end_pos > self.session_positions:
            raise ShardError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{end_pos} positions of KV cache exceed the {self.session_positions} positions "
                             f"a session may hold on this stage")
        if session is None and len(self._sessions) >= self._max_sessions:
            raise ShardError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"this stage already holds {self._max_sessions} sessions")
        held = self.bytes_of(session) if session else 0
        total = self.total_bytes - held + self.bytes_at(end_pos)
        if total > self.budget_bytes:
            raise ShardError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{end_pos} positions of KV cache would take this stage's KV to {total} bytes, "
                             f"over its budget of {self.budget_bytes} bytes")
        if session is None:
            session = self._sessions[session_id] = Session(self._new_cache(positions=declared_positions), incarnation)
            self.total_bytes += self.bytes_of(session)  # a static cache's, from now on; else none yet
        session.last_used = time.monotonic()
        return session

    def record(self, session: Session, positions: int) -> None:
        """The session's cache now holds `positions` positions (its outputs at most as many)."""
        self.total_bytes += self.bytes_at(positions) - self.bytes_of(session)
        session.positions = positions
        del session.outputs[positions * self.output_bytes_per_position:]

    def keep_outputs(self, session: Session, start_pos: int, rows: bytes) -> None:
        """The block's outputs for positions from `start_pos` on, replacing any kept there."""
        row = self.output_bytes_per_position
        if not row:
            return
        del session.outputs[start_pos * row:]
        if len(session.outputs) == start_pos * row:  # else a gap: a replay from here fails as one
            session.outputs += rows

    def outputs(self, session_id: str, start_pos: int, count: int) -> bytes:
        """The kept outputs of positions [start_pos, start_pos + count); CacheGapError when
        the session or those positions are not held."""
        session, row = self._sessions.get(session_id), self.output_bytes_per_position
        if session is None or not row or len(session.outputs) < (start_pos + count) * row:
            held = len(session.outputs) // row if session and row else 0
            raise CacheGapError(f"outputs of {held} positions kept for session {session_id!r}, "
                                f"a replay needs [{start_pos}, {start_pos + count})")
        session.last_used = time.monotonic()
        return bytes(session.outputs[start_pos * row:(start_pos + count) * row])

    def pop(self, session_id: str) -> int | None:
        """Free a session; the bytes it held, None when there was no such session."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        freed = self.bytes_of(session)
        self.total_bytes -= freed
        self._release(session.cache)
        return freed

    def drop_other_incarnations(self, incarnation: str) -> list[str]:
        """Free every session not created under `incarnation` (all of them for "")."""
        return self._drop([sid for sid, s in self._sessions.items() if not incarnation or s.incarnation != incarnation])

    def expire_idle(self) -> list[str]:
        deadline = time.monotonic() - self.idle_seconds
        return self._drop([sid for sid, s in self._sessions.items() if s.last_used < deadline])

    def _drop(self, session_ids: list[str]) -> list[str]:
        for session_id in session_ids:
            self.pop(session_id)
        return session_ids
