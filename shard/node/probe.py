"""Does a node answer? The registry's check before it drops a member reported
unreachable: one Ping, dialled as the identity the member joined with."""

from __future__ import annotations

import logging

import grpc

from shard.v1 import node_pb2, node_pb2_grpc, registry_pb2
from shard.wire.certs import Identity
from shard.wire.tls import NodeTLS, open_channel

log = logging.getLogger(__name__)

# Long enough for a node busy loading a block to answer (its server runs apart from its
# compute); a dead node's port refuses at once, so a crash is confirmed without waiting.
PROBE_SECONDS = 2.0
ROLE_NAMES = {registry_pb2.ROLE_STAGE: "stage", registry_pb2.ROLE_COORDINATOR: "coordinator"}


def identity_of(member: registry_pb2.Member | registry_pb2.NodeCapabilities) -> Identity:
    """The identity a member's certificate must name, as the registry knows it."""
    return Identity(ROLE_NAMES[member.role], member.node_id)


async def answers_ping(member: registry_pb2.NodeCapabilities, tls: NodeTLS | None,
                       timeout: float = PROBE_SECONDS) -> bool:
    expect = identity_of(member)
    async with open_channel(member.address, tls, expect=expect) as channel:
        try:
            await node_pb2_grpc.NodeServiceStub(channel).Ping(node_pb2.PingRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            log.warning("%s at %s does not answer a probe: %s %s", expect, member.address,
                        error.code().name, error.details())
            return False
    return True
