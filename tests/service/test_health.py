"""The standard gRPC health service follows what a node can do: NOT_SERVING until the
ring is ready (coordinator) or the stage serves a block of the plan, SERVING then, and
NOT_SERVING again once a stage is lost without a spare. The plaintext health-only
listener answers without a certificate and serves nothing else."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard.services.coordinator import main as coordinator_main
from shard.services.registry import main as registry_main
from shard.services.stage import main as stage_main
from shard.cli import node_config
from shard.model.checkpoint import Checkpoint
from shard.v1 import api_pb2, api_pb2_grpc
from shard.wire.certs import create_local_deployment
from shard.wire.tls import NodeTLS, open_channel

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def status(address: str, service: str = "", tls: NodeTLS | None = None) -> int:
    async with open_channel(address, tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=5)
        return reply.status


async def becomes(address: str, expected: int, seconds: float = 30.0) -> None:
    """Wait until the readiness at `address` (a plaintext health listener) is `expected`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while (now := await status(address)) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"still {now} after {seconds} s"
        await asyncio.sleep(0.1)


def half_the_model(model_dir) -> int:
    """A memory budget that holds more than half of the model but not all of it: two
    stages fit, one alone does not."""
    checkpoint = Checkpoint.open(model_dir)
    total = sum(checkpoint.layer_bytes(i) for i in range(checkpoint.num_layers))
    return int((total + checkpoint.embed_bytes + checkpoint.head_bytes) * 0.75)


def test_health_follows_what_the_nodes_can_do(tinystories_dir, tmp_path):
    asyncio.run(_health_follows_what_the_nodes_can_do(tinystories_dir, tmp_path))


async def _health_follows_what_the_nodes_can_do(tinystories_dir, tmp_path):
    certs = tmp_path / "certs"
    create_local_deployment(certs, 2)
    common = ["--model", str(tinystories_dir), "--listen", "127.0.0.1:0", "--certs", str(certs),
              "--health-listen", "127.0.0.1:0"]
    started = []
    try:
        registry = await registry_main.start(node_config(["registry", *common, "--stages", "2"]))
        started.append(registry)
        assert await status(registry.health_address) == SERVING  # accepting joins from the start
        joining = [*common, "--registry", registry.address]
        coordinator = await coordinator_main.start(node_config(["coordinator", *joining]))
        started.append(coordinator)
        budget = f"--memory-budget={half_the_model(tinystories_dir)}"
        stage_args = [*joining, "--device", "cpu", "--quiet", budget]
        first = await stage_main.start(node_config(["stage", *stage_args, "--node-id", "stage-0"]))
        started.append(first)

        # One of two stages: no plan yet, so neither the coordinator nor the stage can serve.
        for node in (coordinator, first):
            assert await status(node.health_address) == NOT_SERVING
            assert await status(node.health_address, "liveness") == SERVING  # alive all the same
        # The mTLS port says the same to a client with a certificate.
        client = NodeTLS.load(certs, "client")
        assert await status(coordinator.address, tls=client) == NOT_SERVING
        assert await status(coordinator.address, "shard.v1.InferenceService", tls=client) == NOT_SERVING

        second = await stage_main.start(node_config(["stage", *stage_args, "--node-id", "stage-1"]))
        started.append(second)
        for node in (coordinator, first, second):
            await becomes(node.health_address, SERVING)
        assert await status(coordinator.address, tls=client) == SERVING

        # stage-1 leaves and stage-0 alone cannot hold the model: the ring is not ready.
        started.remove(second)
        await second.stop()
        await becomes(coordinator.health_address, NOT_SERVING)
    finally:
        for node in reversed(started):
            await node.stop()


def test_the_health_listener_is_plaintext_and_serves_nothing_else(tinystories_dir, tmp_path):
    asyncio.run(_health_listener_is_plaintext_and_serves_nothing_else(tinystories_dir, tmp_path))


async def _health_listener_is_plaintext_and_serves_nothing_else(tinystories_dir, tmp_path):
    config = node_config(["registry", "--model", str(tinystories_dir), "--listen", "127.0.0.1:0",
                          "--certs", str(tmp_path), "--health-listen", "127.0.0.1:0"])
    create_local_deployment(tmp_path, 1)
    registry = await registry_main.start(config)
    try:
        assert await status(registry.health_address) == SERVING  # no certificate needed
        async with open_channel(registry.health_address, None) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in api_pb2_grpc.InferenceServiceStub(channel).Generate(
                        api_pb2.GenerateRequest(prompt="hi", max_tokens=1), timeout=5):
                    pass
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The node's own port still demands a certificate for health as for anything else.
        with pytest.raises(grpc.aio.AioRpcError):
            await status(registry.address)
    finally:
        await registry.stop()
    with pytest.raises(grpc.aio.AioRpcError):  # and the listener stops with the node
        await status(registry.health_address)
