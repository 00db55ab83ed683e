"""A long-lived outbound stream from one node to the next on the ring.

The edge owns what is per-edge on the wire: the sender and receiver ids, the frame
counter (the AEAD nonce) and the sealing. Each stream it opens is a fresh sealed stream
(new stream id, counter from 1). Frames are kept until the receiver acknowledges them;
if the stream breaks (network, restart, a frame the receiver refused) the edge re-opens
it with backoff (tenacity) and sends the unacknowledged frames again. Re-sending is safe
because chunks carry absolute positions: a chunk computed twice gives the same result.

The edge dials the receiver by the identity the plan gives it (a stage, or the
coordinator for the tail's edge): a node at that address with another certificate fails
the handshake. A stream that breaks because the receiver cannot be reached is told to
`on_unreachable` at once, so that the registry can confirm and re-plan without waiting
for the receiver's lease to run out."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from shard.v1 import frame_pb2, return_pb2_grpc, stage_pb2_grpc
from shard.wire.certs import Identity
from shard.wire.seal import EdgeSealer
from shard.wire.tls import NodeTLS, is_identity_mismatch, open_channel

log = logging.getLogger(__name__)

_BROKEN = (grpc.aio.AioRpcError, asyncio.InvalidStateError)
# Statuses that mean "this frame will never be taken", as opposed to a broken connection
# or a stream the receiver retired (UNAUTHENTICATED), after which a resend succeeds.
_REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                      grpc.StatusCode.FAILED_PRECONDITION})
_MAX_REJECTIONS = 3
# A receiver that has not taken a new stream by then is unreachable: a peer that vanished
# without a reset (a killed container, a dropped link) would otherwise hold the dial for
# as long as TCP keeps trying. Generous for a TLS handshake across a continent.
CONNECT_SECONDS = 5.0


class EdgeBroken(ConnectionError):
    """The next node could not be reached within the retry window."""


class Edge:
    def __init__(
        self,
        *,
        sender: str,
        receiver: str,
        address: str,
        tls: NodeTLS | None,
        secret: bytes | None,
        to_coordinator: bool = False,
        retry_seconds: float = 10.0,
        on_unreachable: Callable[[str, str], None] | None = None,
    ):
        """`on_unreachable(receiver, detail)` is called when a stream to the receiver
        breaks for want of a connection (not when the receiver refuses a frame)."""
        self.sender, self.receiver, self.address = sender, receiver, address
        self._on_unreachable = on_unreachable
        self._tls, self._secret = tls, secret
        self._to_coordinator = to_coordinator
        self._retry_seconds = retry_seconds
        self._lock = asyncio.Lock()
        self._channel: grpc.aio.Channel | None = None
        self._call = None
        self._reader: asyncio.Task | None = None
        # Held here: the loop keeps only a weak reference to a task.
        self._recovering: asyncio.Task | None = None
        self._sealer: EdgeSealer | None = None
        self._counter = 0  # of the last frame written on the current stream
        self._acked = 0    # every frame up to this counter on the current stream was dealt with
        self._unacked: deque[frame_pb2.Frame] = deque()  # the frame after `_acked` first
        self._rejections_in_a_row = 0
        self._closed = False
        self.frames_sent = 0
        self.reconnects = 0

    @property
    def to_coordinator(self) -> bool:
        return self._to_coordinator

    @property
    def expect(self) -> Identity:
        """Who the receiver's certificate must name (a plan without a coordinator yet
        gives the tail an edge without a receiver: it fails only when used)."""
        return Identity("coordinator" if self._to_coordinator else "stage", self.receiver)

    async def send(self, frame: frame_pb2.Frame) -> None:
        """Queue `frame` (plaintext payload) on the edge; it is sealed per stream."""
        async with self._lock:
            self._unacked.append(frame)
            if self._call is not None and not self._call.done():
                try:
                    await self._write(frame)
                    return
                except _BROKEN:
                    pass
            await self._reopen_with_retries()  # sends every unacknowledged frame, this one too

    async def _write(self, frame: frame_pb2.Frame) -> None:
        self._counter += 1
        header = frame_pb2.FrameHeader()
        header.CopyFrom(frame.header)
        header.sender, header.receiver, header.counter = self.sender, self.receiver, self._counter
        payload = self._sealer.seal(header, frame.payload) if self._sealer else frame.payload
        await self._call.write(frame_pb2.Frame(header=header, payload=payload))
        self.frames_sent += 1

    async def _reopen(self) -> None:
        if self._closed:
            raise asyncio.InvalidStateError(f"edge {self.sender} -> {self.receiver} is closed")
        if self._call is not None:
            self.reconnects += 1
            log.info("re-opening edge %s -> %s with %d unacknowledged frames",
                     self.sender, self.receiver, len(self._unacked))
        await self._close_call()
        if self._channel is None:
            self._channel = open_channel(self.address, self._tls, expect=self.expect)
        if self._to_coordinator:
            call = return_pb2_grpc.ReturnServiceStub(self._channel).Return()
        else:
            call = stage_pb2_grpc.StageServiceStub(self._channel).Traverse()
        self._call, self._counter, self._acked = call, 0, 0
        self._sealer = EdgeSealer(self._secret, self.sender, self.receiver) if self._secret else None
        self._reader = asyncio.create_task(self._read_acks(call))
        await self._connected(call)
        for frame in list(self._unacked):
            await self._write(frame)

    async def _connected(self, call) -> None:
        """Wait until the new stream is open, at most CONNECT_SECONDS. gRPC's own wait (and
        so a first write) is not woken when the call is cancelled before it connects, so
        it is raced against the call's end."""
        ended = asyncio.get_running_loop().create_future()
        call.add_done_callback(lambda _: ended.done() or ended.set_result(None))
        connecting = asyncio.ensure_future(call.wait_for_connection())
        done, _ = await asyncio.wait({connecting, ended}, timeout=CONNECT_SECONDS,
                                     return_when=asyncio.FIRST_COMPLETED)
        if connecting in done:
            connecting.result()  # the call's error, if it failed
            return
        connecting.cancel()
        call.cancel()
        if not done and self._on_unreachable and not self._closed:
            self._on_unreachable(self.receiver, f"edge from {self.sender}: no connection within "
                                                f"{CONNECT_SECONDS:g} s")
        raise asyncio.InvalidStateError(f"edge {self.sender} -> {self.receiver}: the stream did not open")

    async def _read_acks(self, call) -> None:
        try:
            async for ack in call:
                # Cumulative: this frame and every one before it on the stream were dealt with.
                if self._call is call and ack.counter > self._acked:
                    for _ in range(min(ack.counter - self._acked, len(self._unacked))):
                        self._unacked.popleft()
                    self._acked = ack.counter
                    self._rejections_in_a_row = 0
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                return
            self._log_closed(error)
            if error.code() == grpc.StatusCode.UNAVAILABLE and self._on_unreachable and not self._closed:
                self._on_unreachable(self.receiver, f"edge from {self.sender}: {error.details()}")
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._rejections_in_a_row += 1
            # A stream the receiver retired is fixed by a fresh stream; a frame refused
            # on fresh streams again and again (e.g. sealed with a secret the receiver
            # no longer holds) is refused for good.
            refused = error.code() in _REFUSED or self._rejections_in_a_row >= _MAX_REJECTIONS
            if refused and self._unacked and self._call is call:
                # The receiver refused the first frame it had not acknowledged: sending it
                # again would be refused again. The chunk's owner learns by its timeout.
                dropped = self._unacked.popleft()
                log.warning("dropped a refused frame of session %s", dropped.header.session_id)
            if self._unacked and self._call is call and not self._closed:
                self._recovering = asyncio.create_task(self._recover())

    def _log_closed(self, error: grpc.aio.AioRpcError) -> None:
        if is_identity_mismatch(error):
            log.error("edge %s -> %s: the node at %s is not %s (its certificate does not name "
                      "%s; certificates from before identity names must be issued again); "
                      "refusing to send to it", self.sender, self.receiver, self.address,
                      self.expect, self.expect.dns_name)
        else:
            log.warning("edge %s -> %s closed: %s %s", self.sender, self.receiver,
                        error.code().name, error.details())

    async def _recover(self) -> None:
        """Re-open a broken stream that still has frames in flight, without waiting for
        the next send."""
        async with self._lock:
            if self._unacked and (self._call is None or self._call.done()):
                try:
                    await self._reopen_with_retries()
                except EdgeBroken as error:
                    log.warning("%s", error)

    async def _reopen_with_retries(self) -> None:
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_BROKEN),
                wait=wait_exponential(multiplier=0.05, max=1.0),
                # A closed edge (its receiver left the plan) stops retrying at once.
                stop=stop_after_delay(self._retry_seconds) | (lambda _: self._closed),
                reraise=True,
            ):
                with attempt:
                    await self._reopen()
        except _BROKEN as error:
            lost = len(self._unacked)
            self._unacked.clear()
            raise EdgeBroken(f"edge {self.sender} -> {self.receiver} at {self.address} lost "
                             f"{lost} frames: {error}") from error

    async def _close_call(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None

    async def close(self) -> None:
        """Stop for good, at once. It does not wait for the lock: a send or a re-open in
        progress may be waiting on a peer that vanished without a reset (a killed container,
        a dropped link), which no gRPC timeout ends soon; closing the channel fails it."""
        self._closed = True
        if self._recovering is not None:
            self._recovering.cancel()
            self._recovering = None
        await self._close_call()
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()
