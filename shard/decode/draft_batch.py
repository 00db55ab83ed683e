"""One draft forward for many sessions' next steps (issue 13: many users at once).

Sessions step from threads of their own (the coordinator's draft pool); a worker runs the
steps waiting as one batch and hands each session its own row's result. The worker runs a
batch once every session inside a proposal has its next step queued (or `max_batch` steps
are): a session between two steps only picks a token, so waiting for it costs microseconds
and needs no timer, and sessions not drafting (waiting on the ring) hold nobody up. A
session drafting alone runs its step in its own thread: the hand-over to the worker and
back would cost it a few hundred microseconds a step, a fifth of a 1B draft's graphed step.

`StepBatcher` is that gathering; what a batch computes is its subclass's. Here the eager
one: on a CPU a small draft's step costs mostly per-op overhead, so with many sessions
drafting at once a forward per session sets the pace, and the dynamic-cache sessions'
steps run as one ragged batch through shard.model.batch.forward_batch, the stages'
batching. On a GPU the static sessions' steps batch over one graphed KV pool instead
(shard.decode.draft_pool)."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers import DynamicCache, PreTrainedModel

from shard.model.batch import Row, forward_batch
from shard.model.block import Block


@dataclass
class DraftBatchStats:
    forwards: int = 0  # draft forwards run
    steps: int = 0  # session steps (rows) they ran
    batched_forwards: int = 0  # forwards that ran more than one session's step
    largest: int = 0  # most steps in one forward

    def describe(self) -> str:
        return (f"{self.steps} draft steps in {self.forwards} forwards ({self.batched_forwards} batched, "
                f"largest {self.largest})")


@dataclass
class _Step:
    request: Any
    done: Future


class StepBatcher:
    """Steps queued by sessions' threads, run in batches of up to `max_batch` by one worker
    thread through `_run(requests) -> results` (one per request, in order)."""

    def __init__(self, max_batch: int, *, name: str):
        if max_batch < 2:
            raise ValueError(f"a draft batch holds at least 2 steps, not {max_batch}")
        self.max_batch, self._name = max_batch, name
        self._changed = threading.Condition()
        self._waiting: deque[_Step] = deque()
        self._proposing = 0  # sessions inside `proposing()`
        self._forwarding = False  # a batch runs (in the worker, or inline): one at a time
        self._worker: threading.Thread | None = None
        self.stats = DraftBatchStats()

    @contextmanager
    def proposing(self) -> Iterator[None]:
        """Around a session's run of steps: while inside, batches wait for its next step."""
        with self._changed:
            self._proposing += 1
        try:
            yield
        finally:
            with self._changed:
                self._proposing -= 1
                self._changed.notify_all()

    def _submit(self, request) -> Any:
        """`request`'s result, once the batch holding it has run."""
        step = _Step(request, Future())
        with self._changed:
            alone = not self._forwarding and not self._waiting and self._proposing <= 1
            if alone:
                self._forwarding = True
            else:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._serve, name=self._name, daemon=True)
                    self._worker.start()
                self._waiting.append(step)
                self._changed.notify_all()
        if alone:
            self._forward_and_release([step])
        return step.done.result()

    def _run(self, requests: list) -> list:
        raise NotImplementedError

    def _serve(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(self._full)
                batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch))]
                self._forwarding = True
            self._forward_and_release(batch)

    def _full(self) -> bool:
        return (not self._forwarding and bool(self._waiting)
                and len(self._waiting) >= min(self._proposing, self.max_batch))

    def _forward_and_release(self, batch: list[_Step]) -> None:
        try:
            self._forward(batch)
        finally:
            with self._changed:
                self._forwarding = False
                self._changed.notify_all()

    def _forward(self, batch: list[_Step]) -> None:
        try:
            results = self._run([step.request for step in batch])
        except Exception as error:
            if len(batch) == 1:
                batch[0].done.set_exception(error)
                return
            # The error names no row: alone, only the session that caused it fails.
            for step in batch:
                self._forward([step])
            return
        stats = self.stats
        stats.forwards += 1
        stats.steps += len(batch)
        stats.batched_forwards += len(batch) > 1
        stats.largest = max(stats.largest, len(batch))
        for step, result in zip(batch, results):
            step.done.set_result(result)


class DraftBatcher(StepBatcher):
    """Dynamic-cache sessions' steps as one ragged forward."""

    def __init__(self, model: PreTrainedModel, max_batch: int):
        super().__init__(max_batch, name="draft-batch")
        self._block = Block.whole(model)
        self._block.max_positions = None  # a draft may guess past its training length, as it does alone

    def step(self, cache: DynamicCache, start_pos: int, tokens: list[int]) -> torch.Tensor:
        """The logits after `tokens`, written at start_pos.. into `cache` (cropped to
        start_pos first), once the batch holding this step has run."""
        return self._submit(Row(cache, start_pos, torch.tensor(tokens, dtype=torch.long)))

    def _run(self, rows: list[Row]) -> list[torch.Tensor]:
        return [logits[-1] for logits in forward_batch(self._block, rows, logits=True)]
