"""Speculation through the real services: drafts on the coordinator, verify chunks over
mTLS + AEAD edges, stale epochs cancelled out of band; the output stays exact."""

import asyncio

import pytest

from shard.client import generate
from shard.model.synthetic import truncated_copy
from shard.v1 import api_pb2

from support.drafts import perturbed_copy
from support.reference import reference_greedy
from support.swarm import inprocess_swarm

PROMPT = [1, 415, 1022, 264, 727]
NEW = 48


@pytest.fixture(scope="module")
def draft_dirs(tinystories_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")
    return {
        "target": str(tinystories_dir),
        "truncated": str(truncated_copy(tinystories_dir, root / "truncated", layers=1)),
        "perturbed": str(perturbed_copy(tinystories_dir, root / "perturbed", noise=0.2)),
        "ngram": "ngram",
    }


async def run_all(model_dir, stages, workdir, drafts: dict[str, str], settings):
    coordinator_args = [f"--draft={path}" for path in drafts.values()]
    async with inprocess_swarm(model_dir, stages, workdir, coordinator_args=coordinator_args) as swarm:
        results = {}
        for name, path in drafts.items():
            for k, in_flight in settings:
                request = api_pb2.GenerateRequest(
                    prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=NEW, draft=path,
                    spec_k=k, in_flight=in_flight)
                results[name, k, in_flight] = await generate(swarm.coordinator.address, swarm.tls(), request)
        await asyncio.sleep(0.3)
        held = sum(len(s.node.info().sessions) for s in swarm.stages)
        dropped = sum(s.node.info().frames_dropped_stale for s in swarm.stages)
    return results, held, dropped


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_speculation_over_the_ring_is_lossless(tinystories_dir, draft_dirs, stages, tmp_path):
    settings = [(1, 1), (4, 1), (4, 4), (8, 4)]
    results, held, dropped = asyncio.run(run_all(tinystories_dir, stages, tmp_path, draft_dirs, settings))
    expected = reference_greedy(tinystories_dir, PROMPT, NEW)
    for key, generation in results.items():
        summary = generation.summary
        assert list(summary.output_ids) == expected, key
        assert generation.streamed_ids == expected, key
        assert summary.spec_k == key[1] and summary.in_flight == key[2]
        assert summary.traversals <= summary.chunks_sent
    assert results["target", 8, 4].summary.acceptance_rate == 1.0
    assert results["target", 8, 4].summary.tokens_per_traversal > 5
    assert results["target", 8, 4].summary.chunks_wasted == 0
    assert 0 < results["truncated", 4, 4].summary.acceptance_rate < 1
    # Rejections, each rolled back exactly. (Whether chunks in flight were wasted on them is
    # timing: the decoder reads a result that comes back mid-draft before drafting on.)
    assert results["perturbed", 4, 4].summary.pipeline_breaks > 0
    assert held == 0  # every session's KV was freed at every stage


def test_unknown_draft_and_bad_settings_are_invalid_argument(tinystories_dir, tmp_path):
    import grpc

    async def attempt(**fields):
        async with inprocess_swarm(tinystories_dir, 1, tmp_path) as swarm:
            outcomes = []
            for request_fields in fields.values():
                request = api_pb2.GenerateRequest(prompt="Once", max_tokens=4, **request_fields)
                try:
                    await generate(swarm.coordinator.address, swarm.tls(), request)
                    outcomes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    outcomes.append(error.code())
            return outcomes

    outcomes = asyncio.run(attempt(unknown={"draft": "/etc"}, k={"draft": "ngram", "spec_k": 1000},
                                   w={"draft": "ngram", "in_flight": 0}, ok={"draft": "ngram"}))
    assert outcomes == [grpc.StatusCode.INVALID_ARGUMENT] * 3 + [grpc.StatusCode.OK]


def test_oracle_drafts_take_their_reference_from_the_ring(tinystories_dir, tmp_path):
    """The coordinator runs the prompt's plain decode once, then the oracle proposes from it:
    P = 1 is always accepted, P = 0 never, and the output is the plain decode either way."""
    oracles = ["oracle:1.0", "oracle:0"]

    async def main():
        async with inprocess_swarm(tinystories_dir, 2, tmp_path,
                                   coordinator_args=[f"--draft={spec}" for spec in oracles]) as swarm:
            results = {}
            for spec in oracles:
                request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=NEW,
                                                  draft=spec, spec_k=4, in_flight=4)
                results[spec] = await generate(swarm.coordinator.address, swarm.tls(), request)
            references = dict(swarm.coordinator.node.references)
            await asyncio.sleep(0.3)
            held = sum(len(s.node.info().sessions) for s in swarm.stages)
        return results, references, held

    results, references, held = asyncio.run(main())
    expected = reference_greedy(tinystories_dir, PROMPT, NEW)
    assert references == {tuple(PROMPT): expected}  # one plain decode, shared by both oracles
    for spec, generation in results.items():
        assert list(generation.summary.output_ids) == expected, spec
    assert results["oracle:1.0"].summary.acceptance_rate == 1.0
    assert results["oracle:0"].summary.acceptance_rate == 0.0 and results["oracle:0"].summary.draft_tokens > 0
    assert held == 0  # the reference sessions' KV was freed too
