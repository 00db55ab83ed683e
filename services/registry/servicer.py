"""Registry RPCs: parse, call RegistryState, reply."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from shard.errors import ShardError
from shard.node.probe import ROLE_NAMES
from shard.node.registry import RegistryState
from shard.v1 import registry_pb2, registry_pb2_grpc
from shard.wire.tls import require_peer


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, state: RegistryState,
                 answers: Callable[[registry_pb2.NodeCapabilities], Awaitable[bool]]):
        """`answers(member)`: whether the member answers a probe now."""
        self.state, self._answers = state, answers

    async def Join(self, request, context):
        capabilities = request.capabilities
        role = ROLE_NAMES.get(capabilities.role)
        if role is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be stage or coordinator")
        # A node may only join as the role and id its certificate names.
        await require_peer(context, role, node_ids=[capabilities.node_id])
        try:
            self.state.join(capabilities, request.serving)
        except ShardError as error:
            await context.abort(error.code, error.message)
        return registry_pb2.JoinResponse(lease_seconds=self.state.lease_seconds)

    async def Heartbeat(self, request, context):
        await require_peer(context, "stage", "coordinator", node_ids=[request.node_id])
        known = self.state.heartbeat(request.node_id, request.state, request.plan_version,
                                     {s.peer_id: s.seconds for s in request.rtts})
        return registry_pb2.HeartbeatResponse(known=known)

    async def Leave(self, request, context):
        await require_peer(context, "stage", "coordinator", node_ids=[request.node_id])
        self.state.leave(request.node_id)
        return registry_pb2.LeaveResponse()

    async def ReportUnreachable(self, request, context):
        await require_peer(context, "stage", "coordinator", node_ids=[request.reporter_id])
        if not request.node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id is required")
        dropped = await self.state.report_unreachable(request.node_id, self._answers)
        return registry_pb2.ReportUnreachableResponse(dropped=dropped)

    async def WatchPlan(self, request, context):
        queue = self.state.watch()
        try:
            while True:
                yield registry_pb2.WatchPlanResponse(plan=await queue.get())
        finally:
            self.state.unwatch(queue)
