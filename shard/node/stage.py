"""A stage's serving side: follow the plan, validate inbound frames, and push what the
compute thread (shard.node.stage_compute) produces to the next node on the ring.

Lifecycle: join -> receive plan -> load block -> allocate KV -> serve. Frames are validated
as they arrive (a malformed frame is the sender's bug and is rejected on its edge);
problems that belong to one session (a KV gap, no KV room) travel on to the coordinator as
an ERROR frame, so only that session fails and the edge keeps flowing. Sessions never
outlive their coordinator: a plan that names a new coordinator incarnation, or says the
coordinator was lost, frees the sessions of the one before."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from shard.errors import ShardError
from shard.metrics import NodeMetrics
from shard.model.checkpoint import Checkpoint
from shard.model.fingerprints import block_weights_sha256
from shard.node.notary import StageNotary
from shard.node.stage_compute import DEFAULT_MAX_BATCH, BlockSpec, ForwardStep, KVLayout, ReplayStep, StageCompute
from shard.node.tail_sampling import parse_spec
from shard.v1 import frame_pb2, registry_pb2, stage_pb2
from shard.wire.codec import CodecError, WireTensor, parse_tensor
from shard.wire.edge import Edge, EdgeBroken
from shard.wire.inbound import Inbound, InboundError
from shard.wire.seal import SealError
from shard.wire.spec_seal import open_spec
from shard.wire.signing import Signer
from shard.wire.tls import NodeTLS

log = logging.getLogger(__name__)

K = frame_pb2  # frame kinds, shorter at the call sites


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
    coordinator_incarnation: str

    @property
    def block(self) -> BlockSpec:
        return BlockSpec(self.start, self.end, self.first, self.last)


def assignment_from_plan(plan: registry_pb2.Plan, node_id: str,
                         previous: Assignment | None = None) -> Assignment | None:
    stages = list(plan.stages)
    index = next((i for i, s in enumerate(stages) if s.node_id == node_id), None)
    if index is None:
        return None
    coordinator = plan.coordinator_id, plan.coordinator_address, plan.coordinator_incarnation
    if not plan.coordinator_id and not plan.coordinator_lost and previous is not None:
        # A plan made before the coordinator (re)joined, e.g. by a restarted registry that
        # adopted the ring: the coordinator is not known yet, which is not the same as gone.
        coordinator = previous.coordinator_id, previous.coordinator_address, previous.coordinator_incarnation
    coordinator_id, coordinator_address, coordinator_incarnation = coordinator
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
        coordinator_incarnation=coordinator_incarnation,
    )



class StageNode:
    def __init__(
        self,
        *,
        node_id: str,
        model_dir: str,
        tls: NodeTLS | None,
        secrets: list[bytes] | None,
        memory_budget_bytes: int,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_sessions: int = 64,
        session_idle_seconds: float = 300.0,
        progress: bool = True,
        kv_layout: KVLayout = KVLayout(),
        max_batch: int = DEFAULT_MAX_BATCH,
    ):
        """`memory_budget_bytes` holds the block's weights and every session's KV cache;
        a session idle for `session_idle_seconds` is freed; `kv_layout` says whether the
        caches grow with their sessions or are preallocated (and graphed on CUDA); up to
        `max_batch` waiting chunks of different sessions run as one forward."""
        self.node_id = node_id
        self.checkpoint = Checkpoint.open(model_dir)
        self._model_dir = model_dir
        # Receipts: the chains of sessions that ask for one, signed with the node's TLS key.
        self.notary = StageNotary(node_id, Signer(tls.key_pem, tls.cert_pem) if tls else None)
        self.notary.model_config_sha256 = self.checkpoint.fingerprint
        self._tls = tls
        self._secrets = secrets
        self._secret = secrets[0] if secrets else None
        self.inbound = Inbound(node_id, secrets)
        self._idle_seconds = session_idle_seconds
        self.assignment: Assignment | None = None
        self.plan_version = 0
        self._downstream: Edge | None = None
        # Told (receiver id, detail) when the edge downstream cannot reach its receiver.
        self.on_unreachable: Callable[[str, str], None] | None = None
        # What the compute thread produces goes out through `_outbox`, in order, from the loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        # A new downstream Edge goes in line with the frames, to take over from the frames after it.
        self._outbox: asyncio.Queue[frame_pb2.Frame | Edge] = asyncio.Queue()
        self.compute = StageCompute(
            node_id, model_dir=model_dir, device=device, dtype=dtype, memory_budget_bytes=memory_budget_bytes,
            max_sessions=max_sessions, session_idle_seconds=session_idle_seconds, progress=progress,
            send=self._emit, call_on_loop=self._call_on_loop, kv_layout=kv_layout, max_batch=max_batch)
        self.metrics = NodeMetrics("stage", node_id)
        self._observe()

    def _observe(self) -> None:
        """What the stage counts anyway, read when scraped."""
        compute, observe = self.compute, self.metrics.observe
        kv = lambda: compute.kv  # noqa: E731 (made once the block is loaded)
        observe("shard.stage.kv.used", lambda: kv().total_bytes if kv() is not None else 0, unit="By",
                description="bytes the sessions' KV caches hold")
        observe("shard.stage.kv.budget", lambda: kv().budget_bytes if kv() is not None else 0, unit="By",
                description="bytes the KV caches may hold")
        observe("shard.stage.sessions", lambda: len(kv()) if kv() is not None else 0, unit="{session}",
                description="sessions whose KV this stage holds")
        observe("shard.stage.frames", lambda: {(("state", "processed"),): compute.frames_processed,
                                               (("state", "stale"),): compute.frames_dropped_stale},
                unit="{frame}", description="frames computed, and skipped for a cancelled epoch", counter=True)
        observe("shard.stage.positions", lambda: {(("kind", "computed"),): compute.positions_computed,
                                                  (("kind", "replayed"),): compute.positions_replayed},
                unit="{position}", description="token positions run through the block (of them, replayed "
                "after a fail-over)", counter=True)
        self.metrics.observe_refused(self.inbound.rejected)

    @property
    def block(self):
        return self.compute.block

    @property
    def frames_processed(self) -> int:
        return self.compute.frames_processed

    # ---- plan ---------------------------------------------------------------------

    async def apply_plan(self, plan: registry_pb2.Plan) -> bool:
        """Follow a new plan; returns True when this node serves a block in it."""
        assignment = assignment_from_plan(plan, self.node_id, self.assignment)
        self.plan_version = plan.version
        if assignment is None:
            return False
        old = self.assignment
        self._loop = asyncio.get_running_loop()  # where the compute thread sends its frames
        if old is None or old.block != assignment.block:
            # No frame may run on the new block before its downstream edge is queued: a
            # tail that became a middle stage would send hidden states to the coordinator.
            self.assignment = None
            await self.compute.load(assignment.block)
            self.notary.block = await asyncio.get_running_loop().run_in_executor(
                None, _block_record, self._model_dir, assignment.block)
        # A chunk of the new coordinator that arrives before its plan does is filed under
        # the old incarnation and freed here: the coordinator then replays it (a KV gap).
        if old is None or old.coordinator_incarnation != assignment.coordinator_incarnation:
            dropped = await self.compute.follow_coordinator(assignment.coordinator_incarnation)
            if dropped:
                log.info("%s freed %d sessions of a coordinator that is gone", self.node_id, len(dropped))
        if old is None or (old.downstream_id, old.downstream_address) != (
                assignment.downstream_id, assignment.downstream_address):
            # Through the outbox, so that frames computed before it still go where they were
            # computed for, and every frame after it goes the new way.
            self._outbox.put_nowait(Edge(
                sender=self.node_id, receiver=assignment.downstream_id,
                address=assignment.downstream_address, tls=self._tls, secret=self._secret,
                to_coordinator=assignment.last, on_unreachable=self.on_unreachable))
        self.assignment = assignment
        return True

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
        if self.block is None or self.assignment is None:
            raise ShardError(grpc.StatusCode.UNAVAILABLE, f"{self.node_id} has no block loaded yet")
        try:
            payload = self.inbound.open(frame, peer_id)
        except InboundError as error:
            raise ShardError(grpc.StatusCode.UNAUTHENTICATED, f"{error.reason}: {error}") from None
        if not header.session_id:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "frame has no session_id")
        self.notary.received(header, payload)
        if header.receipt and header.kind == K.FRAME_KIND_END and self.assignment.last:
            on_done = self._then_end_receipt(on_done)
        if header.kind == K.FRAME_KIND_FORWARD:
            sampling = None
            if header.sampling and self.block.is_last:  # only the tail chooses tokens
                sampling = parse_spec(self._opened_spec(header), vocab_size=self.block.vocab_size,
                                      num_outputs=header.num_outputs or header.num_tokens, receipt=header.receipt)
            body = ForwardStep(self._validated_input(header, payload), sampling)
        elif header.kind == K.FRAME_KIND_REPLAY:
            body = self._replay_step(header, payload)
        elif header.kind == K.FRAME_KIND_END:
            body = None
        elif header.kind == K.FRAME_KIND_ERROR:
            body = payload
        else:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"a stage does not take frames of kind {K.FrameKind.Name(header.kind)}")
        self.compute.submit(header, body, on_done)

    def _then_end_receipt(self, on_done: Callable[[frame_pb2.FrameHeader], None]):
        """The tail passes no END on: once it is through with one, the END goes into the outbox
        as a marker behind every result of the session, so the notary closes the sent chain
        only after them."""

        def done(header: frame_pb2.FrameHeader) -> None:
            on_done(header)
            self._outbox.put_nowait(frame_pb2.Frame(header=header))

        return done

    def _opened_spec(self, header) -> bytes:
        """The sampling spec in the header, which the coordinator sealed for the tail."""
        if self._secrets is None:
            return header.sampling
        try:
            return open_spec(self._secrets, self.assignment.coordinator_id, header, header.sampling)
        except SealError as error:
            raise ShardError(grpc.StatusCode.UNAUTHENTICATED, str(error)) from None

    def _replay_step(self, header, payload: bytes) -> ReplayStep:
        """This stage's part in a replay: compute it (its index lies in the replay's range),
        feed the first stage that does (it lies just before), or pass the header on."""
        assignment = self.assignment
        first, last = header.replay_first_stage, header.replay_last_stage
        if not first <= last < assignment.ring_size:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"replay stages [{first}, {last}] do not lie in a ring of {assignment.ring_size}")
        if first <= assignment.index <= last:
            return ReplayStep(self._validated_input(header, payload), feeds_next=assignment.index < last)
        if header.num_tokens == 0:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "chunk has no tokens")
        if payload:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"a replay for stages [{first}, {last}] carries no payload to stage {assignment.index}")
        return ReplayStep(None, feeds_next=assignment.index + 1 == first)

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
        return self.compute.cancel_epoch(session_id, epoch)

    async def end_session(self, session_id: str) -> int:
        """Free a session's KV cache; NOT_FOUND if this stage does not hold it."""
        freed = await self.compute.end_session(session_id)
        if freed is None:
            raise ShardError(grpc.StatusCode.NOT_FOUND, f"{self.node_id} holds no session {session_id!r}")
        return freed

    def info(self) -> stage_pb2.InfoResponse:
        compute = self.compute
        info = stage_pb2.InfoResponse(
            node_id=self.node_id, num_layers=self.checkpoint.num_layers,
            plan_version=self.plan_version, frames_processed=compute.frames_processed,
            frames_dropped_stale=compute.frames_dropped_stale, compute_seconds=compute.compute_seconds,
            positions_computed=compute.positions_computed, positions_replayed=compute.positions_replayed,
            frames_batched=compute.frames_batched, largest_batch=compute.largest_batch, forwards=compute.forwards)
        block, kv = compute.block, compute.kv
        if block is not None:
            info.layer_start, info.layer_end = block.start, block.end
            info.weight_bytes = block.weight_bytes
        if kv is not None:
            info.kv_bytes, info.kv_budget_bytes = kv.total_bytes, kv.budget_bytes
            info.kv_session_bytes, info.kv_bytes_per_position = kv.bytes_at(0), kv.bytes_at(1) - kv.bytes_at(0)
            info.kv_session_positions, info.kv_max_sessions = kv.session_positions or 0, kv.max_sessions
            for session_id, session in kv.items():
                info.sessions.add(session_id=session_id, kv_length=session.positions, kv_bytes=kv.bytes_of(session),
                                  attention_slots=compute.attention_slots(session))
        return info

    # ---- the outbound edge --------------------------------------------------------

    async def run(self) -> None:
        """Send what the compute thread produces, in order; expire idle sessions."""
        expiry = asyncio.create_task(self._expire_idle_sessions())
        try:
            while True:
                frame = await self._outbox.get()
                if isinstance(frame, Edge):  # the plan moved the next hop
                    if self._downstream is not None:
                        await self._downstream.close()
                    self._downstream = frame
                    continue
                if frame.header.receipt and frame.header.kind == K.FRAME_KIND_END and self._downstream.to_coordinator:
                    self.notary.ended(frame.header.session_id)  # the tail's marker, sent nowhere
                    continue
                self.notary.sent(self._downstream.receiver, frame)
                try:
                    await self._downstream.send(frame)
                except EdgeBroken as error:
                    log.warning("%s dropped a frame of %s: %s", self.node_id, frame.header.session_id, error)
        finally:
            expiry.cancel()

    async def _expire_idle_sessions(self) -> None:
        while True:
            # Often enough that no session outlives its idle time by more than a fifth.
            await asyncio.sleep(min(5.0, self._idle_seconds / 5))
            for session_id in await self.compute.expire_idle():
                log.info("%s freed idle session %s", self.node_id, session_id)
            self.notary.expire(self._idle_seconds)

    def _emit(self, frame: frame_pb2.Frame) -> None:
        """From the compute thread: hand a frame to the loop for sending downstream."""
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, frame)

    def _call_on_loop(self, fn: Callable[..., None], *args) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    async def attest(self, session_id: str) -> dict:
        """This stage's signed part in the receipt of a session (see StageNotary.attest)."""
        return await self.notary.attest(session_id)

    async def close(self) -> None:
        edges = [self._downstream] + [item for item in _drain(self._outbox) if isinstance(item, Edge)]
        for edge in edges:
            if edge is not None:
                await edge.close()
        self.compute.close()


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _block_record(model_dir: str, block) -> dict:
    """The block as attestations state it; hashing its weights reads them once per process."""
    return {"layer_start": block.start, "layer_end": block.end, "first": block.first, "last": block.last,
            "weights_sha256": block_weights_sha256(str(model_dir), block.start, block.end, block.first, block.last)}
