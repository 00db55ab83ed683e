"""A whole swarm inside one event loop: the real servicers, real gRPC over loopback and
real mTLS, without process start-up costs. For tests that need many swarms."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from shard.services.coordinator import main as coordinator_main
from shard.services.registry import main as registry_main
from shard.services.stage import main as stage_main
from shard.cli import node_config
from shard.wire.certs import create_local_deployment
from shard.wire.server import RunningNode
from shard.wire.tls import NodeTLS


@dataclass
class Swarm:
    registry: RunningNode
    stages: list[RunningNode]
    coordinator: RunningNode
    certs: Path | None

    def tls(self, node_id: str = "client") -> NodeTLS | None:
        return NodeTLS.load(self.certs, node_id) if self.certs else None


def _args(command: str, model_dir, node_id: str, certs: Path | None, *extra: str, secrets=()):
    """The node's typed configuration, from the flags an operator would give."""
    argv = [command, "--model", str(model_dir), "--node-id", node_id, "--listen", "127.0.0.1:0", *extra]
    argv += ["--certs", str(certs)] if certs else ["--insecure"]
    argv += [f"--secret={path}" for path in secrets]
    return node_config(argv)


@asynccontextmanager
async def inprocess_swarm(model_dir, stages: int, workdir: Path, *, insecure: bool = False,
                          certs: Path | None = None, secrets: dict[str, list[Path]] | None = None,
                          stage_args: list[list[str]] | None = None, coordinator_args: list[str] = (),
                          registry_args: list[str] = (),
                          ready_timeout: float = 60.0):
    """`secrets` maps node ids to their --secret files (default: the one beside the certs)."""
    secrets = secrets or {}
    if certs is None and not insecure:
        certs = workdir / "certs"
        create_local_deployment(certs, stages)
    started: list[RunningNode] = []
    try:
        registry = await registry_main.start(_args("registry", model_dir, "registry", certs, "--stages", str(stages),
                                                       *registry_args))
        started.append(registry)
        stage_nodes = []
        for index in range(stages):
            extra = ["--registry", registry.address, "--quiet", "--device", "cpu"]
            extra += stage_args[index] if stage_args else []
            node_id = f"stage-{index}"
            stage_nodes.append(await stage_main.start(
                _args("stage", model_dir, node_id, certs, *extra, secrets=secrets.get(node_id, ()))))
            started.append(stage_nodes[-1])
        coordinator = await coordinator_main.start(
            _args("coordinator", model_dir, "coordinator", certs, "--registry", registry.address,
                  *coordinator_args, secrets=secrets.get("coordinator", ())))
        started.append(coordinator)
        await asyncio.wait_for(coordinator.node.ring.ready.wait(), ready_timeout)
        yield Swarm(registry, stage_nodes, coordinator, certs)
    finally:
        # In ring order, so every node's inbound stream has ended before it stops serving.
        for node in [*started[-1:], *started[1:-1], *started[:1]]:
            await node.stop()
