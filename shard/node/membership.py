"""A node's side of the registry: join, keep the lease alive, follow the plan.

The registry is not on the data path: if it restarts, the node keeps serving, re-joins
when a heartbeat says it is unknown, and re-opens its plan watch with backoff."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from shard.v1 import registry_pb2, registry_pb2_grpc
from shard.wire.tls import NodeTLS, open_channel

log = logging.getLogger(__name__)

_RETRYABLE = retry_if_exception_type(grpc.aio.AioRpcError)


class Membership:
    def __init__(
        self,
        registry_address: str,
        tls: NodeTLS | None,
        capabilities: registry_pb2.NodeCapabilities,
        on_plan: Callable[[registry_pb2.Plan], Awaitable[None]],
        *,
        heartbeat_seconds: float | None = None,
    ):
        """Heartbeats every `heartbeat_seconds`, by default a quarter of the registry's lease."""
        self.capabilities = capabilities
        self._on_plan = on_plan
        self._fixed_heartbeat = heartbeat_seconds
        self._heartbeat_seconds = heartbeat_seconds or 1.0
        # What this node serves now, told to a restarted registry so it can adopt the
        # running plan instead of re-planning.
        self.serving = registry_pb2.ServingBlock()
        self._channel = open_channel(registry_address, tls)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        self._tasks: list[asyncio.Task] = []
        self.state = registry_pb2.NODE_STATE_LOADING
        self.plan_version = 0

    async def start(self) -> None:
        await self._join()
        self._tasks = [
            asyncio.create_task(self._heartbeat_forever()),
            asyncio.create_task(self._watch_forever()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._stub.Leave(
                registry_pb2.LeaveRequest(node_id=self.capabilities.node_id), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            pass  # the registry may already be gone; its lease expiry covers us
        await self._channel.close()

    async def report(self, state: int, plan_version: int) -> None:
        self.state, self.plan_version = state, plan_version
        await self._heartbeat_once()

    async def _join(self) -> None:
        async for attempt in AsyncRetrying(retry=_RETRYABLE, wait=wait_exponential(0.05, max=2.0)):
            with attempt:
                reply = await self._stub.Join(
                    registry_pb2.JoinRequest(capabilities=self.capabilities, serving=self.serving),
                    wait_for_ready=True,
                    timeout=10.0,
                )
        if self._fixed_heartbeat is None:
            self._heartbeat_seconds = reply.lease_seconds / 4

    async def _heartbeat_once(self) -> None:
        reply = await self._stub.Heartbeat(
            registry_pb2.HeartbeatRequest(
                node_id=self.capabilities.node_id, state=self.state, plan_version=self.plan_version
            ),
            timeout=5.0,
        )
        if not reply.known:
            log.info("registry does not know %s; joining again", self.capabilities.node_id)
            await self._join()
            await self._heartbeat_once()

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            try:
                await self._heartbeat_once()
            except grpc.aio.AioRpcError as error:
                log.debug("heartbeat failed: %s", error.code().name)

    async def _watch_forever(self) -> None:
        while True:  # a watch that ends cleanly (registry shut down) is opened again
            async for attempt in AsyncRetrying(retry=_RETRYABLE, wait=wait_exponential(0.05, max=2.0)):
                with attempt:
                    stream = self._stub.WatchPlan(
                        registry_pb2.WatchPlanRequest(node_id=self.capabilities.node_id),
                        wait_for_ready=True,
                    )
                    async for plan in stream:
                        await self._on_plan(plan)
            await asyncio.sleep(self._heartbeat_seconds)
