"""`shard coordinator`: follow the plan, serve Generate, until SIGTERM."""

from __future__ import annotations

import logging
import uuid

from shard.config import ConfigError, CoordinatorConfig, api_keys, node_secrets, node_tls
from shard.decode.draft import DraftMismatch
from shard.decode.loading import load_draft
from shard.model.device import resolve_device, resolve_dtype
from shard.node.coordinator import CoordinatorNode
from shard.node.membership import Membership
from shard.node.notary import describe_node
from shard.node.resources import device_identity
from shard.services.coordinator.servicer import InferenceServicer, ReturnServicer
from shard.v1 import api_pb2, api_pb2_grpc, registry_pb2, return_pb2, return_pb2_grpc
from shard.wire.certs import public_key_der
from shard.wire.server import RunningNode, serve_until_signalled, start_server

log = logging.getLogger(__name__)


async def start(config: CoordinatorConfig) -> RunningNode:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    tls = node_tls(config)
    secrets = node_secrets(config)
    device = resolve_device(config.draft_device)
    dtype = resolve_dtype(config.draft_dtype, device)
    try:
        drafts = [load_draft(spec, config.model, device=device, dtype=dtype, batch=config.draft_batch,
                             compiled=False if config.draft_no_compile else None) for spec in config.draft]
    except DraftMismatch as error:
        raise ConfigError(str(error)) from None
    node = CoordinatorNode(node_id=config.node_id, model_dir=config.model, tls=tls, secrets=secrets,
                           drafts=drafts, spec_k=4 if config.spec_k is None else config.spec_k,
                           in_flight=4 if config.in_flight is None else config.in_flight,
                           max_prompt_chars=config.max_prompt_chars, max_concurrent=config.max_concurrent,
                           max_queued=config.max_queued, queue_timeout=config.queue_timeout)

    def add_servicers(server) -> None:
        api_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(node), server)
        return_pb2_grpc.add_ReturnServiceServicer_to_server(ReturnServicer(node), server)

    server, port, health = await start_server(
        config.listen, tls, add_servicers,
        [api_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
         return_pb2.DESCRIPTOR.services_by_name["ReturnService"].full_name], config.node_id)
    running = RunningNode(config.advertised_address(port), node, health)
    # Ready exactly while the ring is: Generate answers UNAVAILABLE otherwise.
    node.ring.on_ready_change = health.set_serving
    # The tail's return stream never ends by itself: a short grace for in-flight results.
    running.on_stop(lambda: server.stop(grace=0.5))
    running.on_stop(node.ring.close)
    await running.listen_for_health(config.health_listen)
    device_name, device_id = device_identity(str(device))  # where its drafts run
    running.serve_metrics(node.metrics, config.metrics_listen)
    capabilities = registry_pb2.NodeCapabilities(
        node_id=config.node_id, role=registry_pb2.ROLE_COORDINATOR, address=running.address,
        device_name=device_name, device_id=device_id, model_fingerprint=node.fingerprint, region=config.region,
        incarnation=uuid.uuid4().hex,
        public_key=public_key_der(tls.cert_pem) if tls else b"")
    membership = Membership(config.registry, tls, capabilities, node.ring.apply_plan,
                            join_timeout=config.join_timeout, registry_id=config.registry_id)
    node.metrics.observe_round_trips(membership.rtts)
    node.ring.on_unreachable = membership.report_unreachable
    node.receipts.node, node.receipts.rtts = describe_node(capabilities), membership.rtts
    try:
        await membership.start()
    except BaseException:
        await running.stop()
        raise
    running.on_stop(membership.stop)
    await membership.report(registry_pb2.NODE_STATE_READY, 0)
    if config.http_listen:
        try:
            await _start_http(config, node, tls, running)
        except BaseException:
            await running.stop()
            raise
    log.info("coordinator %s listening on %s", config.node_id, running.address)
    return running


async def _start_http(config: CoordinatorConfig, node: CoordinatorNode, tls, running: RunningNode) -> None:
    """The OpenAI-compatible front, started last: it is stopped first."""
    from shard.services.coordinator.http import HttpServer, OpenAIFront

    keys = api_keys(config.api_key_file) if config.api_key_file else None
    front = OpenAIFront(node, model_name=config.served_model_name, api_keys=keys)
    server = HttpServer(front.app, config.http_listen, tls if config.http_tls else None)
    await server.start()
    running.on_stop(server.stop)
    running.http_address = f"{config.http_listen.rpartition(':')[0]}:{server.port}"
    log.info("OpenAI-compatible API on %s://%s/v1 (model %r%s)", "https" if config.http_tls else "http",
             running.http_address, config.served_model_name, ", API keys required" if keys else "")


async def serve(config: CoordinatorConfig) -> None:
    await serve_until_signalled(await start(config), config.address_file)
