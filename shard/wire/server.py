"""Start a node's gRPC server with the standard health and reflection services, so any
gRPC client (in any language) can probe and discover it, the node-to-node Ping every
node answers, the role table of `shard.wire.authz` in front of everything, and malformed
requests answered INVALID_ARGUMENT (`shard.wire.requests`)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shard.v1 import node_pb2, node_pb2_grpc
from shard.wire.authz import RoleInterceptor
from shard.wire.requests import RequestInterceptor
from shard.wire.tls import SERVER_OPTIONS, NodeTLS, add_port


MAX_PING_PAYLOAD = 64 * 1024


class PingServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, node_id: str):
        self.node_id = node_id

    async def Ping(self, request, context):
        if len(request.payload) > MAX_PING_PAYLOAD:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a ping payload holds at most {MAX_PING_PAYLOAD} bytes")
        return node_pb2.PingResponse(payload=request.payload, node_id=self.node_id)


LIVENESS = "liveness"  # the health service name that only says the process and its loop answer


class Health:
    """The standard gRPC health service of one node. Readiness (service "" and each of the
    node's own services) is NOT_SERVING until the node says it can do its job, and again
    when it no longer can; liveness (service "liveness") is SERVING while the event loop
    answers at all."""

    def __init__(self, service_names: list[str]):
        self.servicer = health.aio.HealthServicer()
        self._names = ["", *service_names]
        self.serving = False

    async def start(self) -> None:
        await self.servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._names:
            await self.servicer.set(name, status)


async def start_server(
    listen: str,
    tls: NodeTLS | None,
    add_servicers: Callable[[grpc.aio.Server], None],
    service_names: list[str],
    node_id: str,
) -> tuple[grpc.aio.Server, int, Health]:
    """The node's server, started, with its health NOT_SERVING until the node sets it."""
    # The role check runs first: an unknown caller learns nothing about its request.
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[RoleInterceptor(), RequestInterceptor()])
    add_servicers(server)
    node_pb2_grpc.add_NodeServiceServicer_to_server(PingServicer(node_id), server)
    node_health = Health(service_names)
    await node_health.start()
    health_pb2_grpc.add_HealthServicer_to_server(node_health.servicer, server)
    reflection.enable_server_reflection(
        [*service_names, node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    port = add_port(server, listen, tls)
    await server.start()
    return server, port, node_health


async def start_health_listener(listen: str, node_health: Health) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with the health service alone (kubelet probes carry no client
    certificate); any other RPC is UNIMPLEMENTED here."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(node_health.servicer, server)
    port = add_port(server, listen, None)
    await server.start()
    return server, port


def write_address_file(path: str | None, address: str) -> None:
    """Tell a launcher where we listen; atomic, so a reader never sees half a line."""
    if not path:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, path)


async def wait_for_shutdown_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


class RunningNode:
    """A started node: where it listens, its health, and how to stop it, in reverse order
    of starting."""

    def __init__(self, address: str, node=None, health: Health | None = None):
        self.address, self.node, self.health = address, node, health
        self.health_address: str | None = None
        self.http_address: str | None = None
        self.metrics_address: str | None = None  # Prometheus scrapes /metrics here  # a coordinator's OpenAI-compatible front, when it has one
        self._closers: list[Callable[[], Awaitable[object]]] = []

    def on_stop(self, closer: Callable[[], Awaitable[object]]) -> None:
        self._closers.append(closer)

    async def listen_for_health(self, listen: str | None) -> None:
        """Serve the health service alone, in plaintext, on `listen` (HOST:PORT), if given."""
        if not listen:
            return
        server, port = await start_health_listener(listen, self.health)
        self.health_address = f"{listen.rpartition(':')[0]}:{port}"
        self.on_stop(lambda: server.stop(grace=0.5))

    def serve_metrics(self, metrics, listen: str | None) -> None:
        """`metrics` (a shard.metrics.NodeMetrics) served for Prometheus on `listen`, if given;
        closed with the node either way."""
        if listen:
            self.metrics_address = f"{listen.rpartition(':')[0]}:{metrics.serve(listen)}"

        async def close() -> None:
            metrics.close()

        self.on_stop(close)

    async def stop(self) -> None:
        if self.health is not None:
            await self.health.set_serving(False)  # probes see it going before it is gone
        for closer in reversed(self._closers):
            await closer()


async def serve_until_signalled(running: RunningNode, address_file: str | None) -> None:
    write_address_file(address_file, running.address)
    try:
        await wait_for_shutdown_signal()
    finally:
        await running.stop()
