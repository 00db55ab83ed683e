"""`shard stage`: join the registry, load the assigned block, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import uuid

import torch

from shard.config import ConfigError, StageConfig, node_secrets, node_tls
from shard.model.device import resolve_device, resolve_dtype
from shard.node.membership import Membership
from shard.node.notary import describe_node
from shard.node.resources import default_memory_budget, device_identity, measure_speed
from shard.node.stage import StageNode
from shard.node.stage_compute import KVLayout
from shard.placement import NO_FIT
from shard.services.stage.servicer import StageServicer
from shard.v1 import registry_pb2, stage_pb2, stage_pb2_grpc
from shard.wire.certs import public_key_der
from shard.wire.server import RunningNode, serve_until_signalled, start_server

log = logging.getLogger(__name__)


async def start(config: StageConfig) -> RunningNode:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = str(resolve_device(config.device))
    tls = node_tls(config)
    memory_budget = config.memory_budget or default_memory_budget(device)
    node = StageNode(node_id=config.node_id, model_dir=config.model, tls=tls, secrets=node_secrets(config),
                     device=device, dtype=resolve_dtype(config.dtype, device), memory_budget_bytes=memory_budget,
                     max_sessions=config.max_sessions, max_batch=config.max_batch, session_idle_seconds=config.session_idle_seconds,
                     progress=not config.quiet, kv_layout=_kv_layout(config, device))
    server, port, health = await start_server(
        config.listen, tls,
        lambda s: stage_pb2_grpc.add_StageServiceServicer_to_server(StageServicer(node), s),
        [stage_pb2.DESCRIPTOR.services_by_name["StageService"].full_name], config.node_id)
    running = RunningNode(config.advertised_address(port), node, health)
    # Stopped in reverse: leave the registry, stop computing, close the edge downstream
    # (so the next stage's server sees its inbound stream end), then stop serving.
    running.on_stop(lambda: server.stop(grace=2.0))
    running.on_stop(node.close)
    await running.listen_for_health(config.health_listen)
    running.serve_metrics(node.metrics, config.metrics_listen)
    device_name, device_id = device_identity(device)
    capabilities = registry_pb2.NodeCapabilities(
        node_id=config.node_id, role=registry_pb2.ROLE_STAGE, address=running.address,
        device_name=device_name, device_id=device_id,
        memory_budget_bytes=memory_budget, incarnation=uuid.uuid4().hex,
        region=config.region, trust=config.trust, model_fingerprint=node.checkpoint.fingerprint,
        speed=config.speed or measure_speed(node.checkpoint.hidden_size, device),
        public_key=public_key_der(tls.cert_pem) if tls else b"")
    problem = ""

    async def on_plan(plan: registry_pb2.Plan) -> None:
        nonlocal problem
        if plan.problem and plan.problem != problem:
            # Once per problem, not per plan; a model that does not fit is what an operator must fix.
            log.log(logging.WARNING if plan.problem.startswith(NO_FIT) else logging.INFO,
                    "registry cannot plan yet: %s", plan.problem)
        problem = plan.problem
        serving = await node.apply_plan(plan)
        # Ready while this stage holds a block of the plan; a spare, or a stage left out, is not.
        await health.set_serving(serving)
        if serving:
            a = node.assignment
            membership.serving = registry_pb2.ServingBlock(
                plan_version=plan.version, ring_index=a.index, ring_size=a.ring_size,
                layer_start=a.start, layer_end=a.end, serving=True)
            await membership.report(registry_pb2.NODE_STATE_READY, plan.version)

    membership = Membership(config.registry, tls, capabilities, on_plan, join_timeout=config.join_timeout,
                            registry_id=config.registry_id)
    node.metrics.observe_round_trips(membership.rtts)
    node.notary.node, node.notary.rtts = describe_node(capabilities), membership.rtts
    node.on_unreachable = membership.report_unreachable
    worker = asyncio.create_task(node.run())

    async def stop_worker() -> None:
        worker.cancel()

    running.on_stop(stop_worker)
    try:
        await membership.start()
    except BaseException:
        await running.stop()
        raise
    running.on_stop(membership.stop)
    log.info("stage %s listening on %s", config.node_id, running.address)
    return running


def _kv_layout(config: StageConfig, device: str) -> KVLayout:
    static = config.kv == "static" or (config.kv == "auto" and device.startswith("cuda"))
    if config.static_batch > 1 and not static:
        raise ConfigError("--static-batch batches static KV: it needs --kv static (the default on CUDA)")
    return KVLayout(static=static, session_positions=config.session_positions, graphs=not config.eager,
                    compiled=not config.no_compile, batch=config.static_batch,
                    chunk_sizes=tuple(int(size) for size in config.chunk_sizes.split(",")))


async def serve(config: StageConfig) -> None:
    await serve_until_signalled(await start(config), config.address_file)
