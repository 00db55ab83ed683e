"""`shard stage`: join the registry, load the assigned block, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from services.stage.servicer import StageServicer
from shard.config import advertised_address, node_secrets, node_tls
from shard.node.membership import Membership
from shard.node.resources import default_memory_budget, device_identity, measure_speed
from shard.node.stage import StageNode
from shard.v1 import registry_pb2, stage_pb2, stage_pb2_grpc
from shard.wire.certs import public_key_der
from shard.wire.server import RunningNode, serve_until_signalled, start_server

log = logging.getLogger(__name__)


async def start(args) -> RunningNode:
    tls = node_tls(args)
    node = StageNode(node_id=args.node_id, model_dir=args.model, tls=tls, secrets=node_secrets(args), device=args.device,
                     dtype=args.dtype, max_sessions=args.max_sessions, progress=not args.quiet)
    server, port = await start_server(
        args.listen, tls,
        lambda s: stage_pb2_grpc.add_StageServiceServicer_to_server(StageServicer(node), s),
        [stage_pb2.DESCRIPTOR.services_by_name["StageService"].full_name], args.node_id)
    running = RunningNode(advertised_address(args, port), node)
    # Stopped in reverse: leave the registry, stop computing, close the edge downstream
    # (so the next stage's server sees its inbound stream end), then stop serving.
    running.on_stop(lambda: server.stop(grace=2.0))
    running.on_stop(node.close)
    device_name, device_id = device_identity(args.device)
    capabilities = registry_pb2.NodeCapabilities(
        node_id=args.node_id, role=registry_pb2.ROLE_STAGE, address=running.address,
        device_name=device_name, device_id=device_id,
        memory_budget_bytes=args.memory_budget or default_memory_budget(args.device),
        region=args.region, trust=args.trust, model_fingerprint=node.checkpoint.fingerprint,
        speed=args.speed or measure_speed(node.checkpoint.hidden_size, args.device),
        public_key=public_key_der(tls.cert_pem) if tls else b"")

    async def on_plan(plan: registry_pb2.Plan) -> None:
        if plan.problem:
            log.warning("registry cannot plan yet: %s", plan.problem)
        if await node.apply_plan(plan):
            a = node.assignment
            membership.serving = registry_pb2.ServingBlock(
                plan_version=plan.version, ring_index=a.index, ring_size=a.ring_size,
                layer_start=a.start, layer_end=a.end, serving=True)
            await membership.report(registry_pb2.NODE_STATE_READY, plan.version)

    membership = Membership(args.registry, tls, capabilities, on_plan, registry_id=args.registry_id)
    node.on_unreachable = membership.report_unreachable
    worker = asyncio.create_task(node.run())

    async def stop_worker() -> None:
        worker.cancel()

    running.on_stop(stop_worker)
    await membership.start()
    running.on_stop(membership.stop)
    log.info("stage %s listening on %s", args.node_id, running.address)
    return running


async def serve(args) -> None:
    await serve_until_signalled(await start(args), args.address_file)
