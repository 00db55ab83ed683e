"""The receiving end of an edge acknowledges frames cumulatively, off the frame's path.

An ack written as soon as a frame arrived held the frame up: the write kept the event
loop, and with it the GIL, from the compute thread that had the frame (~0.15 ms per hop
on a busy 2-core machine); written when compute started, it took the GIL from the
compute instead. A stage acknowledges a frame once it is through with it, right after
sending its output on, when its loop has nothing better to do. At most one ack write is
in flight: frames finished meanwhile are covered by the next ack, which names the highest
counter due. Frames a stage has taken in but not finished are sent again if the edge
breaks; computing a chunk twice is harmless (absolute positions, same result)."""

from __future__ import annotations

import asyncio

import grpc

from shard.v1 import frame_pb2


class CumulativeAcks:
    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._taken: frame_pb2.FrameHeader | None = None  # the last frame taken in
        self._due: frame_pb2.FrameHeader | None = None    # to acknowledge, not yet written
        self._writer: asyncio.Task | None = None
        self._closed = False

    def taken(self, header: frame_pb2.FrameHeader) -> None:
        """The frame was taken in (it will be acknowledged at the latest by `flush`)."""
        self._taken = header

    def acknowledge(self, header: frame_pb2.FrameHeader) -> None:
        """Acknowledge this frame and every one before it on the stream, soon."""
        if self._closed:
            return
        self._due = header
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def flush(self) -> None:
        """Acknowledge every frame taken in: before the stream ends or is refused, so that
        the sender knows exactly which frame was refused."""
        self._due = self._taken
        if self._writer is not None:
            await self._writer
        await self._write()

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()

    async def _write(self) -> None:
        while self._due is not None:
            header, self._due = self._due, None
            await self._context.write(frame_pb2.FrameAck(
                session_id=header.session_id, chunk_id=header.chunk_id, counter=header.counter))
