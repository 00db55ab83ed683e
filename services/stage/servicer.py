"""Stage RPCs: parse, call StageNode, reply."""

from __future__ import annotations

import base64

import grpc

from shard.errors import ShardError
from shard.node.stage import StageNode
from shard.v1 import stage_pb2, stage_pb2_grpc
from shard.wire.acks import CumulativeAcks
from shard.wire.signing import canonical
from shard.wire.tls import peer_identity


class StageServicer(stage_pb2_grpc.StageServiceServicer):
    def __init__(self, node: StageNode):
        self.node = node

    async def Traverse(self, request_iterator, context):
        peer = peer_identity(context)
        acks = CumulativeAcks(context)
        try:
            peer_id = peer.node_id if peer else None
            self.node.check_upstream(peer_id)
            async for frame in request_iterator:
                self.node.accept(frame, peer_id, on_done=acks.acknowledge)
                acks.taken(frame.header)
            await acks.flush()
        except ShardError as rejected:
            await acks.flush()
            await context.abort(rejected.code, rejected.message)
        finally:
            acks.close()

    async def CancelEpoch(self, request, context):
        if not request.session_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is required")
        dropped = self.node.cancel_epoch(request.session_id, request.epoch)
        return stage_pb2.CancelEpochResponse(frames_dropped=dropped)

    async def EndSession(self, request, context):
        try:
            freed = await self.node.end_session(request.session_id)
        except ShardError as error:
            await context.abort(error.code, error.message)
        return stage_pb2.EndSessionResponse(kv_bytes_freed=freed)

    async def Attest(self, request, context):
        if not request.session_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is required")
        try:
            signed = await self.node.attest(request.session_id)
        except ShardError as error:
            await context.abort(error.code, error.message)
        return stage_pb2.AttestResponse(statement=canonical(signed["statement"]).decode(),
                                        signature=base64.b64decode(signed["signature"]),
                                        certificate_pem=signed["certificate"])

    async def Info(self, request, context):
        return self.node.info()
