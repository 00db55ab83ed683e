"""A node's side of the registry: join, keep the lease alive, follow the plan, and tell
it at once about a member this node could not reach.

The registry is not on the data path: if it restarts, the node keeps serving, re-joins
when a heartbeat says it is unknown, and re-opens its plan watch with backoff. The
registry and every member are dialled as the identity they must have (the registry's
id, a member's role and id from the plan)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import grpc
from tenacity import (AsyncRetrying, RetryCallState, RetryError, retry_if_exception_type, stop_after_delay,
                      wait_exponential)

from shard.errors import ShardError
from shard.node.probe import PROBE_SECONDS, identity_of
from shard.v1 import node_pb2, node_pb2_grpc, registry_pb2, registry_pb2_grpc
from shard.wire.certs import Identity
from shard.wire.tls import NodeTLS, open_channel

log = logging.getLogger(__name__)

_RETRYABLE = retry_if_exception_type(grpc.aio.AioRpcError)
# One report per unreachable member this often at most: a broken edge retries quickly.
_REPORT_INTERVAL = 1.0
REGISTRY_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                      ("grpc.max_reconnect_backoff_ms", 500))


class Membership:
    def __init__(
        self,
        registry_address: str,
        tls: NodeTLS | None,
        capabilities: registry_pb2.NodeCapabilities,
        on_plan: Callable[[registry_pb2.Plan], Awaitable[None]],
        *,
        heartbeat_seconds: float | None = None,
        join_timeout: float = 60.0,
        registry_id: str = "registry",
    ):
        """Heartbeats every `heartbeat_seconds`, by default a quarter of the registry's lease;
        joining gives up after `join_timeout` seconds without an answer."""
        self.capabilities = capabilities
        self._on_plan = on_plan
        self._fixed_heartbeat = heartbeat_seconds
        self._heartbeat_seconds = heartbeat_seconds or 1.0
        # What this node serves now, told to a restarted registry so it can adopt the
        # running plan instead of re-planning.
        self.serving = registry_pb2.ServingBlock()
        self._tls = tls
        self._registry_address, self._join_timeout = registry_address, join_timeout
        # gRPC's default reconnect backoff grows to minutes; a restarted registry must
        # hear from its nodes within about a lease so that it can adopt the running ring.
        self._channel = open_channel(registry_address, tls, expect=Identity("registry", registry_id),
                                     options=REGISTRY_RECONNECT)
        self._peer_channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._reported: dict[str, float] = {}  # member id -> when last reported unreachable
        self._probed: set[tuple[str, str]] = set()
        self.rtts: dict[str, float] = {}
        self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        self._tasks: list[asyncio.Task] = []
        self.state = registry_pb2.NODE_STATE_LOADING
        self.plan_version = 0

    async def start(self) -> None:
        await self._join()
        self._tasks = [
            asyncio.create_task(self._heartbeat_forever()),
            asyncio.create_task(self._watch_forever()),
        ]

    def report_unreachable(self, node_id: str, detail: str) -> None:
        """Tell the registry, without waiting, that `node_id` could not be reached; it
        probes that member itself and re-plans if the member does not answer."""
        now = time.monotonic()
        if now - self._reported.get(node_id, -_REPORT_INTERVAL) < _REPORT_INTERVAL:
            return
        self._reported[node_id] = now
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self._report_unreachable(node_id, detail)))

    async def _report_unreachable(self, node_id: str, detail: str) -> None:
        try:
            reply = await self._stub.ReportUnreachable(
                registry_pb2.ReportUnreachableRequest(
                    reporter_id=self.capabilities.node_id, node_id=node_id, detail=detail[:1000]),
                timeout=5.0)
        except grpc.aio.AioRpcError as error:
            log.warning("could not report %s unreachable to the registry: %s %s",
                        node_id, error.code().name, error.details())
            return
        log.info("reported %s unreachable; the registry %s", node_id,
                 "dropped it" if reply.dropped else "still reaches it")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._peer_channels.values():
            await channel.close()
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
        """Join, retrying with backoff while the registry cannot be reached; each new reason
        is logged once, and after `join_timeout` seconds the node gives up (ShardError)."""
        said = None

        def say(state: RetryCallState) -> None:
            nonlocal said
            reason = _in_words(state.outcome.exception())
            if reason != said:
                log.warning("registry %s unreachable (%s); retrying", self._registry_address, reason)
                said = reason

        try:
            async for attempt in AsyncRetrying(retry=_RETRYABLE, wait=wait_exponential(0.05, max=2.0),
                                               stop=stop_after_delay(self._join_timeout), before_sleep=say):
                with attempt:
                    reply = await self._stub.Join(
                        registry_pb2.JoinRequest(capabilities=self.capabilities, serving=self.serving),
                        timeout=10.0,
                    )
        except RetryError as error:
            reason = _in_words(error.last_attempt.exception())
            raise ShardError(grpc.StatusCode.UNAVAILABLE,
                             f"registry {self._registry_address} unreachable ({reason}); gave up after "
                             f"{self._join_timeout:g} s") from None
        if self._fixed_heartbeat is None:
            self._heartbeat_seconds = reply.lease_seconds / 4

    async def _heartbeat_once(self) -> None:
        reply = await self._stub.Heartbeat(
            registry_pb2.HeartbeatRequest(
                node_id=self.capabilities.node_id, state=self.state, plan_version=self.plan_version,
                rtts=[registry_pb2.RttSample(peer_id=p, seconds=s) for p, s in self.rtts.items()],
            ),
            timeout=5.0,
        )
        if not reply.known:
            log.info("registry does not know %s; joining again", self.capabilities.node_id)
            await self._join()
            await self._heartbeat_once()

    async def _probe_new_members(self, plan: registry_pb2.Plan) -> None:
        """Measure the round trip to every member not measured yet and report at once:
        the registry orders the ring by these before it makes the first plan."""
        fresh = [m for m in plan.members
                 if m.node_id != self.capabilities.node_id and (m.node_id, m.address) not in self._probed]
        if not fresh:
            return
        samples = await asyncio.gather(*(self._round_trip(m) for m in fresh))
        for member, seconds in zip(fresh, samples):
            self._probed.add((member.node_id, member.address))
            if seconds is not None:
                self.rtts[member.node_id] = seconds
        try:
            await self._heartbeat_once()
        except grpc.aio.AioRpcError as error:
            log.debug("could not report round trips: %s", error.code().name)

    async def _round_trip(self, member: registry_pb2.Member, tries: int = 3) -> float | None:
        key = (member.node_id, member.address)
        channel = self._peer_channels.get(key)
        if channel is None:
            channel = self._peer_channels[key] = open_channel(member.address, self._tls,
                                                              expect=identity_of(member))
        stub = node_pb2_grpc.NodeServiceStub(channel)
        call = lambda: stub.Ping(node_pb2.PingRequest(), timeout=PROBE_SECONDS)  # noqa: E731
        best = None
        try:
            await call()  # the first call also sets up the connection: not a round trip
            for _ in range(tries):
                began = time.perf_counter()
                await call()
                elapsed = time.perf_counter() - began
                best = elapsed if best is None else min(best, elapsed)
        except grpc.aio.AioRpcError as error:
            log.info("could not ping %s: %s", member.node_id, error.code().name)
        return best

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
                    async for update in stream:
                        plan = update.plan
                        await self._on_plan(plan)
                        await self._probe_new_members(plan)
            await asyncio.sleep(self._heartbeat_seconds)


def _in_words(error: BaseException) -> str:
    """Why a call to the registry failed, for an operator (gRPC's details are long)."""
    if not isinstance(error, grpc.aio.AioRpcError):
        return str(error)
    details = (error.details() or "").lower()
    for needle, words in (("connection refused", "connection refused"),
                          ("ssl", "TLS handshake failed: is its certificate from this deployment's CA?"),
                          ("handshaker shutdown", "connection closed"),
                          ("name resolution", "no such host"), ("dns", "no such host"),
                          ("timeout", "no answer"), ("deadline", "no answer")):
        if needle in details:
            return words
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer"
    return f"{error.code().name}: {error.details()}"
