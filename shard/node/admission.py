"""The coordinator's admission queue: a bounded number of generations run at once, a
bounded number wait (first come, first served) for a bounded time, and the rest are
refused at once with a retry hint, so a burst degrades into waiting, not into failures
or an unbounded backlog."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc

from shard.errors import ShardError

# A short generation's time: long enough that a retry is likely to find a slot, short
# enough that a client backing off from it does not idle.
RETRY_AFTER_MS = 1000


def busy(why: str) -> ShardError:
    """RESOURCE_EXHAUSTED for a request that may well succeed a little later."""
    return ShardError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{why}; retry after {RETRY_AFTER_MS} ms",
                      retry_after_ms=RETRY_AFTER_MS)


class Admission:
    def __init__(self, *, max_running: int, max_queued: int, max_wait_seconds: float):
        if max_running < 1 or max_queued < 0 or max_wait_seconds < 0:
            raise ValueError("need max_running >= 1, max_queued >= 0 and max_wait_seconds >= 0")
        self.max_running, self.max_queued, self.max_wait_seconds = max_running, max_queued, max_wait_seconds
        self._slots = asyncio.Semaphore(max_running)
        self.running = 0
        self.queued = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the running slots for the body; wait in the queue for one first."""
        if self._slots.locked() and self.queued >= self.max_queued:
            raise busy(f"the coordinator is busy: {self.running} generations running and {self.queued} waiting")
        self.queued += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.max_wait_seconds)
        except asyncio.TimeoutError:
            raise busy(f"no generation slot freed within {self.max_wait_seconds:g} s in the "
                       f"admission queue") from None
        finally:
            self.queued -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
