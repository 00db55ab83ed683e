"""The coordinator's view of the ring: send a chunk into stage 0, await what the tail
returns for it. Results are matched to chunks by (session, chunk id); frames of an
epoch the session has moved past are dropped on arrival."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.trace import Status, StatusCode

from shard.decode.sampling import Chosen
from shard.decode.speculative import RingChanged
from shard.errors import ShardError
from shard.node.notary import CoordinatorNotary
from shard.node.tail_sampling import ChunkSampling, encode_spec, parse_choices
from shard.placement import NO_FIT
from shard.telemetry import put_context, tracer
from shard.v1 import frame_pb2, registry_pb2, stage_pb2, stage_pb2_grpc
from shard.wire.certs import Identity
from shard.wire.codec import CodecError, encode_ids, parse_tensor
from shard.wire.edge import Edge
from shard.wire.spec_seal import seal_spec
from shard.wire.inbound import Inbound
from shard.wire.tls import NodeTLS, open_channel

log = logging.getLogger(__name__)


class Ring:
    def __init__(self, node_id: str, tls: NodeTLS | None, secrets: list[bytes] | None, *,
                 chunk_timeout: float = 120.0):
        self.node_id, self._tls, self._chunk_timeout = node_id, tls, chunk_timeout
        # Told (stage id, detail) when the edge to the head cannot reach it.
        self.on_unreachable: Callable[[str, str], None] | None = None
        self._secret = secrets[0] if secrets else None
        self.inbound = Inbound(node_id, secrets)
        self.notary = CoordinatorNotary()  # chains of the sessions that asked for a receipt
        self.plan: registry_pb2.Plan | None = None
        self.head_edge: Edge | None = None
        self._stage_stubs: dict[str, stage_pb2_grpc.StageServiceStub] = {}
        self._stage_addresses: dict[str, str] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._pending: dict[tuple[str, int], asyncio.Future] = {}
        self.ready = asyncio.Event()
        self.problem = "no plan from the registry yet"  # why the ring is not ready, if it is not
        # Told every time `ready` is set or cleared (the node's health follows it).
        self.on_ready_change: Callable[[bool], Awaitable[None]] | None = None
        # Told each chunk's round trip in seconds, sent to its result back from the tail.
        self.on_round_trip: Callable[[float], None] | None = None

    @property
    def layout(self) -> tuple:
        """Who holds which block, in ring order: (node id, address, layer start, layer end)."""
        return _signature(self.plan) if self.plan else ()

    @property
    def in_flight(self) -> int:
        """Chunks sent whose results have not come back."""
        return len(self._pending)

    @property
    def tail_id(self) -> str | None:
        return self.plan.stages[-1].node_id if self.plan and self.plan.stages else None

    async def apply_plan(self, plan: registry_pb2.Plan) -> None:
        """Follow the registry. A plan without stages (a restarted registry still
        gathering its nodes) changes nothing: the data path does not need the registry.
        A plan that moves any block fails the chunks in flight with RingChanged, so their
        sessions replay into the new ring."""
        if plan.problem and plan.problem != self.problem:
            # Once per problem; a model that does not fit is what an operator must fix.
            log.log(logging.WARNING if plan.problem.startswith(NO_FIT) else logging.INFO,
                    "registry cannot serve the model yet: %s", plan.problem)
        self.problem = plan.problem
        if not plan.stages:
            if plan.problem.startswith(NO_FIT):  # stages were lost and the rest cannot hold the model
                await self._set_ready(False)
            return
        ring = _signature(plan)
        changed = self.plan is not None and self.plan.stages and ring != _signature(self.plan)
        head = plan.stages[0]
        if self.head_edge is None or changed or (self.head_edge.receiver, self.head_edge.address) != (
                head.node_id, head.address):
            if self.head_edge is not None:
                await self.head_edge.close()
            self.head_edge = Edge(sender=self.node_id, receiver=head.node_id, address=head.address,
                                  tls=self._tls, secret=self._secret, on_unreachable=self.on_unreachable)
        self.plan = plan
        for stage in plan.stages:
            if stage.node_id not in self._stage_stubs or self._stage_addresses.get(stage.node_id) != stage.address:
                channel = open_channel(stage.address, self._tls, expect=Identity("stage", stage.node_id))
                self._channels.append(channel)
                self._stage_stubs[stage.node_id] = stage_pb2_grpc.StageServiceStub(channel)
                self._stage_addresses[stage.node_id] = stage.address
        if changed:
            log.warning("the ring changed (plan v%d): %d chunks in flight will be replayed",
                        plan.version, len(self._pending))
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(RingChanged(f"plan v{plan.version} moved the blocks"))
        if plan.ready:
            await self._set_ready(True)
        elif changed:
            await self._set_ready(False)

    async def _set_ready(self, ready: bool) -> None:
        if ready == self.ready.is_set():
            return
        if ready:
            self.ready.set()
        else:
            self.ready.clear()
        if self.on_ready_change is not None:
            await self.on_ready_change(ready)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except asyncio.TimeoutError:
            problem = self.problem
            raise ShardError(grpc.StatusCode.UNAVAILABLE, f"the ring did not recover: {problem}") from None

    async def submit(self, *, session_id: str, chunk_id: int, epoch: int, start_pos: int,
                     tokens: list[int], num_outputs: int, sampling: ChunkSampling | None = None,
                     session_positions: int = 0) -> asyncio.Future:
        """Send a chunk into the ring; the future yields the argmax ids the tail returns
        for it (with `sampling`: the Chosen tokens), or raises ShardError / RingChanged.
        `session_positions`: the most the session will hold (0: unsaid; FrameHeader).

        The future is resolved straight from `deliver` (no task awaits it on the way): each
        layer of tasks between the tail's frame and the decoder is a loop wake-up per token."""
        header = frame_pb2.FrameHeader(
            session_id=session_id, chunk_id=chunk_id, epoch=epoch, start_pos=start_pos,
            num_tokens=len(tokens), num_outputs=num_outputs, kind=frame_pb2.FRAME_KIND_FORWARD,
            session_positions=session_positions)
        spec = b""
        if sampling is not None:
            spec = encode_spec(sampling)
            header.sampling = seal_spec(self._secret, self.node_id, header, spec) if self._secret else spec
        return await self._send(header, encode_ids(tokens), spec)

    async def replay(self, *, session_id: str, chunk_id: int, epoch: int, tokens: list[int],
                     stages: tuple[int, int], session_positions: int = 0) -> asyncio.Future:
        """Rebuild a session's KV for `tokens` at positions 0.. in the stages at ring indices
        stages[0]..stages[1] only (a REPLAY frame); the future yields [] once it is through
        the ring, or raises as a chunk's does. The head needs the token ids only when it
        computes them: the stage before the first that does sends its kept outputs."""
        first, last = stages
        header = frame_pb2.FrameHeader(
            session_id=session_id, chunk_id=chunk_id, epoch=epoch, start_pos=0, num_tokens=len(tokens),
            kind=frame_pb2.FRAME_KIND_REPLAY, replay_first_stage=first, replay_last_stage=last,
            session_positions=session_positions)
        return await self._send(header, encode_ids(tokens) if first == 0 else b"")

    async def _send(self, header: frame_pb2.FrameHeader, payload: bytes, spec: bytes = b"") -> asyncio.Future:
        """`spec`: the chunk's sampling spec in plaintext (header.sampling holds it sealed)."""
        if self.head_edge is None:
            raise ShardError(grpc.StatusCode.UNAVAILABLE, "no plan: the ring has no stages yet")
        key = (header.session_id, header.chunk_id)
        loop = asyncio.get_running_loop()
        future = self._pending[key] = loop.create_future()
        deadline = loop.call_later(self._chunk_timeout, self._time_out, key)
        attributes = {"shard.session": header.session_id, "shard.chunk": header.chunk_id,
                      "shard.epoch": header.epoch, "shard.start_pos": header.start_pos,
                      "shard.tokens": header.num_tokens}
        if header.kind == frame_pb2.FRAME_KIND_REPLAY:
            attributes["shard.replay_stages"] = f"[{header.replay_first_stage}, {header.replay_last_stage}]"
        span = tracer.start_span("shard.traversal", attributes=attributes)
        sent = loop.time()
        future.add_done_callback(lambda _: (deadline.cancel(), self._forget_chunk(key, future), _end(span, future),
                                            self._round_trip(future, loop.time() - sent)))
        put_context(header, span)
        self._notarize(header, payload, spec)
        try:
            await self.head_edge.send(frame_pb2.Frame(header=header, payload=payload))
        except ConnectionError as error:
            future.cancel()
            raise RingChanged(str(error)) from error
        return future

    def _round_trip(self, future: asyncio.Future, seconds: float) -> None:
        if self.on_round_trip is not None and not future.cancelled() and future.exception() is None:
            self.on_round_trip(seconds)

    def _forget_chunk(self, key: tuple[str, int], future: asyncio.Future) -> None:
        if self._pending.get(key) is future:
            del self._pending[key]

    def _time_out(self, key: tuple[str, int]) -> None:
        future = self._pending.get(key)
        if future is not None and not future.done():
            future.set_exception(ShardError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           f"no result for chunk {key[1]} within {self._chunk_timeout:.0f} s"))

    def deliver(self, frame: frame_pb2.Frame, peer_id: str | None) -> None:
        """A frame from the tail: open it and resolve the chunk waiting for it, if any
        still is. Raises InboundError for a frame that fails to open."""
        payload = self.inbound.open(frame, peer_id)
        future = self._pending.get((frame.header.session_id, frame.header.chunk_id))
        self.notary.received(frame.header.sender, frame.header, payload,
                             claimed=future is not None and not future.done())
        if future is None or future.done():
            return
        try:
            future.set_result(_result_of(frame.header, payload))
        except (ShardError, RingChanged) as error:
            future.set_exception(error)

    def forget(self, session_id: str) -> None:
        for key in [k for k in self._pending if k[0] == session_id]:
            future = self._pending.pop(key)
            future.cancel()

    async def end_session(self, session_id: str) -> None:
        """Free the session's KV cache at every stage (the END frame follows its chunks)."""
        self.forget(session_id)
        if self.head_edge is None:
            return
        header = frame_pb2.FrameHeader(session_id=session_id, kind=frame_pb2.FRAME_KIND_END)
        self._notarize(header, b"")
        try:
            await self.head_edge.send(frame_pb2.Frame(header=header))
        except ConnectionError as error:
            log.warning("could not end session %s: %s (stages free it when idle)", session_id, error)

    def _notarize(self, header: frame_pb2.FrameHeader, payload: bytes, spec: bytes = b"") -> None:
        """A frame of a session that asked for a receipt: flag it, so that every stage keeps
        its chains, and chain it on the edge it goes out on."""
        if self.notary.wants(header.session_id):
            header.receipt = True
            self.notary.sent(self.head_edge.receiver, header, payload, self.layout, spec)

    async def attest(self, node_id: str, session_id: str, timeout: float = 15.0) -> stage_pb2.AttestResponse:
        """A stage's signed part in a session's receipt; raises AioRpcError."""
        stub = self._stage_stubs.get(node_id)
        if stub is None:
            raise ShardError(grpc.StatusCode.NOT_FOUND, f"{node_id} is no stage this coordinator knows")
        return await stub.Attest(stage_pb2.AttestRequest(session_id=session_id), timeout=timeout)

    async def stage_infos(self, timeout: float = 5.0) -> list[stage_pb2.InfoResponse]:
        """Every stage's Info, in ring order; raises AioRpcError."""
        stages = self.plan.stages if self.plan else []
        return list(await asyncio.gather(
            *(self._stage_stubs[s.node_id].Info(stage_pb2.InfoRequest(), timeout=timeout) for s in stages)))

    async def cancel_epoch(self, session_id: str, epoch: int) -> int:
        """Tell every stage, out of band, to skip this session's frames older than `epoch`."""
        request = stage_pb2.CancelEpochRequest(session_id=session_id, epoch=epoch)
        replies = await asyncio.gather(
            *(self._stage_stubs[s.node_id].CancelEpoch(request, timeout=5.0) for s in self.plan.stages),
            return_exceptions=True)
        return sum(r.frames_dropped for r in replies if isinstance(r, stage_pb2.CancelEpochResponse))

    async def close(self) -> None:
        if self.head_edge is not None:
            await self.head_edge.close()
        for channel in self._channels:
            await channel.close()


def _end(span, future: asyncio.Future) -> None:
    if future.cancelled():
        span.set_attribute("shard.dropped", True)  # overtaken: a rejection, a replay, the end
    elif future.exception() is not None:
        span.set_status(Status(StatusCode.ERROR, str(future.exception())))
    span.end()


def _result_of(header: frame_pb2.FrameHeader, payload: bytes) -> list[int] | Chosen:
    """The argmax ids (or, for a sampled chunk, the Chosen tokens) in a tail's frame;
    raises what its ERROR frame says."""
    if header.kind == frame_pb2.FRAME_KIND_ERROR:
        detail = frame_pb2.ErrorDetail.FromString(payload)
        if _status(detail.code) == grpc.StatusCode.FAILED_PRECONDITION:
            # A stage lacks the session's KV (it replaced one that died): replay.
            raise RingChanged(detail.message)
        raise ShardError(_status(detail.code), detail.message)
    try:
        if header.sampling and header.kind == frame_pb2.FRAME_KIND_RESULT:
            return parse_choices(payload)
        return parse_tensor(payload).ints()
    except (CodecError, DecodeError, ValueError) as error:
        raise ShardError(grpc.StatusCode.INTERNAL, f"malformed result from the tail: {error}") from None


def stages_to_rebuild(held_in: tuple, now: tuple) -> tuple[int, int]:
    """Ring indices (first, last) of the stages that must compute a session's KV again,
    going from the layout `held_in` (where the session's KV was last whole; () if unknown)
    to `now`: where every block kept its layers, only the stages that replaced others (a
    spare took a lost stage's block); otherwise (a re-split, or a stage that lost the KV
    without the plan changing) every stage."""
    every = (0, len(now) - 1)
    if len(held_in) != len(now) or any(was[2:] != new[2:] for was, new in zip(held_in, now)):
        return every
    replaced = [i for i, (was, new) in enumerate(zip(held_in, now)) if was[:2] != new[:2]]
    return (replaced[0], replaced[-1]) if replaced else every


def _signature(plan: registry_pb2.Plan) -> tuple:
    return tuple((s.node_id, s.address, s.layer_start, s.layer_end) for s in plan.stages)


def _status(code: int) -> grpc.StatusCode:
    return next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)
