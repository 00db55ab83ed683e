"""Coordinator RPCs: the public InferenceService and the tail's ReturnService. Parse,
call CoordinatorNode, reply."""

from __future__ import annotations

import grpc

from shard.errors import ShardError
from shard.node.coordinator import CoordinatorNode
from shard.v1 import api_pb2, api_pb2_grpc, return_pb2_grpc
from shard.wire.acks import CumulativeAcks
from shard.wire.inbound import InboundError
from shard.wire.tls import require_peer


class InferenceServicer(api_pb2_grpc.InferenceServiceServicer):
    def __init__(self, node: CoordinatorNode):
        self.node = node

    async def Generate(self, request, context):
        try:
            async for response in self.node.generate(request):
                yield response
        except ShardError as error:
            await context.abort(error.code, error.message)

    async def GetStatus(self, request, context):
        node = self.node
        return api_pb2.GetStatusResponse(
            node_id=node.node_id, ready=node.ring.ready.is_set(),
            problem="" if node.ring.ready.is_set() else node.ring.problem,
            model_fingerprint=node.fingerprint, context_length=node.context_length,
            drafts=sorted(node.drafts), default_draft=node.default_draft,
            active_generations=node.active_sessions)


class ReturnServicer(return_pb2_grpc.ReturnServiceServicer):
    def __init__(self, node: CoordinatorNode):
        self.node = node

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
