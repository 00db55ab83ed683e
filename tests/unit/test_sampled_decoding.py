"""Sampled decoding through the real driver: the decoding loop (shard.decode.speculative)
over the real blocks chained in one process, the tail's choice made by the stage's own
function (shard.node.tail_sampling), drafts drawing their guesses as the coordinator's do.

The first three tokens' joint distribution must be the target's, computed exactly here
with transformers (top-k 3 keeps it to 27 sequences), whatever K, the in-flight depth and
the draft. Chi-square against the 1 - 1e-4 quantile, seeded, so deterministic; these
samples are modest (the driver runs a model per chunk): tests/unit/test_sampling.py checks
the decisions themselves at a size that catches a 2% bias."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shard.decode.draft import ModelDraft, NgramDraft
from shard.decode.sampling import SamplingParams, process
from shard.model.synthetic import truncated_copy
from shard.node.tail_sampling import ChunkSampling

from support.chain import AlwaysAhead, LocalChain, run
from support.stats import assert_follows

PROMPT = "the cat and the dog and the cat and the"  # repeats: the n-gram draft has guesses
PARAMS = SamplingParams(temperature=1.0, top_k=3)
TOKENS = 3
SPLITS = {1: [(0, 2)], 2: [(0, 1), (1, 2)], 3: [(0, 1), (1, 2), (2, 2)]}  # the model has 2 layers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This model is tiny: torch's threads only wait for each other (more so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tinystories_dir, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tinystories_dir)
    prompt = tokenizer(PROMPT)["input_ids"]
    draft_dir = truncated_copy(tinystories_dir, tmp_path_factory.mktemp("draft") / "d", layers=1)
    drafts = {"model": ModelDraft.load(draft_dir), "target": ModelDraft.load(tinystories_dir), "ngram": NgramDraft()}
    return prompt, drafts, LocalChain(tinystories_dir, SPLITS[2])


@pytest.fixture(scope="module")
def exact(tinystories_dir, setup):
    """(first, second, third token) -> its probability under the processed target, by transformers."""
    prompt = setup[0]
    model = AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.float32)

    def next_p(prefix):
        with torch.inference_mode():
            return process(model(torch.tensor([prompt + list(prefix)])).logits[0, -1].numpy(), PARAMS)

    joint = {(): 1.0}
    for _ in range(TOKENS):
        joint = {prefix + (int(t),): mass * p[t] for prefix, mass in joint.items()
                 for p in [next_p(prefix)] for t in np.flatnonzero(p)}
    return joint


def sample(setup, draft: str | None, k: int, w: int, seeds, chain=None, tokens: int = TOKENS) -> list[tuple[int, ...]]:
    prompt, drafts, default_chain = setup
    out = []
    for seed in seeds:
        sampling = ChunkSampling(SamplingParams(PARAMS.temperature, PARAMS.top_p, PARAMS.top_k, PARAMS.min_p, seed))
        session = drafts[draft].session() if draft else None
        chosen, _ = run(chain or default_chain, prompt, session, sampling=sampling, max_tokens=tokens,
                        eos_ids=frozenset(), spec_k=k if draft else 0, in_flight=w, lookahead=AlwaysAhead())
        out.append(tuple(chosen))
    return out


def assert_joint(samples: list[tuple[int, ...]], exact: dict) -> None:
    index = {cell: i for i, cell in enumerate(exact)}
    assert all(s in index for s in samples), "a sequence the target cannot produce"
    assert_follows(np.bincount([index[s] for s in samples], minlength=len(index)), np.array(list(exact.values())))


RUNS = 300
CONFIGS = [("model", 4, 4), ("ngram", 1, 1)]  # the rest (and plain decode) are slow: below
SLOW_CONFIGS = [(None, 0, 1)] + [config for config in itertools.product(["model", "target", "ngram"], [1, 4], [1, 4])
                                  if config not in CONFIGS]


@pytest.mark.parametrize("draft, k, w", CONFIGS)
def test_first_tokens_follow_the_target(setup, exact, draft, k, w):
    assert_joint(sample(setup, draft, k, w, range(RUNS)), exact)


@pytest.mark.slow
@pytest.mark.parametrize("draft, k, w", SLOW_CONFIGS)
def test_first_tokens_follow_the_target_for_every_k_depth_and_draft(setup, exact, draft, k, w):
    assert_joint(sample(setup, draft, k, w, range(4 * RUNS)), exact)


def test_a_seed_gives_the_same_tokens_whatever_the_split_and_depth(setup, tinystories_dir):
    """The draws are keyed by (seed, position, purpose): 1, 2 or 3 stages give the same
    tokens; so does any in-flight depth (a chunk sent ahead checks its first guess against
    the bonus draw the chunk before made anyway)."""
    prompt, drafts, _ = setup
    chains = {n: LocalChain(tinystories_dir, bounds) for n, bounds in SPLITS.items()}
    seeds = range(2)
    for draft, k in ((None, 0), ("model", 4), ("ngram", 2)):
        runs = {(n, w): sample(setup, draft, k, w, seeds, chain=chain, tokens=16)
                for n, chain in chains.items() for w in ((1, 4) if draft else (1,))}
        first = next(iter(runs.values()))
        assert all(r == first for r in runs.values()), (draft, runs)
        assert len(set(first)) > 1  # different seeds, different tokens
