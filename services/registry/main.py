"""`shard registry`: membership and plans for one model, until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from shard.config import RegistryConfig, node_tls
from shard.metrics import NodeMetrics
from shard.model.block import kv_bytes_per_layer_position
from shard.model.checkpoint import Checkpoint
from shard.model.dtypes import config_dtype
from shard.node.probe import answers_ping
from shard.node.registry import RegistryState
from shard.placement import ModelSizes
from shard.services.registry.servicer import RegistryServicer
from shard.v1 import registry_pb2, registry_pb2_grpc
from shard.wire.server import RunningNode, serve_until_signalled, start_server

log = logging.getLogger(__name__)


def model_sizes(checkpoint: Checkpoint, kv_positions: int = 0) -> ModelSizes:
    """With `kv_positions`, each layer also reserves that many positions of KV, at the
    checkpoint's dtype (the one the byte counts of the weights use too)."""
    per_layer = kv_bytes_per_layer_position(checkpoint.config, config_dtype(checkpoint.config))
    return ModelSizes(
        layer_bytes=tuple(checkpoint.layer_bytes(i) for i in range(checkpoint.num_layers)),
        embed_bytes=checkpoint.embed_bytes, head_bytes=checkpoint.head_bytes,
        kv_positions=kv_positions, layer_kv_bytes=(per_layer,) * checkpoint.num_layers)


async def start(config: RegistryConfig) -> RunningNode:
    tls = node_tls(config)
    checkpoint = Checkpoint.open(config.model)
    state = RegistryState(sizes=model_sizes(checkpoint, config.kv_reserve_positions), model_fingerprint=checkpoint.fingerprint,
                          min_stages=config.stages, lease_seconds=config.lease_seconds,
                          pin_trusted_ends=config.pin_trusted_ends)
    server, port, health = await start_server(
        config.listen, tls,
        lambda s: registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(state, lambda member: answers_ping(member, tls)), s),
        [registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name], config.node_id)
    running = RunningNode(config.advertised_address(port), state, health)
    running.on_stop(lambda: server.stop(grace=1.0))
    await running.listen_for_health(config.health_listen)
    metrics = NodeMetrics("registry", config.node_id)
    metrics.observe("shard.registry.nodes", lambda: len(state.nodes), unit="{node}",
                    description="nodes holding a lease (stages, spares and coordinators)")
    running.serve_metrics(metrics, config.metrics_listen)

    async def expire_forever() -> None:
        while True:
            await asyncio.sleep(config.lease_seconds / 4)
            state.expire()

    expiry = asyncio.create_task(expire_forever())

    async def stop_expiry() -> None:
        expiry.cancel()

    running.on_stop(stop_expiry)
    await health.set_serving(True)  # the registry's job is to accept joins: it can from now on
    log.info("registry listening on %s for %s (%d layers, %d stages%s)",
             running.address, config.model, checkpoint.num_layers, config.stages,
             f", room for {config.kv_reserve_positions} positions of KV beside each block"
             if config.kv_reserve_positions else "")
    return running


async def serve(config: RegistryConfig) -> None:
    await serve_until_signalled(await start(config), config.address_file)
