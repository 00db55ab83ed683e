"""A long-lived outbound stream from one node to the next on the ring.

The edge owns what is per-edge on the wire: the sender and receiver ids and the strictly
increasing frame counter. If the stream breaks it is re-opened with backoff (tenacity);
frames lost with a broken stream are the sender's concern (the coordinator re-drives
its sessions)."""

from __future__ import annotations

import asyncio
import logging

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from shard.v1 import coordinator_pb2_grpc, frame_pb2, stage_pb2_grpc
from shard.wire.tls import NodeTLS, open_channel

log = logging.getLogger(__name__)


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
        to_coordinator: bool = False,
        retry_seconds: float = 10.0,
    ):
        self.sender, self.receiver, self.address = sender, receiver, address
        self._tls = tls
        self._to_coordinator = to_coordinator
        self._retry_seconds = retry_seconds
        self._lock = asyncio.Lock()
        self._channel: grpc.aio.Channel | None = None
        self._call = None
        self._reader: asyncio.Task | None = None
        self._counter = 0
        self.frames_sent = 0

    async def send(self, frame: frame_pb2.Frame) -> None:
        async with self._lock:
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type((grpc.aio.AioRpcError, asyncio.InvalidStateError)),
                    wait=wait_exponential(multiplier=0.05, max=1.0),
                    stop=stop_after_delay(self._retry_seconds),
                    reraise=True,
                ):
                    with attempt:
                        await self._write(frame)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                raise EdgeBroken(f"edge {self.sender} -> {self.receiver} at {self.address}: {error}") from error

    async def _write(self, frame: frame_pb2.Frame) -> None:
        if self._call is None or self._call.done():
            await self._open()
        self._counter += 1
        header = frame.header
        header.sender, header.receiver, header.counter = self.sender, self.receiver, self._counter
        await self._call.write(frame)
        self.frames_sent += 1

    async def _open(self) -> None:
        await self._close_call()
        if self._channel is None:
            self._channel = open_channel(self.address, self._tls)
        if self._to_coordinator:
            self._call = coordinator_pb2_grpc.CoordinatorStub(self._channel).Return(wait_for_ready=True)
        else:
            self._call = stage_pb2_grpc.StageStub(self._channel).Traverse(wait_for_ready=True)
        self._reader = asyncio.create_task(self._drain_acks(self._call))

    async def _drain_acks(self, call) -> None:
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                log.warning("edge %s -> %s closed: %s %s", self.sender, self.receiver,
                            error.code().name, error.details())

    async def _close_call(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None

    async def close(self) -> None:
        async with self._lock:
            await self._close_call()
            if self._channel is not None:
                await self._channel.close()
                self._channel = None
