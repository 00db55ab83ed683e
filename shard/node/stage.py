"""A stage's runtime: follow the plan, hold one block, run chunks in arrival order and
push each result to the next node on the ring.

Lifecycle: join → receive plan → load block → serve. Frames are validated as they arrive
(a malformed frame is the sender's bug and is rejected on its edge); problems that belong
to one session (a KV gap, too many sessions) travel on to the coordinator as an ERROR
frame, so only that session fails and the edge keeps flowing."""

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
from shard.model.checkpoint import Checkpoint
from shard.node.serial_thread import SerialThread
from shard.node.sessions import SessionStore, TooManySessions
from shard.telemetry import context_of, tracer
from shard.v1 import frame_pb2, registry_pb2, stage_pb2
from shard.wire.codec import CodecError, WireTensor, encode_tensor, parse_tensor
from shard.wire.edge import Edge, EdgeBroken
from shard.wire.inbound import Inbound, InboundError
from shard.wire.tls import NodeTLS

log = logging.getLogger(__name__)

K = frame_pb2  # frame kinds, shorter at the call sites

# Most specific first: CacheGapError may well be a ValueError too.
_SESSION_ERROR_CODES = (
    (CacheGapError, grpc.StatusCode.FAILED_PRECONDITION),
    (TooManySessions, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


@dataclass(frozen=True)
class Assignment:
    index: int
    ring_size: int
    start: int
    end: int
    first: bool
    last: bool
    upstream_id: str
    downstream_id: str
    downstream_address: str
    coordinator_id: str
    coordinator_address: str


def assignment_from_plan(plan: registry_pb2.Plan, node_id: str,
                         previous: Assignment | None = None) -> Assignment | None:
    stages = list(plan.stages)
    index = next((i for i, s in enumerate(stages) if s.node_id == node_id), None)
    if index is None:
        return None
    coordinator_id, coordinator_address = plan.coordinator_id, plan.coordinator_address
    if not coordinator_id and previous is not None:
        # A plan made before the coordinator (re)joined, e.g. by a restarted registry that
        # adopted the ring: the coordinator is not known yet, which is not the same as gone.
        coordinator_id, coordinator_address = previous.coordinator_id, previous.coordinator_address
    last = index == len(stages) - 1
    nxt = None if last else stages[index + 1]
    return Assignment(
        index=index,
        ring_size=len(stages),
        start=stages[index].layer_start,
        end=stages[index].layer_end,
        first=index == 0,
        last=last,
        upstream_id=coordinator_id if index == 0 else stages[index - 1].node_id,
        downstream_id=coordinator_id if last else nxt.node_id,
        downstream_address=coordinator_address if last else nxt.address,
        coordinator_id=coordinator_id,
        coordinator_address=coordinator_address,
    )


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class StageNode:
    def __init__(
        self,
        *,
        node_id: str,
        model_dir: str,
        tls: NodeTLS | None,
        secrets: list[bytes] | None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_sessions: int = 64,
        idle_seconds: float = 600.0,
        progress: bool = True,
    ):
        self.node_id = node_id
        self.checkpoint = Checkpoint.open(model_dir)
        self._model_dir, self._tls, self._device, self._dtype = model_dir, tls, device, dtype
        self._secret = secrets[0] if secrets else None
        self.inbound = Inbound(node_id, secrets)
        self._max_sessions, self._idle_seconds, self._progress = max_sessions, idle_seconds, progress
        self.block: Block | None = None
        self.assignment: Assignment | None = None
        self.sessions: SessionStore | None = None
        self.plan_version = 0
        self._downstream: Edge | None = None
        # Told (receiver id, detail) when the edge downstream cannot reach its receiver.
        self.on_unreachable: Callable[[str, str], None] | None = None
        self._min_epoch: dict[str, int] = {}
        # Frames are computed (and blocks loaded) in order on one thread; what it produces
        # goes out through `_outbox`, in the same order, from the event loop.
        self._compute = SerialThread(f"{node_id}-compute")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[frame_pb2.Frame] = asyncio.Queue()
        self.frames_processed = 0
        self.frames_dropped_stale = 0
        self.compute_seconds = 0.0

    # ---- plan ---------------------------------------------------------------------

    async def apply_plan(self, plan: registry_pb2.Plan) -> bool:
        """Follow a new plan; returns True when this node serves a block in it."""
        assignment = assignment_from_plan(plan, self.node_id, self.assignment)
        self.plan_version = plan.version
        if assignment is None:
            return False
        old = self.assignment
        block_changed = old is None or (old.start, old.end, old.first, old.last) != (
            assignment.start, assignment.end, assignment.first, assignment.last)
        self._loop = asyncio.get_running_loop()  # where the compute thread sends its frames
        if block_changed:
            self.block = None
            self.block = await asyncio.wrap_future(self._compute.post(self._load_block, assignment))
            self.sessions = SessionStore(
                self.block.new_cache, max_sessions=self._max_sessions, idle_seconds=self._idle_seconds)
        if old is None or (old.downstream_id, old.downstream_address) != (
                assignment.downstream_id, assignment.downstream_address):
            if self._downstream is not None:
                await self._downstream.close()
            self._downstream = Edge(
                sender=self.node_id, receiver=assignment.downstream_id,
                address=assignment.downstream_address, tls=self._tls, secret=self._secret,
                to_coordinator=assignment.last, on_unreachable=self.on_unreachable)
        self.assignment = assignment
        return True

    def _load_block(self, a: Assignment) -> Block:
        log.info("%s loading layers [%d, %d)%s%s", self.node_id, a.start, a.end,
                 " + embedding" if a.first else "", " + head" if a.last else "")
        return Block.load(self._model_dir, a.start, a.end, first=a.first, last=a.last,
                          device=self._device, dtype=self._dtype, progress=self._progress)

    # ---- inbound ------------------------------------------------------------------

    def check_upstream(self, node_id: str | None) -> None:
        if node_id is not None and self.assignment and node_id != self.assignment.upstream_id:
            raise ShardError(grpc.StatusCode.PERMISSION_DENIED,
                                f"{node_id} is not the upstream of {self.node_id} "
                                f"(expected {self.assignment.upstream_id})")

    def accept(self, frame: frame_pb2.Frame, peer_id: str | None,
               on_done: Callable[[frame_pb2.FrameHeader], None] = lambda header: None) -> None:
        """Open, validate and queue a frame from `peer_id`; raises ShardError for a
        forged or malformed one. `on_done(header)` is called on the event loop once the
        compute thread is through with the frame, after what it sends for it."""
        header = frame.header
        if self.block is None:
            raise ShardError(grpc.StatusCode.UNAVAILABLE, f"{self.node_id} has no block loaded yet")
        try:
            payload = self.inbound.open(frame, peer_id)
        except InboundError as error:
            raise ShardError(grpc.StatusCode.UNAUTHENTICATED, f"{error.reason}: {error}") from None
        if not header.session_id:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "frame has no session_id")
        if header.kind == K.FRAME_KIND_FORWARD:
            body = self._validated_input(header, payload)
        elif header.kind == K.FRAME_KIND_END:
            body = None
        elif header.kind == K.FRAME_KIND_ERROR:
            body = payload
        else:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a stage does not take frames of kind {K.FrameKind.Name(header.kind)}")
        self._compute.post(self._run_frame, header, body, on_done, time.time_ns())

    def _validated_input(self, header, payload: bytes) -> WireTensor:
        block, n = self.block, header.num_tokens
        if n == 0:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "chunk has no tokens")
        if header.num_outputs > n:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"num_outputs {header.num_outputs} exceeds the chunk's {n} tokens")
        try:
            tensor = parse_tensor(payload)
        except CodecError as error:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if block.is_first:
            expected_shape, expected_dtype = [n], torch.int64
        else:
            expected_shape, expected_dtype = [n, block.hidden_size], block.dtype
        if tensor.shape != expected_shape or tensor.dtype != expected_dtype:
            raise ShardError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.node_id} expects {expected_dtype} {expected_shape} for a {n}-token chunk, "
                f"got {tensor.dtype} {tensor.shape}")
        if block.is_first and not all(0 <= i < block.vocab_size for i in tensor.ints()):
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token ids must lie in [0, {block.vocab_size})")
        return tensor

    # ---- out of band --------------------------------------------------------------

    def cancel_epoch(self, session_id: str, epoch: int) -> int:
        self._min_epoch[session_id] = max(epoch, self._min_epoch.get(session_id, 0))
        queued = [args[0] for fn, args in self._compute.queued() if fn == self._run_frame]
        return sum(1 for h in queued
                   if h.session_id == session_id and h.kind == K.FRAME_KIND_FORWARD and h.epoch < epoch)

    def end_session(self, session_id: str) -> int:
        """Free a session's KV cache; KeyError if this stage does not hold it."""
        session = self.sessions.pop(session_id) if self.sessions else None
        self._min_epoch.pop(session_id, None)
        if session is None:
            raise KeyError(session_id)
        return cache_bytes(session.cache)

    def info(self) -> stage_pb2.InfoResponse:
        info = stage_pb2.InfoResponse(
            node_id=self.node_id, num_layers=self.checkpoint.num_layers,
            plan_version=self.plan_version, frames_processed=self.frames_processed,
            frames_dropped_stale=self.frames_dropped_stale, compute_seconds=self.compute_seconds)
        if self.block is not None:
            info.layer_start, info.layer_end = self.block.start, self.block.end
            info.weight_bytes = self.block.weight_bytes
        for session_id, session in (self.sessions.items() if self.sessions else []):
            info.sessions.add(session_id=session_id, kv_length=self.block.cache_length(session.cache),
                              kv_bytes=cache_bytes(session.cache))
        return info

    # ---- the worker ---------------------------------------------------------------

    async def run(self) -> None:
        """Send what the compute thread produces, in order; expire idle sessions."""
        expiry = asyncio.create_task(self._expire_idle_sessions())
        try:
            while True:
                frame = await self._outbox.get()
                try:
                    await self._downstream.send(frame)
                except EdgeBroken as error:
                    log.warning("%s dropped a frame of %s: %s", self.node_id, frame.header.session_id, error)
        finally:
            expiry.cancel()

    async def _expire_idle_sessions(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            # On the compute thread, which is the one that touches sessions.
            for session_id in await asyncio.wrap_future(self._compute.post(self._expire_idle)):
                log.info("%s freed idle session %s", self.node_id, session_id)

    def _expire_idle(self) -> list[str]:
        return self.sessions.expire_idle() if self.sessions else []

    def _emit(self, frame: frame_pb2.Frame) -> None:
        """From the compute thread: hand a frame to the loop for sending downstream."""
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, frame)

    def _run_frame(self, header, body, on_done: Callable[[frame_pb2.FrameHeader], None],
                   arrived_ns: int) -> None:
        """On the compute thread: one queued frame, in arrival order. A frame that carries a
        trace context gets a span from its arrival to its output's hand-off to the loop."""
        context = context_of(header)
        span = trace.INVALID_SPAN if context is None else tracer.start_span(
            "shard.stage", context=context, start_time=arrived_ns, attributes={
                "shard.node": self.node_id, "shard.session": header.session_id, "shard.chunk": header.chunk_id,
                "shard.start_pos": header.start_pos, "shard.tokens": header.num_tokens,
                "shard.frame_kind": K.FrameKind.Name(header.kind),
                "shard.layers": f"[{self.assignment.start}, {self.assignment.end})"})
        try:
            try:
                out = self._process(header, body, span)
            finally:
                span.end()  # before the hand-off: the traversal may end right after it
            if out is not None:
                self._emit(out)
        finally:
            self._loop.call_soon_threadsafe(on_done, header)

    def _process(self, header, body, span: trace.Span) -> frame_pb2.Frame | None:
        """What to send on for one frame, if anything."""
        if header.kind == K.FRAME_KIND_END:
            if self.sessions:
                self.sessions.pop(header.session_id)
            self._min_epoch.pop(header.session_id, None)
            if not self.assignment.last:
                return frame_pb2.Frame(header=header)
            return None
        if header.kind == K.FRAME_KIND_ERROR:
            return frame_pb2.Frame(header=header, payload=body)
        if header.epoch < self._min_epoch.get(header.session_id, 0):
            self.frames_dropped_stale += 1
            span.set_attribute("shard.dropped", True)  # cancelled out of band
            return None
        began = time.perf_counter()
        try:
            output = encode_tensor(self._compute_chunk(header, body))
        except Exception as error:
            if not isinstance(error, (CacheGapError, TooManySessions, ValueError)):
                # A bug: it must cost one session, not the node.
                log.exception("%s failed a chunk of %s", self.node_id, header.session_id)
            span.set_status(Status(StatusCode.ERROR, str(error)))
            return self._error_frame(header, error)
        seconds = time.perf_counter() - began
        self.frames_processed += 1
        self.compute_seconds += seconds
        span.set_attribute("shard.compute_seconds", seconds)
        out = frame_pb2.FrameHeader()
        out.CopyFrom(header)
        if self.assignment.last:
            out.kind = K.FRAME_KIND_RESULT
        return frame_pb2.Frame(header=out, payload=output)

    def _compute_chunk(self, header, wire: WireTensor) -> torch.Tensor:
        session = self.sessions.get(header.session_id)
        if session is None and header.start_pos > 0:
            raise CacheGapError(f"{self.node_id} holds no session {header.session_id!r} "
                                f"to continue at position {header.start_pos}")
        session = session or self.sessions.get_or_create(header.session_id)
        block = self.block
        tensor = wire.to_torch().to(block.device)
        if block.is_first:
            return block.forward(session.cache, header.start_pos, input_ids=tensor,
                                 num_outputs=header.num_outputs)
        return block.forward(session.cache, header.start_pos, hidden=tensor,
                             num_outputs=header.num_outputs)

    def _error_frame(self, header, error: Exception) -> frame_pb2.Frame:
        code = next((c for kind, c in _SESSION_ERROR_CODES if isinstance(error, kind)),
                    grpc.StatusCode.INTERNAL)
        detail = frame_pb2.ErrorDetail(code=code.value[0], message=f"{self.node_id}: {error}",
                                       node_id=self.node_id)
        out = frame_pb2.FrameHeader()
        out.CopyFrom(header)
        out.kind = K.FRAME_KIND_ERROR
        return frame_pb2.Frame(header=out, payload=detail.SerializeToString())

    async def close(self) -> None:
        if self._downstream is not None:
            await self._downstream.close()
        self._compute.close()
