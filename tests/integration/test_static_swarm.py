"""Stages with static KV (`--kv static`, what a GPU stage runs, here eagerly on the CPU in
float32) through the real services: plain, speculative and pipelined decoding stay
exactly transformers' generate(); a session longer than its preallocated cache fails
alone with RESOURCE_EXHAUSTED; a sampled one is refused (UNIMPLEMENTED: the tail's graphs
write argmax ids); every session's cache goes back at the end; the coordinator says how
many positions a session will hold, and the stages size its attention by it."""

import asyncio

import grpc
import pytest

from shard.client import generate
from shard.model.static_kv import slot_count
from shard.v1 import api_pb2

from support.reference import reference_greedy
from support.swarm import inprocess_swarm

PROMPT = [1, 415, 1022, 264, 727]
NEW = 40
SESSION_POSITIONS = 64
CONTEXT = 512  # tinystories' max_position_embeddings: attention extents 256 and the whole cache


async def run_all(model_dir, workdir, settings):
    stage_args = [["--kv=static", "--chunk-sizes=5,16", f"--session-positions={SESSION_POSITIONS}"]] * 2
    async with inprocess_swarm(model_dir, 2, workdir, stage_args=stage_args,
                               coordinator_args=[f"--draft={model_dir}", "--draft=ngram"]) as swarm:
        results = {}
        for draft, k, in_flight in settings:
            request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=NEW,
                                              draft=draft, spec_k=k, in_flight=in_flight)
            results[draft, k, in_flight] = await generate(swarm.coordinator.address, swarm.tls(), request)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generate(swarm.coordinator.address, swarm.tls(), api_pb2.GenerateRequest(
                prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=SESSION_POSITIONS, draft="none"))
        with pytest.raises(grpc.aio.AioRpcError) as unsampled:  # the graphs write argmax ids, not logits
            await generate(swarm.coordinator.address, swarm.tls(), api_pb2.GenerateRequest(
                prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=4, temperature=0.8))
        await asyncio.sleep(0.3)
        infos = [stage.node.info() for stage in swarm.stages]
    return results, (refused.value, unsampled.value), infos


def test_static_stages_are_lossless_in_every_mode(tinystories_dir, tmp_path):
    target = str(tinystories_dir)
    # K=8 makes verify chunks of 9: over the decode size, they run in the 16-token shape.
    settings = [("none", 0, 1), (target, 4, 1), (target, 4, 4), (target, 8, 4), ("ngram", 4, 4)]
    results, (refused, unsampled), infos = asyncio.run(run_all(tinystories_dir, tmp_path, settings))
    expected = reference_greedy(tinystories_dir, PROMPT, NEW)
    for key, generation in results.items():
        assert list(generation.summary.output_ids) == expected, key
    assert results[target, 4, 4].summary.acceptance_rate == 1.0
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"exceed the {SESSION_POSITIONS} positions" in refused.details()
    assert unsampled.code() == grpc.StatusCode.UNIMPLEMENTED and "--kv dynamic" in unsampled.details()
    assert all(not info.sessions and info.kv_bytes == 0 for info in infos)


async def run_batched(model_dir, workdir, requests):
    stage_args = [["--kv=static", "--chunk-sizes=5,16", f"--session-positions={SESSION_POSITIONS}",
                   f"--static-batch={BATCH}", "--speed=1"]] * 2  # one layer each: both stages batch
    async with inprocess_swarm(model_dir, 2, workdir, stage_args=stage_args,
                               coordinator_args=[f"--draft={model_dir}"]) as swarm:
        results = await asyncio.gather(*(generate(swarm.coordinator.address, swarm.tls(), request)
                                         for request in requests))
        await asyncio.sleep(0.3)
        infos = [stage.node.info() for stage in swarm.stages]
    return results, infos


BATCH = 3


def test_batched_static_stages_serve_more_sessions_than_their_pool_losslessly(tinystories_dir, tmp_path):
    """--static-batch 3: five sessions at once, plain and pipelined, on stages that hold
    three; the coordinator queues the rest (the stages report the pool as their session
    cap), the decode chunks of those running share forwards, and every session gets
    exactly generate()'s tokens."""
    prompts = [PROMPT, [1, 415, 1022], [1, 9, 10, 11, 12, 13, 14], PROMPT[:4], [1, 300, 301, 302]]
    drafts = [("none", 0, 1), (str(tinystories_dir), 4, 2), ("none", 0, 1), (str(tinystories_dir), 4, 1),
              ("none", 0, 1)]
    requests = [api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=prompt), max_tokens=NEW, draft=draft,
                                        spec_k=k, in_flight=in_flight)
                for prompt, (draft, k, in_flight) in zip(prompts, drafts)]
    results, infos = asyncio.run(run_batched(tinystories_dir, tmp_path, requests))
    for prompt, generation in zip(prompts, results):
        assert list(generation.summary.output_ids) == reference_greedy(tinystories_dir, prompt, NEW), prompt
    assert all(info.kv_max_sessions == BATCH for info in infos)
    assert all(info.frames_batched > 0 and 2 <= info.largest_batch <= BATCH for info in infos)
    assert all(not info.sessions and info.kv_bytes == 0 for info in infos)


async def generate_and_look(model_dir, workdir, max_tokens: list[int]):
    """Generations on a static-KV swarm of whole-context caches, and the attention slots
    the stages' Info gives each session while it runs."""
    stage_args = [["--kv=static", "--chunk-sizes=5,16", f"--session-positions={CONTEXT}",
                   "--speed=1"]] * 2  # one layer each, whatever each measures
    async with inprocess_swarm(model_dir, 2, workdir, stage_args=stage_args) as swarm:
        outputs, seen = [], []
        for n in max_tokens:
            looked: list[int] = []

            def look(_: str) -> None:
                if not looked:
                    looked.extend(s.attention_slots for stage in swarm.stages for s in stage.node.info().sessions)

            request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=n)
            generation = await generate(swarm.coordinator.address, swarm.tls(), request, on_text=look)
            outputs.append(list(generation.summary.output_ids))
            seen.append(looked)
    return outputs, seen


def test_the_coordinator_declares_each_sessions_positions(tinystories_dir, tmp_path):
    """Prompt plus max_tokens: 45 positions attend over 256 slots, 305 over the whole cache;
    both exactly generate()'s tokens."""
    outputs, seen = asyncio.run(generate_and_look(tinystories_dir, tmp_path, [40, 300]))
    assert seen == [[256, 256], [slot_count(CONTEXT)] * 2]
    assert outputs == [reference_greedy(tinystories_dir, PROMPT, n) for n in (40, 300)]
