"""Sampling through the real services: the seed reaches the tail in the sealed chunk
header, the tail samples, only ids and logprobs come back. A seeded run gives the tokens
the in-process chain gives with the same seed (tests/unit/test_sampled_decoding.py shows
those follow the target's distribution and do not depend on the split), on 1, 2 and 3
stages, plain and speculative; stop strings, logprobs and refusals are the public API's."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from shard.client import generate
from shard.decode.sampling import SamplingParams, process
from shard.decode.draft import ModelDraft, NgramDraft
from shard.model.synthetic import truncated_copy
from shard.node.tail_sampling import ChunkSampling
from shard.v1 import api_pb2

from support.chain import AlwaysAhead, LocalChain, run
from support.reference import reference_greedy
from support.stats import assert_follows
from support.swarm import inprocess_swarm

PROMPT = [1, 415, 1022, 264, 727]
NEW = 32
SAMPLING = dict(temperature=0.8, top_p=0.95)


def request(**fields) -> api_pb2.GenerateRequest:
    fields.setdefault("max_tokens", NEW)
    return api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), **fields)


def chain_reference(model_dir, seed: int, draft=None, k: int = 0, max_tokens: int = NEW, **sampling) -> list[int]:
    """The same seeded generation over the blocks chained in this process."""
    params = SamplingParams(**{**SAMPLING, **sampling}, seed=seed)
    chain = LocalChain(model_dir, [(0, 2)])
    tokens, _ = run(chain, PROMPT, draft.session() if draft else None, sampling=ChunkSampling(params),
                    max_tokens=max_tokens, eos_ids=frozenset(), spec_k=k, in_flight=4, lookahead=AlwaysAhead())
    return tokens


@pytest.fixture(scope="module")
def draft_dir(tinystories_dir, tmp_path_factory):
    return truncated_copy(tinystories_dir, tmp_path_factory.mktemp("draft") / "truncated", layers=1)


@pytest.mark.parametrize("stages", [pytest.param(1, marks=pytest.mark.slow), 2,
                                    pytest.param(3, marks=pytest.mark.slow)])
def test_a_seed_gives_the_chains_tokens_on_any_number_of_stages(tinystories_dir, draft_dir, tmp_path, stages):
    runs = {"none": (None, 0), str(draft_dir): (ModelDraft.load(draft_dir), 4), "ngram": (NgramDraft(), 2)}

    async def main():
        async with inprocess_swarm(tinystories_dir, stages, tmp_path,
                                   coordinator_args=[f"--draft={draft_dir}"]) as swarm:
            return {name: await generate(swarm.coordinator.address, swarm.tls(), request(
                draft=name, spec_k=k, in_flight=4, seed=21, stop_at_eos=False, **SAMPLING))
                for name, (_, k) in runs.items()}

    for name, generation in asyncio.run(main()).items():
        draft, k = runs[name]
        assert list(generation.summary.output_ids) == chain_reference(tinystories_dir, 21, draft, k), name
        assert generation.streamed_ids == list(generation.summary.output_ids)
        assert generation.summary.seed == 21


def test_an_unset_seed_is_drawn_and_reported(tinystories_swarm):
    swarm = tinystories_swarm
    first = swarm.run(generate(swarm.coordinator.address, swarm.tls(), request(**SAMPLING)))
    assert first.summary.HasField("seed")
    again = swarm.run(generate(swarm.coordinator.address, swarm.tls(), request(seed=first.summary.seed, **SAMPLING)))
    assert list(again.summary.output_ids) == list(first.summary.output_ids)
    greedy = swarm.run(generate(swarm.coordinator.address, swarm.tls(), request(temperature=0.0)))
    assert not greedy.summary.HasField("seed")


def test_first_tokens_through_the_swarm_follow_the_target(tinystories_swarm, tinystories_dir):
    """A modest sample (the decisions are checked at scale in tests/unit/test_sampling.py)."""
    swarm, top_k, runs = tinystories_swarm, 4, 200
    model = AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.float32)
    with torch.inference_mode():
        p = process(model(torch.tensor([PROMPT])).logits[0, -1].numpy(), SamplingParams(1.0, top_k=top_k))

    async def first_tokens():
        return [(await generate(swarm.coordinator.address, swarm.tls(), request(
            max_tokens=1, temperature=1.0, top_k=top_k, seed=seed))).summary.output_ids[0] for seed in range(runs)]

    assert_follows(np.bincount(swarm.run(first_tokens()), minlength=p.size), p)


def test_stop_strings_end_the_text_before_them(tinystories_swarm, tinystories_dir):
    swarm = tinystories_swarm
    full = swarm.run(generate(swarm.coordinator.address, swarm.tls(), request(stop_at_eos=False)))
    text = full.summary.text
    stop = text[len(text) // 2:len(text) // 2 + 5]
    texts = []
    cut = swarm.run(generate(swarm.coordinator.address, swarm.tls(), request(stop=[stop, "never-there"], spec_k=4,
                                                                             draft="ngram", stop_at_eos=False),
                             on_text=texts.append))
    summary = cut.summary
    assert summary.finish_reason == api_pb2.FINISH_REASON_STOP
    assert summary.text == text[:text.index(stop)] == "".join(texts)
    assert list(summary.output_ids) == list(full.summary.output_ids)[:len(summary.output_ids)]
    assert cut.streamed_ids == list(summary.output_ids)
    assert len(summary.output_ids) < len(full.summary.output_ids)


async def _deltas(swarm, req):
    from shard.v1 import api_pb2_grpc
    from shard.wire.tls import open_channel

    async with open_channel(swarm.coordinator.address, swarm.tls()) as channel:
        return [r.delta async for r in api_pb2_grpc.InferenceServiceStub(channel).Generate(req) if r.HasField("delta")]


def test_logprobs_are_the_targets(tinystories_swarm, tinystories_dir):
    """Greedy: log-softmax of the logits, the chosen token the most likely. Sampled: of the
    processed distribution. One entry per id, in every delta, speculative or not."""
    swarm = tinystories_swarm
    model = AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.float32)
    for fields, params in (({}, None), (dict(temperature=0.7, top_k=20, seed=3), SamplingParams(0.7, top_k=20))):
        deltas = swarm.run(_deltas(swarm, request(max_tokens=12, logprobs=3, draft="ngram", spec_k=3, **fields)))
        ids = [i for d in deltas for i in d.ids]
        entries = [e for d in deltas for e in d.logprobs]
        assert all(len(d.logprobs) == len(d.ids) for d in deltas) and len(ids) == 12
        with torch.inference_mode():
            logits = model(torch.tensor([PROMPT + ids])).logits[0, len(PROMPT) - 1:-1].double()
        for row, token, entry in zip(logits, ids, entries):
            expected = torch.log_softmax(row, -1) if params is None else torch.tensor(
                np.log(np.maximum(process(row.numpy(), params), 1e-300)))  # log 0 -> very negative
            assert entry.id == token and len(entry.top) == 3
            assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-4)
            assert [t.id for t in entry.top] == expected.topk(3).indices.tolist()
            if params is None:
                assert entry.top[0].id == token


@pytest.mark.parametrize("fields, code, words", [
    (dict(temperature=2.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(temperature=1.0, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(temperature=1.0, min_p=1.0), grpc.StatusCode.INVALID_ARGUMENT, "min_p"),
    (dict(top_k=5), grpc.StatusCode.INVALID_ARGUMENT, "temperature above 0"),
    (dict(logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    (dict(stop=["a", "b", "c", "d", "e"]), grpc.StatusCode.INVALID_ARGUMENT, "stop strings"),
    (dict(stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop strings"),
    (dict(repetition_penalty=5.0), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty"),
    (dict(temperature=1.0, presence_penalty=0.5), grpc.StatusCode.UNIMPLEMENTED, "penalties"),
])
def test_settings_that_cannot_be_served_exactly_are_refused(tinystories_swarm, fields, code, words):
    swarm = tinystories_swarm
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        swarm.run(generate(swarm.coordinator.address, swarm.tls(), request(**fields)))
    assert caught.value.code() == code and words in caught.value.details()


def test_greedy_stays_generate(tinystories_swarm, tinystories_dir):
    """temperature 0 (and unset) is the target's argmax: token-identical to generate()."""
    swarm = tinystories_swarm
    expected = reference_greedy(tinystories_dir, PROMPT, NEW)
    for fields in ({}, dict(temperature=0.0, seed=5), dict(logprobs=0)):
        generation = swarm.run(generate(swarm.coordinator.address, swarm.tls(), request(
            stop_at_eos=False, draft="ngram", spec_k=4, **fields)))
        assert list(generation.summary.output_ids) == expected, fields
