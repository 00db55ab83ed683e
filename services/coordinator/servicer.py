"""Coordinator RPCs: parse, call CoordinatorNode, reply."""

from __future__ import annotations

import grpc

from shard.node.coordinator import CoordinatorNode, GenerateError
from shard.v1 import coordinator_pb2, coordinator_pb2_grpc
from shard.wire.acks import CumulativeAcks
from shard.wire.inbound import InboundError
from shard.wire.tls import require_peer


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, node: CoordinatorNode):
        self.node = node

    async def Generate(self, request, context):
        await require_peer(context, "client", "coordinator")
        try:
            async for response in self.node.generate(request):
                yield response
        except GenerateError as error:
            await context.abort(error.code, error.message)

    async def Return(self, request_iterator, context):
        # Only the tail of the current plan may hand results back.
        tail = self.node.ring.tail_id
        peer = await require_peer(context, "stage", node_ids=[tail] if tail else None)
        acks = CumulativeAcks(context)
        try:
            async for frame in request_iterator:
                self.node.ring.deliver(frame, peer.node_id if peer else None)
                acks.taken(frame.header)
                acks.acknowledge(frame.header)
            await acks.flush()
        except InboundError as error:
            await acks.flush()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{error.reason}: {error}")
        finally:
            acks.close()

    async def Status(self, request, context):
        await require_peer(context, "client", "coordinator", "stage", "registry")
        plan = self.node.ring.plan
        return coordinator_pb2.CoordinatorStatus(
            node_id=self.node.node_id, plan_version=plan.version if plan else 0,
            ready=self.node.ring.ready.is_set(), active_sessions=self.node.active_sessions)
