"""`shard coordinator`: follow the plan, serve Generate, until SIGTERM."""

from __future__ import annotations

import logging

from services.coordinator.servicer import InferenceServicer, ReturnServicer
from shard.config import advertised_address, node_secrets, node_tls
from shard.decode.draft import DraftMismatch, load_draft
from shard.node.coordinator import CoordinatorNode
from shard.node.membership import Membership
from shard.v1 import api_pb2, api_pb2_grpc, registry_pb2, return_pb2, return_pb2_grpc
from shard.wire.certs import public_key_der
from shard.wire.server import RunningNode, serve_until_signalled, start_server

log = logging.getLogger(__name__)


async def start(args) -> RunningNode:
    tls = node_tls(args)
    try:
        drafts = [load_draft(spec, args.model) for spec in args.draft]
    except DraftMismatch as error:
        raise SystemExit(f"shard coordinator: {error}") from None
    node = CoordinatorNode(node_id=args.node_id, model_dir=args.model, tls=tls, secrets=node_secrets(args),
                           drafts=drafts, spec_k=4 if args.spec_k is None else args.spec_k,
                           in_flight=4 if args.in_flight is None else args.in_flight)

    def add_servicers(server) -> None:
        api_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(node), server)
        return_pb2_grpc.add_ReturnServiceServicer_to_server(ReturnServicer(node), server)

    server, port = await start_server(
        args.listen, tls, add_servicers,
        [api_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
         return_pb2.DESCRIPTOR.services_by_name["ReturnService"].full_name], args.node_id)
    running = RunningNode(advertised_address(args, port), node)
    # The tail's return stream never ends by itself: a short grace for in-flight results.
    running.on_stop(lambda: server.stop(grace=0.5))
    running.on_stop(node.ring.close)
    capabilities = registry_pb2.NodeCapabilities(
        node_id=args.node_id, role=registry_pb2.ROLE_COORDINATOR, address=running.address,
        device_name="cpu", device_id="cpu", model_fingerprint=node.fingerprint, region=args.region,
        public_key=public_key_der(tls.cert_pem) if tls else b"")
    membership = Membership(args.registry, tls, capabilities, node.ring.apply_plan,
                            registry_id=args.registry_id)
    node.ring.on_unreachable = membership.report_unreachable
    await membership.start()
    running.on_stop(membership.stop)
    await membership.report(registry_pb2.NODE_STATE_READY, 0)
    log.info("coordinator %s listening on %s", args.node_id, running.address)
    return running


async def serve(args) -> None:
    await serve_until_signalled(await start(args), args.address_file)
