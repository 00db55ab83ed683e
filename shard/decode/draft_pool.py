"""Many sessions' draft steps as one forward over a pool of static caches, on a GPU one
CUDA graph per shape (issue 13: the coordinator's drafts batched too).

A 1B draft's single-token step reads all its weights for one token: sixteen sessions
drafting through graphed slots of their own (shard.decode.static_draft) read them sixteen
times. Here the sessions' caches are the rows of one KVPool (static_kv), and a step runs
the rows of every session with a step waiting at once: each reads its token at its
position, over its own cache only.

A step runs the pool's first b rows, b the smallest row bucket (1, 4, 16, ... up to the
pool's size) that holds every stepping row; rows in it with no step stand at their scratch
slot, their result discarded. On an H200 a 1B-shaped step of 16 rows costs 2.6x one of a
single row (docs/batching.md), so a session drafting alone must not pay for sixteen: rows
are lent lowest first, so that few sessions run few rows. Row buckets and the length
buckets of shard.decode.static_draft make the shapes, each captured as a graph at start-up.

Sessions step from threads of their own, and shard.decode.draft_batch's StepBatcher gathers
their steps: a batch runs once every session inside a proposal has its next step queued.
A step's inputs go to the device from pinned memory and its picks come back the same way,
one wait per step for all the sessions in it. Prompts are written eagerly into the
session's own row (a view of the pool), on a stream of its own, outside any batch.

A draft's guesses need not be bit-stable, the output is what verification accepts: beside
other sessions a step may run a larger shape than alone (more rows, a longer extent) and
round differently. On a CPU the same code runs eagerly (what CI checks against the
dynamic-cache draft)."""

from __future__ import annotations

import torch

from shard.decode.draft_batch import StepBatcher
from shard.decode.static_draft import (CATCH_UP_STEPS, capture_steps, decoder_layers, forward_static, new_stream,
                                       on_stream, prefill, step_layers)
from shard.model.block import kv_head_shape
from shard.model.static_kv import KVPool, bucket_for, length_buckets, slot_count

ROW_BUCKET_GROWTH = 4  # each row bucket holds this many times the last: 1, 4, 16, ...


def row_buckets(size: int) -> list[int]:
    """Batch sizes a pool of `size` rows steps in: powers of ROW_BUCKET_GROWTH below it, and it."""
    buckets, rows = [], 1
    while rows < size:
        buckets.append(rows)
        rows *= ROW_BUCKET_GROWTH
    return buckets + [size]


class DraftPool(StepBatcher):
    """`size` sessions' static caches as one KVPool, their steps run together; graphed when
    `capture`, the layers compiled by torch.compile first when `compiled`."""

    @torch.inference_mode()  # pool tensors are inference tensors, used only in inference mode
    def __init__(self, model, size: int, capacity: int, *, capture: bool, compiled: bool = False):
        super().__init__(size, name="draft-pool")
        self.model, self.capacity = model, capacity
        device, config = model.device, model.config
        kv_heads, head_dim = kv_head_shape(config)
        self.kv = KVPool.allocate(size=size, num_layers=config.num_hidden_layers, kv_heads=kv_heads,
                                  head_dim=head_dim, capacity=capacity, dtype=model.dtype, device=device)
        self.rows_buckets = row_buckets(size)
        self._batches = {rows: self.kv.first_rows(rows) for rows in self.rows_buckets}
        self.kv_index = torch.arange(slot_count(capacity), device=device)
        self.ids = torch.zeros((size, 1), dtype=torch.int64, device=device)
        self.positions = torch.zeros((size, 1), dtype=torch.int64, device=device)
        pinned = device.type == "cuda"
        self._host_ids, self._host_positions, self._host_picks = (
            torch.zeros((size, 1), dtype=torch.int64, pin_memory=pinned) for _ in range(3))
        self.stream = new_stream(device)
        self.buckets = length_buckets(capacity)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # by (rows, length bucket)

        def build(layers: list) -> list:
            self.step_layers = layers
            if capture:
                # The warm-up steps stand every row at its scratch slot: no session's KV is touched.
                self.graphs = {(rows, bucket): graph for rows in self.rows_buckets for bucket, graph in capture_steps(
                    self.buckets, self.stream, self._all_at_scratch, lambda: self._step_eager(rows)).items()}
            return layers

        shapes = len(decoder_layers(model)) * len(self.buckets) * len(self.rows_buckets)
        step_layers(model, compiled=compiled, shapes=shapes, build=build)
        self.rows = [PoolRow(self, index) for index in range(size)]

    def step(self, row: int, token: int, position: int) -> int:
        """Row `row` reads `token` at `position`: its pick, once the batch holding it has run."""
        return self._submit((row, token, position))

    @torch.inference_mode()
    def _run(self, steps: list[tuple[int, int, int]]) -> list[int]:
        ids, positions = self._host_ids, self._host_positions
        ids.zero_()
        positions.fill_(self.capacity)
        for row, token, position in steps:
            ids[row, 0], positions[row, 0] = token, position
        rows = bucket_for(self.rows_buckets, 1 + max(row for row, _, _ in steps))
        bucket = bucket_for(self.buckets, 1 + max(position for _, _, position in steps))
        with on_stream(self.stream):
            # Pinned sources: the copies need not wait; the host buffers are next written
            # only after this step's wait below.
            self.ids.copy_(ids, non_blocking=True)
            self.positions.copy_(positions, non_blocking=True)
            self._batches[rows].visible = bucket
            graph = self.graphs.get((rows, bucket))
            if graph is not None:
                graph.replay()
            else:
                self._step_eager(rows)
            self._host_picks.copy_(self.ids, non_blocking=True)
            if self.stream is not None:
                self.stream.synchronize()
        return [int(self._host_picks[row, 0]) for row, _, _ in steps]

    def _all_at_scratch(self, bucket: int) -> None:
        for batch in self._batches.values():
            batch.visible = bucket
        self.positions.fill_(self.capacity)

    def _step_eager(self, rows: int) -> None:
        batch, ids, positions = self._batches[rows], self.ids[:rows], self.positions[:rows]
        batch.write_slots = positions
        logits = forward_static(self.model, self.step_layers, batch.layers, self.kv_index[:batch.visible], ids,
                                positions)
        ids.copy_(logits.argmax(-1, keepdim=True))


class PoolRow:
    """A session's row of a DraftPool: its cache (a view of the pool's) and its steps, run
    with the other sessions'."""

    def __init__(self, pool: DraftPool, index: int):
        self.pool, self.index, self.capacity = pool, index, pool.capacity
        self.kv = pool.kv.caches[index]
        self.stream = new_stream(pool.model.device)  # for prompts, beside the pool's steps

    def decode(self, feed: list[int], start: int, n: int, forced: list[int] | None) -> list[int]:
        """Read `feed` at start.., then propose n tokens (reading forced[i] after the i-th
        instead of its own pick, when `forced`)."""
        pool = self.pool
        if len(feed) > CATCH_UP_STEPS:
            self.kv.visible = bucket_for(pool.buckets, start + len(feed))
            with on_stream(self.stream):
                prefill(pool.model, self.kv, pool.kv_index, feed[:-1], start)
            if self.stream is not None:
                self.stream.synchronize()  # the pool's stream reads these slots next
            start += len(feed) - 1
            feed = feed[-1:]
        with pool.proposing():
            for token in feed:
                pick = pool.step(self.index, token, start)
                start += 1
            proposal = [pick]
            for i in range(1, n):
                proposal.append(pool.step(self.index, proposal[-1] if forced is None else forced[i - 1], start))
                start += 1
        return proposal
