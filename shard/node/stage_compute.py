"""A stage's compute: one thread that loads the block, allocates its KV store and runs
validated frames in arrival order, fencing stale epochs, and hands each output frame to
the stage's outbound edge. Frames of different sessions that wait for it together run as
one batched forward (continuous batching; each frame's result and error stay its own).

A verify chunk (not a prompt) that finds the thread idle, of the only session the stage
holds, runs at once on the event loop that took it in: with nothing to batch it with, the
hand-off to the thread and back only cost two wake-ups (~0.14 ms a hop with an 8B-shaped
model on an H200, more on a small CPU). With other sessions, it goes to the thread, where
it can batch.

Lifecycle, as in vLLM: load the block -> allocate the KV store (static: preallocate the
sessions' caches and capture the CUDA graphs) -> serve frames. Everything that touches
the block or the KV store runs one job at a time, in order, so neither needs a lock: on
the compute thread, or on the loop while the thread has nothing queued or running (and
then nothing else can be posted: posts come from the loop)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from shard.errors import ShardError
from shard.model.block import Block, CacheGapError
from shard.model.batch import Row, forward_batch
from shard.model.static_block import StaticBlock
from shard.node.kv_store import KVStore, Session
from shard.node.resources import memory_report
from shard.node.serial_thread import SerialThread
from shard.node.tail_sampling import ChunkSampling, choose_tokens, encode_choices
from shard.telemetry import context_of, tracer
from shard.v1 import frame_pb2
from shard.wire.codec import WireTensor, encode_data, encode_ids, encode_tensor, tensor_data

log = logging.getLogger(__name__)

K = frame_pb2  # frame kinds, shorter at the call sites
_COMPUTED = (K.FRAME_KIND_FORWARD, K.FRAME_KIND_REPLAY)  # the kinds an epoch fences

# Errors that belong to one session (it fails, the stage goes on), most specific first:
# CacheGapError may well be a ValueError too. A ShardError carries its own code.
_SESSION_ERROR_CODES = (
    (CacheGapError, grpc.StatusCode.FAILED_PRECONDITION),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


# The decode size first: 5 = the coordinator's default spec_k 4 plus one, so that a plain
# decode step and a verify chunk run in the same shape; then prefill buckets.
DEFAULT_CHUNK_SIZES = (5, 16, 64, 256)
DEFAULT_SESSION_POSITIONS = 4096
# Chunks in one batched forward at most: past a few the forward's cost grows with the rows.
DEFAULT_MAX_BATCH = 16
# The longest chunk run at once on the event loop (a verify chunk, K + 1 for K up to 15): a
# prompt goes to the thread, as its forward could hold the loop, and with it the node's
# heartbeats and health, for seconds on a CPU.
AT_ONCE_MAX_TOKENS = 16


@dataclass(frozen=True)
class KVLayout:
    """How the stage keeps sessions' KV. Dynamic: caches that grow and shrink with their
    positions (the CPU default, what CI tests against transformers). Static: each session's
    cache preallocated to `session_positions` (default: the model's context, at most
    DEFAULT_SESSION_POSITIONS), chunks run padded to `chunk_sizes`, as CUDA graphs on a GPU
    unless not `graphs` (the CUDA default), of layers compiled by torch.compile unless not
    `compiled`. With `batch` > 1, static: the decode-size chunks (the first chunk size) of
    up to `batch` sessions run as one forward over a pool of that many caches, the most
    the stage then holds; every decode chunk runs in that shape, so a session's tokens do
    not depend on the sessions beside it (static_block)."""

    static: bool = False
    session_positions: int | None = None
    chunk_sizes: tuple[int, ...] = DEFAULT_CHUNK_SIZES
    graphs: bool = True
    compiled: bool = True
    batch: int = 0


@dataclass(frozen=True)
class BlockSpec:
    """Which block to load: decoder layers [start, end), with the embedding and the head
    where the block is first or last."""

    start: int
    end: int
    first: bool
    last: bool


@dataclass(frozen=True)
class _Queued:
    """A frame waiting for the compute thread: `_run_frame`'s arguments."""

    header: frame_pb2.FrameHeader
    body: object
    on_done: Callable[[frame_pb2.FrameHeader], None]
    arrived_ns: int


def _batchable(header, body) -> bool:
    """A verify chunk whose tokens are argmax ids: a sampling tail chooses from each
    chunk's logits, which the batched forward does not keep."""
    return header.kind == K.FRAME_KIND_FORWARD and body.sampling is None


class _BatchSelector:
    """Which queued frames may join a batch led by a verify chunk of `session_id`:
    batchable chunks of other sessions (of at most `max_tokens` tokens, if given), one per
    session, never overtaking an earlier frame of their own session (a session's frames
    run in order) nor a session's end."""

    def __init__(self, session_id: str, max_tokens: int | None):
        self._seen, self._max_tokens = {session_id}, max_tokens

    def __call__(self, args: tuple) -> bool | None:
        header, body = args[0], args[1]
        if header.kind == K.FRAME_KIND_END:
            return None  # it frees room (a pooled cache) that the frames behind it may count on
        fits = self._max_tokens is None or header.num_tokens <= self._max_tokens
        take = _batchable(header, body) and fits and header.session_id not in self._seen
        self._seen.add(header.session_id)
        return take


@dataclass(frozen=True)
class ForwardStep:
    """A FORWARD frame's validated input, and at the tail how to choose its tokens
    (None: argmax ids)."""

    input: WireTensor
    sampling: ChunkSampling | None = None


@dataclass(frozen=True)
class ReplayStep:
    """What this stage does with a REPLAY frame, given its place in the ring."""

    input: WireTensor | None  # this stage replaced a lost one: it computes the positions from this
    feeds_next: bool  # the next stage computes them: send it this stage's outputs for them


class StageCompute:
    def __init__(self, node_id: str, *, model_dir: str, device: str, dtype: torch.dtype | None,
                 memory_budget_bytes: int, max_sessions: int, session_idle_seconds: float, progress: bool,
                 send: Callable[[frame_pb2.Frame], None], call_on_loop: Callable[..., None],
                 kv_layout: KVLayout = KVLayout(), max_batch: int = DEFAULT_MAX_BATCH):
        """`send(frame)` and `call_on_loop(fn, *args)` are called from whichever thread computes
        and hand over to the event loop (thread-safe, no wait). Up to `max_batch` waiting chunks
        of different sessions run as one forward (1: one at a time)."""
        self.node_id = node_id
        self._model_dir, self._device, self._dtype, self._progress = model_dir, device, dtype, progress
        self._memory_budget = memory_budget_bytes
        self._max_sessions, self._idle_seconds = max_sessions, session_idle_seconds
        self._send, self._call_on_loop = send, call_on_loop
        self.kv_layout = kv_layout
        self.max_batch = max_batch
        self.block: Block | None = None
        self.runner: Block | StaticBlock | None = None  # what runs chunks: the block, or it over static KV
        self.kv: KVStore | None = None
        self.spec: BlockSpec | None = None
        # New sessions belong to this coordinator incarnation.
        self._incarnation = ""
        self._min_epoch: dict[str, int] = {}
        self._thread = SerialThread(f"{node_id}-compute")
        self.frames_processed = 0
        self.frames_dropped_stale = 0
        self.compute_seconds = 0.0
        self.positions_computed = 0  # of verify chunks
        self.positions_replayed = 0  # of REPLAY frames: rebuilding KV after a fail-over
        self.frames_batched = 0  # verify chunks that ran in a forward with other sessions' chunks
        self.largest_batch = 0  # most chunks in one forward
        self.forwards = 0  # forwards that ran verify chunks: one per batch

    # ---- lifecycle: load -> allocate KV -> serve ----------------------------------

    async def load(self, spec: BlockSpec) -> None:
        """Load the block and allocate a fresh KV store for it (the old block's KV is void)."""
        self.block = None
        await asyncio.wrap_future(self._thread.post(self._load, spec))

    def _load(self, spec: BlockSpec) -> None:
        log.info("%s loading layers [%d, %d)%s%s", self.node_id, spec.start, spec.end,
                 " + embedding" if spec.first else "", " + head" if spec.last else "")
        self.runner = self.kv = None  # the old block's graphs and caches go before the new block comes
        block = Block.load(self._model_dir, spec.start, spec.end, first=spec.first, last=spec.last,
                           device=self._device, dtype=self._dtype, progress=self._progress)
        self.kv = self._allocate_kv(block)
        self.block, self.spec = block, spec
        self._min_epoch.clear()

    def _allocate_kv(self, block: Block) -> KVStore:
        budget = max(self._memory_budget - block.weight_bytes, 0)
        if block.kv_bytes_per_position and budget < block.kv_bytes_per_position:
            log.warning("%s: the block's %d bytes of weights leave no room for KV in a budget of %d bytes",
                        self.node_id, block.weight_bytes, self._memory_budget)
        # Every stage but the tail keeps what it sends on, to feed a stage that replaces its successor.
        outputs = 0 if block.is_last else block.hidden_size * block.dtype.itemsize
        if not self.kv_layout.static:
            self.runner = block
            return KVStore(block.new_cache, bytes_per_position=block.kv_bytes_per_position, budget_bytes=budget,
                           max_sessions=self._max_sessions, idle_seconds=self._idle_seconds,
                           output_bytes_per_position=outputs)
        layout = self.kv_layout
        context = block.max_positions or DEFAULT_SESSION_POSITIONS
        capacity = min(layout.session_positions or DEFAULT_SESSION_POSITIONS, context)
        if layout.session_positions and layout.session_positions > context:
            log.warning("%s: sessions hold at most the model's %d positions, not %d", self.node_id, context,
                        layout.session_positions)
        graphs = layout.graphs and block.device.type == "cuda"
        session_bytes = StaticBlock.bytes_per_session(block, capacity)
        # Graphs are captured on caches at fixed addresses, and a batch runs over a pool: as
        # many as the budget holds (and a batch takes), made now.
        pool = min(self._max_sessions, budget // session_bytes) if block.num_layers else 0
        batched = layout.batch > 1 and pool > 0
        if batched:
            pool = min(pool, layout.batch)
        elif layout.batch > 1 and block.num_layers:
            log.warning("%s: no room for one session's KV cache, so no batch", self.node_id)
        pool = pool if graphs or batched else 0
        runner = StaticBlock(block, capacity=capacity, chunk_sizes=layout.chunk_sizes, pool_size=pool,
                             compiled=layout.compiled, batched=batched)
        began = time.perf_counter()
        runner.capture()
        if runner.graphed:
            log.info("%s captured %d CUDA graphs (%d caches, chunk sizes %s%s) in %.1f s; %s", self.node_id,
                     runner.graph_count, pool, runner.chunk_sizes,
                     f", {runner.batch_chunk} batched" if batched else "", time.perf_counter() - began,
                     memory_report(block.device, block.weight_bytes, budget, pool * session_bytes))
        self.runner = runner
        # A batched stage holds only its pool: a session outside it would run another shape.
        max_sessions = pool if batched else self._max_sessions
        return KVStore(runner.new_cache, bytes_per_position=block.kv_bytes_per_position, budget_bytes=budget,
                       max_sessions=max_sessions, idle_seconds=self._idle_seconds,
                       session_positions=capacity, session_bytes=session_bytes, release=runner.release,
                       output_bytes_per_position=outputs)

    def attention_slots(self, session: Session) -> int:
        """The cache slots a session's decode chunks attend over; 0 on dynamic KV."""
        return self.runner.attention_slots(session.cache)

    def submit(self, header: frame_pb2.FrameHeader, body, on_done: Callable[[frame_pb2.FrameHeader], None]) -> None:
        """Run (see the module's docstring) or queue a validated frame; `on_done(header)`
        runs on the loop once it is through."""
        if self._runs_at_once(header, body):
            try:
                self._run_frame(header, body, on_done, time.time_ns())
            except Exception:  # a bug (a chunk's own errors become ERROR frames): it must not end the stream
                log.exception("%s failed a frame of %s", self.node_id, header.session_id)
        else:
            self._thread.post(self._run_frame, header, body, on_done, time.time_ns())

    def _runs_at_once(self, header, body) -> bool:
        """A verify chunk with nothing to batch with, now or soon: the thread is idle, and
        no other session holds KV here."""
        if not (self._thread.idle() and _batchable(header, body) and header.num_tokens <= AT_ONCE_MAX_TOKENS):
            return False
        sessions = len(self.kv)
        return sessions == 0 or (sessions == 1 and self.kv.get(header.session_id) is not None)

    # ---- sessions -----------------------------------------------------------------

    async def follow_coordinator(self, incarnation: str) -> list[str]:
        """Sessions of any other coordinator incarnation (every one for "", no coordinator)
        are void: free them; new sessions belong to `incarnation`. Returns the freed ids."""
        return await asyncio.wrap_future(self._thread.post(self._follow_coordinator, incarnation))

    def _follow_coordinator(self, incarnation: str) -> list[str]:
        self._incarnation = incarnation
        dropped = self.kv.drop_other_incarnations(incarnation) if self.kv else []
        for session_id in dropped:
            self._min_epoch.pop(session_id, None)
        return dropped

    def cancel_epoch(self, session_id: str, epoch: int) -> int:
        """Skip this session's queued frames of an epoch below `epoch`; how many are queued."""
        self._min_epoch[session_id] = max(epoch, self._min_epoch.get(session_id, 0))
        queued = [args[0] for fn, args in self._thread.queued() if fn == self._run_frame]
        return sum(1 for h in queued
                   if h.session_id == session_id and h.kind in _COMPUTED and h.epoch < epoch)

    async def end_session(self, session_id: str) -> int | None:
        """Free a session's KV cache; the bytes freed, None if this stage does not hold it."""
        return await asyncio.wrap_future(self._thread.post(self._end_session, session_id))

    def _end_session(self, session_id: str) -> int | None:
        self._min_epoch.pop(session_id, None)
        return self.kv.pop(session_id) if self.kv else None

    async def expire_idle(self) -> list[str]:
        """Free the sessions idle past their time; returns their ids."""
        return await asyncio.wrap_future(self._thread.post(self._expire_idle))

    def _expire_idle(self) -> list[str]:
        return self.kv.expire_idle() if self.kv else []

    # ---- frames -------------------------------------------------------------------

    def _run_frame(self, header, body, on_done: Callable[[frame_pb2.FrameHeader], None],
                   arrived_ns: int) -> None:
        """One queued frame, with the verify chunks of other sessions queued behind it when
        it is one: they run as one forward. A frame that carries a trace context gets a
        span from its arrival to its output's hand-off to the loop."""
        frames = [_Queued(header, body, on_done, arrived_ns)]
        rows, max_tokens = self._batch_room(header, body)
        if rows > 1:
            taken = self._thread.take(self._run_frame, _BatchSelector(header.session_id, max_tokens), rows - 1)
            frames += [_Queued(*args) for args in taken]
        spans = [self._span(frame) for frame in frames]
        try:
            try:
                if len(frames) == 1:
                    outs = [self._process(header, body, spans[0])]
                else:
                    outs = self._process_batch(frames, spans)
            finally:
                for span in spans:
                    span.end()  # before the hand-off: the traversal may end right after it
            for out in outs:
                if out is not None:
                    self._send(out)
        finally:
            for frame in frames:
                self._call_on_loop(frame.on_done, frame.header)

    def _batch_room(self, header, body) -> tuple[int, int | None]:
        """How many chunks a batch led by this frame may hold (1: it runs alone), and the
        most tokens each may have (None: any)."""
        if not _batchable(header, body):
            return 1, None
        if self.runner is self.block:
            return self.max_batch, None
        runner = self.runner
        if runner.batch_chunk is not None and header.num_tokens <= runner.batch_chunk:
            return runner.batch_rows, runner.batch_chunk
        return 1, None

    def _span(self, frame: _Queued) -> trace.Span:
        header = frame.header
        context = context_of(header)
        return trace.INVALID_SPAN if context is None else tracer.start_span(
            "shard.stage", context=context, start_time=frame.arrived_ns, attributes={
                "shard.node": self.node_id, "shard.session": header.session_id, "shard.chunk": header.chunk_id,
                "shard.start_pos": header.start_pos, "shard.tokens": header.num_tokens,
                "shard.frame_kind": K.FrameKind.Name(header.kind),
                "shard.layers": f"[{self.spec.start}, {self.spec.end})"})

    def _process(self, header, body, span: trace.Span) -> frame_pb2.Frame | None:
        """What to send on for one frame, if anything."""
        if header.kind == K.FRAME_KIND_END:
            self._end_session(header.session_id)
            return None if self.spec.last else frame_pb2.Frame(header=header)
        if header.kind == K.FRAME_KIND_ERROR:
            return frame_pb2.Frame(header=header, payload=body)
        if self._fenced(header, span):
            return None
        began = time.perf_counter()
        try:
            if header.kind == K.FRAME_KIND_REPLAY:
                output = self._replay(header, body)
            else:
                output = self._forward(header, body.input, header.num_outputs, body.sampling)
                self.positions_computed += header.num_tokens
        except Exception as error:
            return self._failed(header, error, span)
        seconds = time.perf_counter() - began
        span.set_attribute("shard.compute_seconds", seconds)
        if header.kind == K.FRAME_KIND_FORWARD:  # per-chunk figures stay those of verify chunks
            self.frames_processed += 1
            self.forwards += 1
            self.compute_seconds += seconds
        return self._result(header, output)

    def _process_batch(self, frames: list[_Queued], spans: list[trace.Span]) -> list[frame_pb2.Frame | None]:
        """What to send on for each of several sessions' verify chunks, run as one forward.
        A chunk that cannot run (fenced, over the budget, a gap) fails or drops alone."""
        outs: list[frame_pb2.Frame | None] = [None] * len(frames)
        ready: list[tuple[int, Session, Row]] = []
        for index, (frame, span) in enumerate(zip(frames, spans)):
            header = frame.header
            if self._fenced(header, span):
                continue
            try:
                session, tensor = self._prepare(header, frame.body.input, header.num_outputs)
                if self.runner is not self.block:  # a static batch fails whole: check each row first
                    self.runner.check_room(session.cache, header.start_pos, header.num_tokens)
            except Exception as error:
                outs[index] = self._failed(header, error, span)
                continue
            # Claimed now, so that the next chunk's reservation counts this one's positions.
            self.kv.record(session, header.start_pos + header.num_tokens)
            ready.append((index, session, Row(session.cache, header.start_pos, tensor, header.num_outputs)))
        began = time.perf_counter()
        try:
            try:
                results: list[torch.Tensor | Exception] = self._forward_rows([row for _, _, row in ready])
            except Exception:  # a bug: run them one by one, so that it costs only the chunk that has it
                log.exception("%s failed a batch of %d chunks; running them one at a time", self.node_id, len(ready))
                results = [self._alone(row) for _, _, row in ready]
            for (index, session, _), result in zip(ready, results):
                header = frames[index].header
                if isinstance(result, Exception):
                    outs[index] = self._failed(header, result, spans[index])
                    continue
                outs[index] = self._result(header, self._encode(header, session, result))
                self.positions_computed += header.num_tokens
                self.frames_processed += 1
        finally:
            for _, session, _ in ready:
                self.kv.record(session, self.runner.cache_length(session.cache))
        seconds = time.perf_counter() - began
        for index, _, _ in ready:
            spans[index].set_attribute("shard.compute_seconds", seconds)
            spans[index].set_attribute("shard.batch", len(ready))
        self.compute_seconds += seconds  # the stage's busy time: the forward once, not per chunk
        self.forwards += 1 if ready else 0
        if len(ready) > 1:
            self.frames_batched += len(ready)
            self.largest_batch = max(self.largest_batch, len(ready))
        return outs

    def _forward_rows(self, rows: list[Row]) -> list[torch.Tensor]:
        if self.runner is self.block:
            return forward_batch(self.block, rows)
        return self.runner.forward_rows(rows)

    def _alone(self, row: Row) -> torch.Tensor | Exception:
        try:
            return self._forward_rows([row])[0]
        except Exception as error:
            return error

    def _fenced(self, header, span: trace.Span) -> bool:
        """Whether the frame's epoch was cancelled out of band (it is dropped)."""
        if header.epoch < self._min_epoch.get(header.session_id, 0):
            self.frames_dropped_stale += 1
            span.set_attribute("shard.dropped", True)
            return True
        return False

    def _failed(self, header, error: Exception, span: trace.Span) -> frame_pb2.Frame:
        if not isinstance(error, (ShardError, CacheGapError, ValueError)):
            # A bug: it must cost one session, not the node.
            log.error("%s failed a chunk of %s", self.node_id, header.session_id, exc_info=error)
        span.set_status(Status(StatusCode.ERROR, str(error)))
        return self._error_frame(header, error)

    def _result(self, header, output: bytes) -> frame_pb2.Frame:
        out = frame_pb2.FrameHeader()
        out.CopyFrom(header)
        if self.spec.last:
            out.kind = K.FRAME_KIND_RESULT
        return frame_pb2.Frame(header=out, payload=output)

    def _forward(self, header, wire: WireTensor, num_outputs: int, sampling: ChunkSampling | None = None) -> bytes:
        """Run the chunk through the block; its output in wire form. A sampling tail chooses
        the chunk's tokens from its logits."""
        if sampling is not None and self.runner is not self.block:
            raise ShardError(grpc.StatusCode.UNIMPLEMENTED,
                             f"{self.node_id} runs on static KV (--kv static), whose graphs return argmax ids "
                             f"only: sampling and logprobs need a tail with --kv dynamic")
        session, tensor = self._prepare(header, wire, num_outputs)
        try:
            input_ids, hidden = self._inputs(tensor)
            output = self.runner.forward(session.cache, header.start_pos, input_ids=input_ids, hidden=hidden,
                                         num_outputs=num_outputs, logits=sampling is not None)
            if sampling is not None:
                n = header.num_tokens
                first_chosen = header.start_pos + n - (num_outputs or n) + 1  # the position row 0 chooses
                return encode_choices(choose_tokens(output, sampling, first_chosen), sampling.spec_sha256)
            return self._encode(header, session, output)
        finally:
            self.kv.record(session, self.runner.cache_length(session.cache))

    def _prepare(self, header, wire: WireTensor, num_outputs: int) -> tuple[Session, torch.Tensor]:
        """The chunk's input tensor, checked, and its session with room reserved for its
        positions: a chunk that cannot run fails here, before it holds anything."""
        kv, block = self.kv, self.block
        tensor = wire.to_torch()
        block.check_chunk(header.start_pos, *self._inputs(tensor), num_outputs)
        if kv.get(header.session_id) is None and header.start_pos > 0:
            raise CacheGapError(f"{self.node_id} holds no session {header.session_id!r} "
                                f"to continue at position {header.start_pos}")
        # Reserved before computing, so that a chunk over the budget costs nothing.
        session = kv.reserve(header.session_id, self._incarnation, header.start_pos + header.num_tokens,
                             header.session_positions)
        if self.runner is block:  # the static runner stages its inputs itself, through pinned memory
            tensor = tensor.to(block.device)
        return session, tensor

    def _inputs(self, tensor: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(input_ids, hidden) for the block."""
        return (tensor, None) if self.block.is_first else (None, tensor)

    def _encode(self, header, session: Session, output: torch.Tensor) -> bytes:
        """The block's output in wire form; a block that is not the tail keeps its rows
        with the session."""
        if self.block.is_last:
            return encode_tensor(output)
        rows = tensor_data(output)
        self.kv.keep_outputs(session, header.start_pos, rows)
        return encode_data(output.dtype, list(output.shape), rows)

    def _replay(self, header, step: ReplayStep) -> bytes:
        """A REPLAY frame: compute its positions where this stage replaced a lost one (the
        others kept their KV), and pass on what the next stage needs: this stage's outputs
        for them when it computes them too, else the header alone. The tail answers with
        no ids: the replay is through."""
        n, output = header.num_tokens, b""
        if step.input is not None:
            output = self._forward(header, step.input, num_outputs=1)
            self.positions_replayed += n
        elif step.feeds_next:
            rows = self.kv.outputs(header.session_id, header.start_pos, n)
            output = encode_data(self.block.dtype, [n, self.block.hidden_size], rows)
        if self.spec.last:
            return encode_ids([])
        return output if step.feeds_next else b""

    def _error_frame(self, header, error: Exception) -> frame_pb2.Frame:
        code = error.code if isinstance(error, ShardError) else next(
            (c for kind, c in _SESSION_ERROR_CODES if isinstance(error, kind)), grpc.StatusCode.INTERNAL)
        detail = frame_pb2.ErrorDetail(code=code.value[0], message=f"{self.node_id}: {error}",
                                       node_id=self.node_id)
        out = frame_pb2.FrameHeader()
        out.CopyFrom(header)
        out.kind = K.FRAME_KIND_ERROR
        return frame_pb2.Frame(header=out, payload=detail.SerializeToString())

    def close(self) -> None:
        self._thread.close()
