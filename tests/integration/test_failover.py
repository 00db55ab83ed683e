"""Fault tolerance with real processes: a stage killed with SIGKILL mid-generation, a
registry restarted mid-generation, and a killed stage that comes back do not change a
single token of the answer. Stage kills run at the default settings (default lease): the
node whose edge breaks tells the registry, which probes and re-plans at once."""

import asyncio
import time
from pathlib import Path

import pytest

from shard.client import generate
from shard.local import LocalSwarm
from shard.v1 import api_pb2, registry_pb2, registry_pb2_grpc, stage_pb2, stage_pb2_grpc
from shard.wire.tls import open_channel

from support.reference import reference_greedy

pytestmark = pytest.mark.slow

PROMPT = [1, 415, 1022, 264, 727]  # greedy TinyStories runs 155 tokens before its eos
LEASE = ["--lease-seconds=1"]


def request(max_tokens=300):
    return api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=max_tokens)


async def generate_through(swarm: LocalSwarm, fault, after_seconds: float,
                           asked: api_pb2.GenerateRequest | None = None):
    """Generate (`asked`, default request()), run `fault` once tokens flow; return the
    generation and the longest pause between streamed tokens (the time to recover)."""
    tls = swarm.client_tls()
    await generate(swarm.coordinator_address, tls, request(2), wait_ready_seconds=60)
    arrivals = []
    task = asyncio.create_task(generate(swarm.coordinator_address, tls, asked or request(),
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
        async with open_channel(swarm.address_of(node_id), swarm.node_tls("coordinator")) as channel:
            info = await stage_pb2_grpc.StageServiceStub(channel).Info(stage_pb2.InfoRequest())
        ranges[node_id] = (info.layer_start, info.layer_end)
    return ranges


async def stage_infos(swarm: LocalSwarm, node_ids) -> dict[str, stage_pb2.InfoResponse]:
    infos = {}
    for node_id in node_ids:
        async with open_channel(swarm.address_of(node_id), swarm.node_tls("coordinator")) as channel:
            infos[node_id] = await stage_pb2_grpc.StageServiceStub(channel).Info(stage_pb2.InfoRequest())
    return infos


async def current_plan(swarm: LocalSwarm) -> registry_pb2.Plan:
    async with open_channel(swarm.registry_address, swarm.node_tls("coordinator")) as channel:
        watch = registry_pb2_grpc.RegistryServiceStub(channel).WatchPlan(registry_pb2.WatchPlanRequest())
        plan = (await watch.read()).plan
        watch.cancel()
        return plan


def wait_for_ring(swarm: LocalSwarm, size: int, seconds: float) -> registry_pb2.Plan:
    deadline = time.monotonic() + seconds
    while True:
        plan = asyncio.run(current_plan(swarm))
        if plan.ready and len(plan.stages) == size:
            return plan
        assert time.monotonic() < deadline, f"no ready ring of {size} stages after {seconds:.0f} s: {plan}"
        time.sleep(0.2)


@pytest.mark.parametrize("stages, spares, victim", [(2, 1, "stage-1"), (3, 0, "stage-1"), (2, 1, "stage-0")],
                         ids=["spare-takes-the-tail", "survivors-resplit", "spare-takes-the-head"])
def test_a_killed_stage_costs_no_token_and_no_lease(tinystories_dir, tmp_path, stages, spares, victim):
    with LocalSwarm(tinystories_dir, stages, spares=spares, workdir=tmp_path, logs_to_files=True) as swarm:
        generation, stall = asyncio.run(generate_through(swarm, lambda: swarm.kill(victim), 0.3))
        ring = [s.node_id for s in wait_for_ring(swarm, stages if spares else stages - 1, seconds=30).stages]
        infos = asyncio.run(stage_infos(swarm, ring))
    summary = generation.summary
    assert list(summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, 300)
    assert generation.streamed_ids == list(summary.output_ids)
    assert summary.replays >= 1
    # A spare takes the lost block alone: only it computes the committed positions again.
    # After a re-split every stage does.
    replayed = {node_id: info.positions_replayed for node_id, info in infos.items()}
    if spares:
        assert summary.partial_replays == summary.replays
        assert replayed == {node_id: summary.replayed_positions if node_id == f"stage-{stages}" else 0
                            for node_id in ring}
    else:
        assert summary.partial_replays == 0
        assert replayed == {node_id: summary.replayed_positions for node_id in ring}
    # The default lease is 5 s: a recovery that waited for it would take longer. (The
    # benchmark goal is under 2 s; docs/failover.md has measurements.)
    assert stall < 5.0, f"generation stalled {stall:.2f} s: fail-over waited for the lease"
    assert "does not answer a probe" in (tmp_path / "registry.log").read_text()
    print(f"\n{victim} killed with SIGKILL ({spares} spare, default lease): generation stalled "
          f"{stall:.2f} s, {summary.replays} replay(s)")


def test_a_killed_stage_does_not_change_a_seeded_sample(tinystories_dir, tmp_path):
    """Sampled with a seed, speculative: the replay and the new ring draw the same numbers
    (they are keyed by seed and position), so the tokens are the fault-free run's."""
    sampled = request()
    sampled.MergeFrom(api_pb2.GenerateRequest(temperature=0.8, top_p=0.95, seed=7, stop_at_eos=False,
                                              draft="ngram", spec_k=3, in_flight=4))
    with LocalSwarm(tinystories_dir, 2, spares=1, workdir=tmp_path, logs_to_files=True) as swarm:
        calm = asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), sampled, wait_ready_seconds=60))
        generation, _ = asyncio.run(generate_through(swarm, lambda: swarm.kill("stage-1"), 0.3, sampled))
    assert generation.summary.replays >= 1
    assert list(generation.summary.output_ids) == list(calm.summary.output_ids)
    assert generation.streamed_ids == list(calm.summary.output_ids)
    assert len(calm.summary.output_ids) == 300


def test_a_spare_recomputes_only_the_block_that_was_lost(tinystories_dir, tmp_path):
    """The middle stage of three killed mid-generation, a spare present: the spare takes its
    block, and the committed positions are computed again there and nowhere else; the
    survivors upstream and downstream keep their KV (the one upstream feeds the spare the
    outputs it kept), and the answer does not change by a token."""
    with LocalSwarm(tinystories_dir, 3, spares=1, workdir=tmp_path, logs_to_files=True) as swarm:
        before = wait_for_ring(swarm, 3, seconds=60).stages
        upstream, victim, downstream = (s.node_id for s in before)
        generation, stall = asyncio.run(generate_through(swarm, lambda: swarm.kill(victim), 0.3))
        after = wait_for_ring(swarm, 3, seconds=30).stages
        spare = after[1].node_id
        infos = asyncio.run(stage_infos(swarm, [upstream, spare, downstream]))
    summary = generation.summary
    assert list(summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, 300)
    assert generation.streamed_ids == list(summary.output_ids)
    assert spare not in (upstream, victim, downstream)
    assert [(s.node_id, s.layer_start, s.layer_end) for s in after] == [
        (s.node_id if s.node_id != victim else spare, s.layer_start, s.layer_end) for s in before]
    assert summary.replays == summary.partial_replays >= 1
    assert summary.replayed_positions > len(PROMPT)  # tokens had been committed before the kill
    # The replayed positions were computed by the spare alone ...
    assert infos[spare].positions_replayed == summary.replayed_positions
    assert infos[upstream].positions_replayed == infos[downstream].positions_replayed == 0
    # ... while every stage computed the verify chunks after it.
    assert all(info.positions_computed > 0 for info in infos.values())
    assert [len(info.sessions) for info in infos.values()] == [0, 0, 0]  # ended everywhere
    print(f"\n{victim} (middle of 3) killed with SIGKILL, spare {spare} took its block: stalled "
          f"{stall:.2f} s; {summary.replayed_positions} positions replayed into {spare} only")


def test_a_killed_stage_that_comes_back_is_used_again(tinystories_dir, tmp_path):
    expected = reference_greedy(tinystories_dir, PROMPT, 300)
    with LocalSwarm(tinystories_dir, 2, workdir=tmp_path, logs_to_files=True) as swarm:
        asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request(2), wait_ready_seconds=60))
        swarm.kill("stage-1")
        survivors = wait_for_ring(swarm, 1, seconds=30)
        assert [s.node_id for s in survivors.stages] == ["stage-0"]
        swarm.start_stage("stage-1", wait=False)

        async def generate_until_the_ring_grows():
            """Generations back to back while stage-1 starts and rejoins, so that the
            re-plan lands in the middle of one (and its tokens are replayed)."""
            generations = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                generations.append(await generate(swarm.coordinator_address, swarm.client_tls(), request(),
                                                  wait_ready_seconds=60))
                plan = await current_plan(swarm)
                if plan.ready and len(plan.stages) == 2:
                    return generations
            raise AssertionError("stage-1 was not used again within 120 s")

        generations = asyncio.run(generate_until_the_ring_grows())
        grown = wait_for_ring(swarm, 2, seconds=30)
        after = asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request()))
    assert sorted(s.node_id for s in grown.stages) == ["stage-0", "stage-1"]
    assert "brings the ring back" in (tmp_path / "registry.log").read_text()
    for generation in [*generations, after]:
        assert list(generation.summary.output_ids) == expected
        assert generation.streamed_ids == expected
    print(f"\nstage-1 rejoined: ring of {len(grown.stages)} again after {len(generations)} generations, "
          f"{sum(g.summary.replays for g in generations)} replay(s)")


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
