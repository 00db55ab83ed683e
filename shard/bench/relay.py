"""A user-space WAN link: a TCP relay that delays every byte by a fixed one-way delay in
each direction, keeps order, and does not cap throughput (bytes read while earlier ones
wait are queued, not held back). `tc netem` is not available on these machines, and
NFQUEUE-based delay collapses throughput; this is why it is written by hand."""

from __future__ import annotations

import asyncio
import contextlib
import time


class DelayRelay:
    def __init__(self, listen_port: int, target_port: int, one_way_seconds: float, host: str = "127.0.0.1"):
        self.listen_port, self.target_port = listen_port, target_port
        self.delay, self.host = one_way_seconds, host
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.listen_port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_reader, client_writer) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_writer.close()
            return
        pumps = [asyncio.create_task(self._pump(client_reader, target_writer)),
                 asyncio.create_task(self._pump(target_reader, client_writer))]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
            self._tasks.discard(pump)
        for writer in (client_writer, target_writer):
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read as fast as data comes; deliver each piece `delay` after it was read."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    writer.write_eof() if writer.can_write_eof() else None
                    return
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(1 << 16)
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await delivering
