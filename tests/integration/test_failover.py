"""Fault tolerance with real processes: a stage killed with SIGKILL mid-generation, and a
registry restarted mid-generation, do not change a single token of the answer."""

import asyncio
import time
from pathlib import Path

import pytest

from shard.client import generate
from shard.local import LocalSwarm
from shard.v1 import api_pb2, stage_pb2, stage_pb2_grpc
from shard.wire.tls import open_channel

from support.reference import reference_greedy

pytestmark = pytest.mark.slow

PROMPT = [1, 415, 1022, 264, 727]  # greedy TinyStories runs 155 tokens before its eos
LEASE = ["--lease-seconds=1"]


def request(max_tokens=300):
    return api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=max_tokens)


async def generate_through(swarm: LocalSwarm, fault, after_seconds: float):
    """Generate, run `fault` once tokens flow; return the generation and the longest
    pause between streamed tokens (the time to recover)."""
    tls = swarm.client_tls()
    await generate(swarm.coordinator_address, tls, request(2), wait_ready_seconds=60)
    arrivals = []
    task = asyncio.create_task(generate(swarm.coordinator_address, tls, request(),
                                        on_text=lambda _: arrivals.append(time.monotonic())))
    await asyncio.sleep(after_seconds)
    assert not task.done(), "the generation ended before the fault"
    fault()
    generation = await task
    return generation, max(b - a for a, b in zip(arrivals, arrivals[1:]))


def wait_for_line(log: Path, line: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while line not in log.read_text():
        assert time.monotonic() < deadline, f"no {line!r} in {log.name} after {seconds:.0f} s"
        time.sleep(0.1)


async def blocks(swarm: LocalSwarm, node_ids) -> dict:
    ranges = {}
    for node_id in node_ids:
        async with open_channel(swarm.address_of(node_id), swarm.client_tls()) as channel:
            info = await stage_pb2_grpc.StageServiceStub(channel).Info(stage_pb2.InfoRequest())
        ranges[node_id] = (info.layer_start, info.layer_end)
    return ranges


@pytest.mark.parametrize("stages, spares, victim", [(2, 1, "stage-1"), (3, 0, "stage-1"), (2, 1, "stage-0")],
                         ids=["spare-takes-the-tail", "survivors-resplit", "spare-takes-the-head"])
def test_a_killed_stage_costs_no_token(tinystories_dir, tmp_path, stages, spares, victim):
    with LocalSwarm(tinystories_dir, stages, spares=spares, workdir=tmp_path, logs_to_files=True,
                    registry_args=LEASE) as swarm:
        generation, recovery = asyncio.run(generate_through(swarm, lambda: swarm.kill(victim), 0.3))
    summary = generation.summary
    assert list(summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, 300)
    assert generation.streamed_ids == list(summary.output_ids)
    assert summary.replays >= 1
    print(f"\n{victim} killed ({spares} spare): recovered in {recovery:.2f} s, {summary.replays} replay(s)")


def test_a_registry_restart_changes_nothing(tinystories_dir, tmp_path):
    with LocalSwarm(tinystories_dir, 2, workdir=tmp_path, logs_to_files=True, registry_args=LEASE) as swarm:
        asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request(2), wait_ready_seconds=60))
        before = asyncio.run(blocks(swarm, ["stage-0", "stage-1"]))
        assert min(before.values())[0] == 0 and max(before.values())[1] == 2  # the ring is loaded
        generation, pause = asyncio.run(generate_through(swarm, swarm.restart_registry, 0.3))
        wait_for_line(tmp_path / "registry.log", "adopting the running ring", seconds=30)
        after = asyncio.run(blocks(swarm, ["stage-0", "stage-1"]))
        again = asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request()))
    expected = reference_greedy(tinystories_dir, PROMPT, 300)
    assert list(generation.summary.output_ids) == expected
    assert generation.summary.replays == 0
    assert after == before  # the restarted registry adopted the running ring
    assert list(again.summary.output_ids) == expected
