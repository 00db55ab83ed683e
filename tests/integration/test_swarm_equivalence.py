"""Invariant 1 through the real services: a registry, stages and a coordinator on real
gRPC with mTLS generate exactly what transformers' generate() does in one process."""

import asyncio

import pytest

from shard.client import generate
from shard.model.checkpoint import Checkpoint
from shard.model.synthetic import ARCHS
from shard.v1 import api_pb2, stage_pb2

from support.reference import reference_greedy
from support.swarm import inprocess_swarm

NEW_TOKENS = 40
PROMPT = [3, 17, 42, 7, 99, 5]
# Stage speeds that make the registry cut uneven blocks (a faster stage takes more layers).
SPEEDS = {1: [1], 2: [1, 3], 3: [2, 1, 4]}


def heterogeneous(stages: int) -> list[list[str]]:
    return [[f"--speed={speed}"] for speed in SPEEDS[stages]]


async def swarm_generate(model_dir, stages, workdir, request):
    async with inprocess_swarm(model_dir, stages, workdir, stage_args=heterogeneous(stages)) as swarm:
        generation = await generate(swarm.coordinator.address, swarm.tls(), request)
        blocks = [(s.node.block.start, s.node.block.end) for s in swarm.stages]
        leftover = await _sessions_left(swarm)
    return generation, blocks, leftover


async def _sessions_left(swarm, wait_seconds: float = 5.0) -> int:
    """Sessions still held by any stage once the END frame has gone round."""
    for _ in range(int(wait_seconds / 0.05)):
        held = sum(len(s.node.info().sessions) for s in swarm.stages)
        if held == 0:
            return 0
        await asyncio.sleep(0.05)
    return held


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("arch", [*ARCHS, "llama-sharded"])
def test_tiny_models_match_generate(tiny_model_dirs, arch, stages, tmp_path):
    model_dir = tiny_model_dirs[arch]
    request = api_pb2.GenerateRequest(
        prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=NEW_TOKENS, stop_at_eos=True)
    generation, blocks, leftover = asyncio.run(swarm_generate(model_dir, stages, tmp_path, request))
    expected = reference_greedy(model_dir, PROMPT, NEW_TOKENS)
    assert list(generation.summary.output_ids) == expected
    assert generation.streamed_ids == expected
    assert len(blocks) == stages and leftover == 0
    if stages > 1:
        sizes = [end - start for start, end in blocks]
        assert len(set(sizes)) > 1, f"expected an uneven split, got {blocks}"


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_tinystories_matches_generate(tinystories_dir, stages, tmp_path):
    from transformers import AutoTokenizer

    prompt = "Once upon a time"
    request = api_pb2.GenerateRequest(prompt=prompt, max_tokens=48)
    generation, blocks, leftover = asyncio.run(swarm_generate(tinystories_dir, stages, tmp_path, request))
    tokenizer = AutoTokenizer.from_pretrained(tinystories_dir)
    prompt_ids = tokenizer(prompt)["input_ids"]
    expected = reference_greedy(tinystories_dir, prompt_ids, 48)
    assert list(generation.summary.prompt_ids) == prompt_ids
    assert list(generation.summary.output_ids) == expected
    assert generation.summary.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Lily" in generation.summary.text  # the real model's story, not noise
    assert leftover == 0


def test_stage_of_four_holds_a_fraction_of_the_weights(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    total = Checkpoint.open(model_dir).total_bytes

    async def held():
        async with inprocess_swarm(model_dir, 4, tmp_path) as swarm:
            return [s.node.info() for s in swarm.stages]

    infos = asyncio.run(held())
    assert all(isinstance(i, stage_pb2.InfoResponse) for i in infos)
    assert sorted((i.layer_start, i.layer_end) for i in infos)[0][0] == 0
    for info in infos:
        assert 0 < info.weight_bytes < total / 2, (info.node_id, info.weight_bytes, total)


def test_members_measure_round_trips_before_the_first_plan(tiny_model_dirs, tmp_path):
    async def measured():
        async with inprocess_swarm(tiny_model_dirs["llama"], 3, tmp_path) as swarm:
            plan = type(swarm.registry.node.plan)()
            plan.CopyFrom(swarm.registry.node.plan)
            joined = {n: r.capabilities for n, r in swarm.registry.node.nodes.items()}
            return dict(swarm.registry.node.rtt), plan, joined

    rtt, plan, joined = asyncio.run(measured())
    for node_id in ("stage-0", "stage-1", "stage-2"):
        capabilities = joined[node_id]
        assert capabilities.speed > 0 and capabilities.memory_budget_bytes > 0
        assert capabilities.device_name == "cpu" and len(capabilities.public_key) > 60
    members = {"coordinator", "stage-0", "stage-1", "stage-2"}
    pairs = {frozenset(pair) for pair in rtt}
    assert all(frozenset((a, b)) in pairs for a in members for b in members if a < b)
    assert all(0 < seconds < 1 for seconds in rtt.values())
    assert plan.coordinator_site in members and plan.ring_rtt_seconds > 0
