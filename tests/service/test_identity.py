"""Identity both ways: a node checks the certificate of the node it dials (a relay with a
valid certificate of another role or id is refused in the handshake), and a client
certificate reaches nothing but the public API of a real swarm."""

import asyncio
import contextlib
import logging

import grpc
import pytest
from google.protobuf import descriptor_pool

from shard.node.ring import Ring
from shard.v1 import frame_pb2, node_pb2, registry_pb2, return_pb2, stage_pb2  # noqa: F401 (descriptors)
from shard.wire.authz import ALLOWED_ROLES
from shard.wire.certs import Identity, create_deployment
from shard.wire.edge import Edge, EdgeBroken
from shard.wire.tls import SERVER_OPTIONS, NodeTLS, add_port, is_identity_mismatch, open_channel

from support.swarm import inprocess_swarm

pytestmark = pytest.mark.timeout(120)

NODES = [("registry", "registry"), ("coordinator", "coordinator"), ("stage", "stage-0"),
         ("stage", "stage-1"), ("stage", "stage-2"), ("client", "client")]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    create_deployment(d, NODES)
    return d


@contextlib.asynccontextmanager
async def relay(certs, node_id: str):
    """A gRPC server presenting `node_id`'s (valid) certificate: what a relay in front of
    a stage shows the node that dials it."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    port = add_port(server, "127.0.0.1:0", NodeTLS.load(certs, node_id))
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def ping_code(address: str, tls: NodeTLS, expect: Identity | None):
    async with open_channel(address, tls, expect=expect) as channel:
        try:
            await channel.unary_unary("/shard.v1.NodeService/Ping")(b"", timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code(), is_identity_mismatch(error)
    return grpc.StatusCode.OK, False


@pytest.mark.parametrize("presented", ["client", "stage-2", "coordinator"])
def test_a_dialled_node_with_another_identity_fails_the_handshake(certs, presented):
    async def scenario():
        async with relay(certs, presented) as address:
            return await ping_code(address, NodeTLS.load(certs, "stage-0"), Identity("stage", "stage-1"))

    # UNAVAILABLE, not UNIMPLEMENTED: the relay never saw a request.
    assert asyncio.run(scenario()) == (grpc.StatusCode.UNAVAILABLE, True)


def test_the_expected_identity_passes_and_clients_keep_hostname_checks(certs):
    async def scenario():
        async with relay(certs, "stage-1") as address:
            tls = NodeTLS.load(certs, "stage-0")
            # The relay serves no Ping: UNIMPLEMENTED means the handshake passed.
            return (await ping_code(address, tls, Identity("stage", "stage-1")),
                    await ping_code(address, tls, None))

    assert asyncio.run(scenario()) == ((grpc.StatusCode.UNIMPLEMENTED, False),) * 2


def test_an_edge_refuses_a_relay_in_front_of_its_receiver_and_says_so(certs, caplog):
    reported = []

    async def scenario():
        async with relay(certs, "client") as address:
            edge = Edge(sender="stage-0", receiver="stage-1", address=address,
                        tls=NodeTLS.load(certs, "stage-0"), secret=None, retry_seconds=1.0,
                        on_unreachable=lambda node, detail: reported.append(node))
            header = frame_pb2.FrameHeader(session_id="s", kind=frame_pb2.FRAME_KIND_FORWARD)
            try:
                with pytest.raises(EdgeBroken):
                    await edge.send(frame_pb2.Frame(header=header, payload=b"x"))
            finally:
                await edge.close()
            return address

    with caplog.at_level(logging.ERROR, logger="shard.wire.edge"):
        address = asyncio.run(scenario())
    assert f"the node at {address} is not stage/stage-1" in caplog.text
    assert reported and set(reported) == {"stage-1"}  # the registry probes it as stage-1 too


def test_the_coordinator_refuses_a_relay_named_in_the_plan(certs):
    async def scenario():
        async with relay(certs, "client") as address:
            ring = Ring("coordinator", NodeTLS.load(certs, "coordinator"), None)
            plan = registry_pb2.Plan(version=1, num_layers=2, stages=[
                registry_pb2.StageAssignment(node_id="stage-1", address=address, layer_start=0, layer_end=2)])
            await ring.apply_plan(plan)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await ring._stage_stubs["stage-1"].Info(stage_pb2.InfoRequest(), timeout=5)
            finally:
                await ring.close()
            return error.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and is_identity_mismatch(error)


def _serving_nodes(swarm, method: str) -> list[tuple[str, str]]:
    service = method.split("/")[1]
    nodes = {"shard.v1.StageService": [("stage-0", swarm.stages[0].address)],
             "shard.v1.RegistryService": [("registry", swarm.registry.address)],
             "shard.v1.ReturnService": [("coordinator", swarm.coordinator.address)]}
    everyone = [("registry", swarm.registry.address), ("stage-0", swarm.stages[0].address),
                ("coordinator", swarm.coordinator.address)]
    return nodes.get(service, everyone)


def _call(channel: grpc.aio.Channel, method: str):
    """Call `method` with an empty request through the generic channel methods."""
    service, name = method.strip("/").split("/")
    descriptor = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    if descriptor.client_streaming and descriptor.server_streaming:
        return _drain(channel.stream_stream(method)(iter([b""]), timeout=10))
    if descriptor.server_streaming:
        return _drain(channel.unary_stream(method)(b"", timeout=10))
    if descriptor.client_streaming:
        return channel.stream_unary(method)(iter([b""]), timeout=10)
    return channel.unary_unary(method)(b"", timeout=10)


async def _drain(call):
    async for _ in call:
        pass


NON_PUBLIC = sorted(m for m, roles in ALLOWED_ROLES.items() if "client" not in roles)


def test_a_client_certificate_is_denied_every_non_public_rpc(tinystories_dir, tmp_path):
    node_to_node = {f"/{service.full_name}/{method.name}"
                    for name in ("StageService", "RegistryService", "ReturnService", "NodeService")
                    for service in [descriptor_pool.Default().FindServiceByName(f"shard.v1.{name}")]
                    for method in service.methods}
    assert set(NON_PUBLIC) == node_to_node  # every node-to-node RPC is tried

    async def scenario():
        outcomes = {}
        async with inprocess_swarm(tinystories_dir, 1, tmp_path) as swarm:
            for method in NON_PUBLIC:
                for node, address in _serving_nodes(swarm, method):
                    async with open_channel(address, swarm.tls("client")) as channel:
                        try:
                            await _call(channel, method)
                            outcomes[method, node] = grpc.StatusCode.OK, ""
                        except grpc.aio.AioRpcError as error:
                            outcomes[method, node] = error.code(), error.details()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert {key: code for key, (code, _) in outcomes.items()} == {
        key: grpc.StatusCode.PERMISSION_DENIED for key in outcomes}
    for (method, _), (_, details) in outcomes.items():
        assert f"client 'client' may not call {method}" in details
