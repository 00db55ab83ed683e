"""Speculative sampling's decisions (shard.decode.sampling), at scale, on real distributions:
p from the shared TinyStories model, q from a real draft (the same model cut to its first
layer). Whatever q is, the tokens chosen must follow p exactly.

The statistic is Pearson's chi-square over the tokens (bins of expected count < 5 pooled),
against its 1 - 1e-4 quantile (support.stats): a correct sampler fails a check with probability 1e-4
(1e-4; about 1e-3 over the checks here). The draws are counter-based (seeded), so each run
of this file draws the same numbers: a check passes or fails the same way every time. The
negative controls show the checks' power: a sampler off by 2% of probability mass fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from shard.decode.sampling import (MAX_SUPPORT, Proposal, Purpose, SamplingParams, check_proposal, choose,
                                   draw, process, propose, uniform)
from shard.model.synthetic import truncated_copy

from support import stats

DRAWS = 20_000
PROMPTS = ["Once upon a time there was a little", "The dog ran to the"]
SETTINGS = {  # name -> (prompt, processing)
    "t1": (PROMPTS[0], SamplingParams(temperature=1.0)),
    "t0.7-topk40": (PROMPTS[1], SamplingParams(temperature=0.7, top_k=40)),
    "t1-topp0.9-minp0.02": (PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02)),
}


def assert_follows(tokens: np.ndarray, p: np.ndarray) -> None:
    stats.assert_follows(np.bincount(tokens, minlength=p.size), p)


@pytest.fixture(scope="module")
def logits(tinystories_dir, tmp_path_factory):
    """prompt -> (the target's next-token logits, the 1-layer draft's), float32 as the tail has them."""
    draft_dir = truncated_copy(tinystories_dir, tmp_path_factory.mktemp("draft") / "d", layers=1)
    tokenizer = AutoTokenizer.from_pretrained(tinystories_dir)
    target = AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    out = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out[prompt] = (target(ids).logits[0, -1].numpy(), draft(ids).logits[0, -1].numpy())
    return out


def spec_sample(p: np.ndarray, q: np.ndarray, seeds: range, position: int = 9) -> np.ndarray:
    """The draft's guess from q, then the tail's choice, once per seed."""
    return np.array([choose(p, propose(q, seed, position), seed, position)[0] for seed in seeds])


@pytest.mark.parametrize("name", SETTINGS)
def test_processing_is_transformers(logits, name):
    """p is what transformers' warpers make of the logits (same order, same support)."""
    _, params = SETTINGS[name]
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    for target, _ in logits.values():
        scores = torch.tensor(target, dtype=torch.float64)[None]
        for warper in warpers:
            scores = warper(None, scores)
        theirs = torch.softmax(scores, -1)[0].numpy()
        ours = process(target, params)
        assert np.array_equal(ours > 0, theirs > 0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", SETTINGS)
def test_speculative_sampling_follows_the_target(logits, name):
    """Drafted from the 1-layer model's q (cut to its top 64) or proposed one-hot (n-gram):
    the chosen tokens follow p, as plain draws from p do."""
    prompt, params = SETTINGS[name]
    target, draft = logits[prompt]
    p, q = process(target, params), process(draft, params)
    assert_follows(spec_sample(p, q, range(DRAFTS_OFFSET, DRAFTS_OFFSET + DRAWS)), p)
    one_hot = [choose(p, Proposal.one_hot(int(np.argmax(q))), seed, 9)[0] for seed in range(DRAWS)]
    assert_follows(np.array(one_hot), p)
    plain = [choose(p, None, seed, 9)[0] for seed in range(DRAWS)]
    assert_follows(np.array(plain), p)


DRAFTS_OFFSET = 10 ** 6  # other seeds than the plain draws'


def test_the_check_catches_a_two_percent_bias(logits):
    """Negative controls at the same sample size: 2% of the mass moved to one token, and the
    classic mistake of resampling from p (not from max(0, p - q)) after a rejection."""
    target, draft = logits[PROMPTS[0]]
    _, params = SETTINGS["t1"]
    p, q = process(target, params), process(draft, params)
    seeds = range(DRAWS)
    honest = spec_sample(p, q, seeds)
    biased = np.where([uniform(s, 0, Purpose.SAMPLE) < 0.02 for s in seeds], int(np.argsort(p)[-20]), honest)
    assert_follows(honest, p)
    with pytest.raises(AssertionError):
        assert_follows(biased, p)

    def naive(seed: int) -> int:
        guess = propose(q, seed, 9)
        token, accepted = choose(p, guess, seed, 9)
        return token if accepted else draw(p, uniform(seed, 9, Purpose.RESIDUAL))

    with pytest.raises(AssertionError):
        assert_follows(np.array([naive(s) for s in seeds]), p)


def test_randomness_is_counter_based():
    """A uniform depends on (seed, position, purpose) only: the same numbers on a replay."""
    assert uniform(5, 100, Purpose.ACCEPT) == uniform(5, 100, Purpose.ACCEPT)
    values = {uniform(s, pos, purpose) for s in (0, 1) for pos in (0, 1) for purpose in Purpose}
    assert len(values) == 2 * 2 * len(Purpose)
    draws = np.array([uniform(7, pos, Purpose.SAMPLE) for pos in range(20_000)])
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert abs(draws.mean() - 0.5) < 0.01


def test_a_proposal_is_what_the_wire_carries(logits):
    """q is cut to the draft's most likely tokens and stored as float32: the tail reads the
    same numbers the draft drew from."""
    _, draft = logits[PROMPTS[0]]
    q = process(draft, SETTINGS["t1"][1])
    guess = propose(q, 3, 9)
    assert len(guess.ids) == MAX_SUPPORT and guess.token in guess.ids
    assert all(np.float32(w) == w for w in guess.probs)
    assert propose(q, 3, 9) == guess  # counter-based: the same seed and position, the same guess


@pytest.mark.parametrize("proposal, problem", [
    (Proposal(5, (), ()), "support"),
    (Proposal(5, (5, 5), (0.5, 0.5)), "distinct"),
    (Proposal(5, (5, 9999), (0.5, 0.5)), "distinct"),
    (Proposal(5, (5,), (float("nan"),)), "finite"),
    (Proposal(5, (5, 6), (0.0, 1.0)), "drafted token"),
    (Proposal(7, (5, 6), (0.5, 0.5)), "drafted token"),
    (Proposal(5, tuple(range(MAX_SUPPORT + 1)), (1.0,) * (MAX_SUPPORT + 1)), "support"),
])
def test_proposals_the_tail_cannot_decide_on_are_refused(proposal, problem):
    with pytest.raises(ValueError, match=problem):
        check_proposal(proposal, vocab_size=2048)
