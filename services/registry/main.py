"""`shard registry`: membership and plans for one model, until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from services.registry.servicer import RegistryServicer
from shard.config import advertised_address, node_tls
from shard.model.checkpoint import Checkpoint
from shard.node.probe import answers_ping
from shard.node.registry import RegistryState
from shard.placement import ModelSizes
from shard.v1 import registry_pb2, registry_pb2_grpc
from shard.wire.server import RunningNode, serve_until_signalled, start_server

log = logging.getLogger(__name__)


def model_sizes(checkpoint: Checkpoint) -> ModelSizes:
    return ModelSizes(
        layer_bytes=tuple(checkpoint.layer_bytes(i) for i in range(checkpoint.num_layers)),
        embed_bytes=checkpoint.embed_bytes, head_bytes=checkpoint.head_bytes)


async def start(args) -> RunningNode:
    tls = node_tls(args)
    checkpoint = Checkpoint.open(args.model)
    state = RegistryState(sizes=model_sizes(checkpoint), model_fingerprint=checkpoint.fingerprint,
                          min_stages=args.stages, lease_seconds=args.lease_seconds,
                          pin_trusted_ends=args.pin_trusted_ends)
    server, port = await start_server(
        args.listen, tls,
        lambda s: registry_pb2_grpc.add_RegistryServiceServicer_to_server(
            RegistryServicer(state, lambda member: answers_ping(member, tls)), s),
        [registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name], args.node_id)
    running = RunningNode(advertised_address(args, port), state)
    running.on_stop(lambda: server.stop(grace=1.0))

    async def expire_forever() -> None:
        while True:
            await asyncio.sleep(args.lease_seconds / 4)
            state.expire()

    expiry = asyncio.create_task(expire_forever())

    async def stop_expiry() -> None:
        expiry.cancel()

    running.on_stop(stop_expiry)
    log.info("registry listening on %s for %s (%d layers, %d stages)",
             running.address, args.model, checkpoint.num_layers, args.stages)
    return running


async def serve(args) -> None:
    await serve_until_signalled(await start(args), args.address_file)
