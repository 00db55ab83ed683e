"""The stages' KV caches as the coordinator admits generations against them.

A generation may come to hold prompt + max_tokens positions at every stage. The ledger
holds that much room for it from admission to its end, against each stage's KV budget
and session cap (read from the stages' Info), and a generation waits until every stage has
room for the whole of it: so none fails half-way for want of KV, its tokens streamed and
lost. The stages keep enforcing their budgets themselves (sessions of an earlier
coordinator, idle ones not freed yet): the ledger is the coordinator's plan, they are
the truth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from shard.errors import ShardError
from shard.node.admission import busy
from shard.v1 import stage_pb2


@dataclass(frozen=True)
class StageKV:
    node_id: str
    budget_bytes: int
    session_bytes: int  # a session's from its first position (a preallocated static cache)
    bytes_per_position: int
    session_positions: int  # the most a session may hold there; 0: no cap but the context
    max_sessions: int

    @classmethod
    def from_info(cls, info: stage_pb2.InfoResponse) -> "StageKV":
        return cls(info.node_id, info.kv_budget_bytes, info.kv_session_bytes, info.kv_bytes_per_position,
                   info.kv_session_positions, info.kv_max_sessions)

    def bytes_at(self, positions: int) -> int:
        return self.session_bytes + positions * self.bytes_per_position

    def why_never(self, positions: int) -> str | None:
        """Why a session of `positions` positions cannot run here even alone, if it cannot."""
        if self.session_positions and positions > self.session_positions:
            return (f"{positions} positions (prompt + max_tokens) exceed the {self.session_positions} positions "
                    f"a session may hold on {self.node_id}")
        if self.bytes_at(positions) > self.budget_bytes:
            return (f"{positions} positions (prompt + max_tokens) of KV cache take {self.bytes_at(positions)} "
                    f"bytes on {self.node_id}, over its KV budget of {self.budget_bytes} bytes")
        return None


class KVLedger:
    def __init__(self) -> None:
        self.layout: tuple = ()  # the ring the stages below belong to
        self.stages: tuple[StageKV, ...] = ()
        self.waiting = 0  # generations waiting for room
        self._held: dict[object, int] = {}  # positions held, by generation
        self._changed = asyncio.Condition()

    @property
    def held_positions(self) -> list[int]:
        return list(self._held.values())

    async def follow(self, layout: tuple, stages: list[StageKV]) -> None:
        """The ring now has these stages; waiting generations look again."""
        async with self._changed:
            self.layout, self.stages = layout, tuple(stages)
            self._changed.notify_all()

    def check(self, positions: int) -> None:
        """RESOURCE_EXHAUSTED, with no retry hint, for a generation no stage could ever hold."""
        for stage in self.stages:
            reason = stage.why_never(positions)
            if reason is not None:
                raise ShardError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{reason}: this swarm cannot run it; ask for fewer tokens")

    def fits(self, positions: int) -> bool:
        held = self._held.values()
        return all(len(held) < stage.max_sessions
                   and sum(map(stage.bytes_at, held)) + stage.bytes_at(positions) <= stage.budget_bytes
                   for stage in self.stages)

    @asynccontextmanager
    async def hold(self, positions: int, timeout: float) -> AsyncIterator[None]:
        """Room for `positions` at every stage for the body, waiting up to `timeout` s for it."""
        self.check(positions)
        key = object()
        async with self._changed:
            self.waiting += 1
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.fits(positions)), timeout)
            except asyncio.TimeoutError:
                raise busy(f"the stages' KV caches had no room for {positions} more positions "
                           f"within {timeout:g} s") from None
            finally:
                self.waiting -= 1
            self._held[key] = positions
        try:
            yield
        finally:
            async with self._changed:
                del self._held[key]
                self._changed.notify_all()
