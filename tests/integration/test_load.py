"""Many users at once, bounded, on loopback: 32 clients keep generating for a fixed time,
plain and pipelined speculative, on one 2-stage swarm of the real model: with dynamic KV
(the CPU path) for 60 s, and with static KV batched over a pool of 8 (the GPU path's
`--static-batch`, eagerly), where the coordinator queues what the pools cannot hold. No
request fails, every output is transformers' generate(), the stages really batched
sessions' chunks, and afterwards every stage's KV is back to nothing."""

import asyncio
import itertools
import time

import pytest

from shard.client import generate
from shard.v1 import api_pb2

from support.reference import reference_greedy
from support.swarm import inprocess_swarm

CLIENTS = 32
NEW = 12
# Prompts of different lengths, so that batched sessions sit at different positions.
PROMPTS = [[1, 415, 1022, 264, 727], [1, 415], [1, 600, 311, 1022, 264, 727, 415, 98, 12], [1, 1022, 264]]
MODES = [dict(draft="none"), dict(draft="ngram", spec_k=4, in_flight=4)]


async def client(address, tls, index: int, stop_at: float, results: list) -> None:
    for turn in itertools.count():
        if time.monotonic() >= stop_at:
            return
        prompt = PROMPTS[(index + turn) % len(PROMPTS)]
        mode = MODES[(index + turn) % len(MODES)]
        request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=prompt), max_tokens=NEW,
                                          stop_at_eos=False, **mode)
        try:
            generation = await generate(address, tls, request)
            results.append((tuple(prompt), list(generation.summary.output_ids), None))
        except Exception as error:  # counted, not raised: the test reports every failure
            results.append((tuple(prompt), None, error))


async def load(model_dir, workdir, stage_args: list[str], seconds: float):
    # Equal speeds: one layer each (a measured split may leave a stage the head alone, which
    # has no layers to batch).
    async with inprocess_swarm(model_dir, 2, workdir, stage_args=[["--speed=1", *stage_args]] * 2) as swarm:
        baseline = [stage.node.info() for stage in swarm.stages]
        results: list = []
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(client(swarm.coordinator.address, swarm.tls(), i, stop_at, results)
                               for i in range(CLIENTS)))
        deadline = time.monotonic() + 10
        while any(stage.node.info().sessions for stage in swarm.stages) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return baseline, results, [stage.node.info() for stage in swarm.stages]


@pytest.mark.parametrize("stage_args, seconds", [
    ([], 60.0),
    (["--kv=static", "--chunk-sizes=5,16", "--session-positions=64", "--static-batch=8"], 20.0),
], ids=["dynamic", "static-batch"])
def test_32_clients_for_a_while(tinystories_dir, tmp_path, stage_args, seconds):
    baseline, results, after = asyncio.run(load(tinystories_dir, tmp_path, stage_args, seconds))
    errors = [repr(error) for _, _, error in results if error is not None]
    assert not errors, f"{len(errors)} of {len(results)} generations failed: {errors[:3]}"
    assert len(results) >= CLIENTS
    expected = {tuple(p): reference_greedy(tinystories_dir, p, NEW) for p in PROMPTS}
    wrong = [prompt for prompt, output, _ in results if output != expected[prompt]]
    assert not wrong, f"{len(wrong)} of {len(results)} outputs differ from generate()"
    for before, info in zip(baseline, after):
        assert info.kv_bytes == before.kv_bytes == 0 and not info.sessions, info.node_id
        assert info.largest_batch > 1 and info.frames_batched > 0, f"{info.node_id} never batched"
