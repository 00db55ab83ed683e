"""Batched model drafts: sessions proposing at once, their steps run as one forward, propose
exactly what each proposes alone (greedy tokens, sampled tokens and their q), rolling back
at different times; and the batches really hold several sessions. Both kinds: dynamic
caches as one ragged batch, and static caches as the rows of one pool (what a GPU draft
graphs), run eagerly here."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from shard.decode.draft import ModelDraft
from shard.decode.draft_pool import row_buckets
from shard.decode.sampling import SamplingParams
from shard.decode.static_draft import StaticDraftSession, supports_static
from shard.model.causal_lm import load_causal_lm
from shard.model.synthetic import ARCHS

SESSIONS = 6
ROUNDS = 5
K = 4


def drive(draft: ModelDraft, index: int, vocab: int, params: SamplingParams | None,
          barrier: threading.Barrier | None = None) -> list:
    """One session's proposals over ROUNDS rounds: a prompt of its own length, then each
    round accepts a different prefix of the proposal and corrects the next token, so the
    draft's cache rolls back by different amounts in different sessions."""
    rng = random.Random(index)
    sequence = [rng.randrange(vocab) for _ in range(rng.randint(2, 24))]
    session, proposals = draft.session(), []
    for _ in range(ROUNDS):
        if barrier is not None:
            barrier.wait()  # the sessions propose at the same time
        proposal = session.propose(sequence, K) if params is None else session.propose_sampled(sequence, K, params)
        proposals.append(proposal)
        tokens = proposal if params is None else [p.token for p in proposal]
        keep = rng.randint(0, len(tokens))
        sequence += tokens[:keep] + [rng.randrange(vocab)]
    session.close()
    return proposals


def concurrently(draft: ModelDraft, vocab: int, params: SamplingParams | None) -> list:
    barrier = threading.Barrier(SESSIONS)
    with ThreadPoolExecutor(SESSIONS) as pool:
        return list(pool.map(lambda i: drive(draft, i, vocab, params, barrier), range(SESSIONS)))


def batched_draft(model_dir, kind: str) -> ModelDraft:
    """A draft batching SESSIONS sessions: over dynamic caches, or over a static pool."""
    return ModelDraft.load(model_dir, batch=SESSIONS, slots=SESSIONS if kind == "pool" else 0)


def batch_stats(draft: ModelDraft, kind: str):
    return (draft.pool if kind == "pool" else draft.batcher).stats



def check_same(batched: list, alone: list, params: SamplingParams | None) -> None:
    if params is None:
        assert batched == alone
        return
    for got, want in zip(batched, alone):
        assert [[p.token for p in r] for r in got] == [[p.token for p in r] for r in want]
        assert [[p.ids for p in r] for r in got] == [[p.ids for p in r] for r in want]
        for got_round, want_round in zip(got, want):
            for g, w in zip(got_round, want_round):
                assert g.probs == pytest.approx(w.probs, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("params", [None, SamplingParams(temperature=0.8, top_k=50, seed=7)],
                         ids=["greedy", "sampled"])
def test_sessions_batched_propose_what_each_proposes_alone(tinystories_dir, params):
    batched = ModelDraft.load(tinystories_dir)
    assert batched.batcher is not None and batched.threads >= SESSIONS  # on by default: float32 on a CPU
    alone = ModelDraft(batched.model, name="alone", batch=1)
    vocab = batched.model.config.vocab_size
    expected = [drive(alone, i, vocab, params) for i in range(SESSIONS)]
    check_same(concurrently(batched, vocab, params), expected, params)
    stats = batched.batcher.stats
    assert stats.steps == SESSIONS * ROUNDS * K
    assert stats.batched_forwards > 0 and 1 < stats.largest <= SESSIONS
    assert stats.forwards < stats.steps


def test_sessions_in_a_static_pool_propose_what_each_proposes_alone(tinystories_dir):
    """The pool's rows, run eagerly: each session's greedy proposals equal the dynamic
    draft's alone, and one forward ran several sessions' steps."""
    pooled = batched_draft(tinystories_dir, "pool")
    assert isinstance(pooled.session(), StaticDraftSession) and pooled.threads >= SESSIONS
    alone = ModelDraft(pooled.model, name="alone", batch=1, slots=0)
    vocab = pooled.model.config.vocab_size
    expected = [drive(alone, i, vocab, None) for i in range(SESSIONS)]
    assert concurrently(pooled, vocab, None) == expected
    stats = pooled.pool.stats
    assert stats.batched_forwards > 0 and 1 < stats.largest <= SESSIONS
    assert stats.forwards < stats.steps


@pytest.mark.parametrize("kind", ["dynamic", "pool"])
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])
def test_every_architecture_batches_its_draft_exactly(tiny_model_dirs, arch, kind):
    if kind == "pool" and not supports_static(load_causal_lm(tiny_model_dirs[arch]).config):
        pytest.skip(f"{arch}: no static decoding (sliding window, or an unlisted family)")
    batched = batched_draft(tiny_model_dirs[arch], kind)
    alone = ModelDraft(batched.model, name="alone", batch=1, slots=0)
    vocab = batched.model.config.vocab_size
    expected = [drive(alone, i, vocab, None) for i in range(SESSIONS)]
    assert concurrently(batched, vocab, None) == expected
    assert batch_stats(batched, kind).largest > 1


def test_pooled_sessions_in_different_length_buckets(tinystories_dir):
    """TinyStories' 512 positions make two attention extents (256 slots, and all 576): a
    session past 256 positions beside one near the start runs the longer extent for both,
    and both still propose what they propose alone."""
    pooled = batched_draft(tinystories_dir, "pool")
    alone = ModelDraft(pooled.model, name="alone", batch=1, slots=0)
    assert pooled.pool.buckets == [256, 576]
    prompts = [[(7 * i) % 2000 + 1 for i in range(300)], [5, 6, 7, 8, 9, 10]]
    # Each prompt's first proposal alone (the long prompt is written outside any batch),
    # then both extended by a token of their own, proposing at the same time.
    sessions, expected, firsts = [], [], []
    for prompt in prompts:
        reference, session = alone.session(), pooled.session()
        firsts.append(session.propose(prompt, 8))
        assert firsts[-1] == reference.propose(prompt, 8)
        expected.append(reference.propose(prompt + firsts[-1][:3] + [11], 8))
        sessions.append(session)
    barrier = threading.Barrier(2)

    def propose(index: int) -> list[int]:
        barrier.wait()
        return sessions[index].propose(prompts[index] + firsts[index][:3] + [11], 8)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(propose, range(2))) == expected
    assert pooled.pool.stats.largest == 2


@pytest.mark.parametrize("kind", ["dynamic", "pool"])
def test_a_bad_step_fails_only_its_own_session(tinystories_dir, kind):
    draft = batched_draft(tinystories_dir, kind)
    vocab = draft.model.config.vocab_size
    barrier = threading.Barrier(3)

    def propose(sequence):
        barrier.wait()
        return draft.session().propose(sequence, K)

    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(propose, sequence) for sequence in ([1, 2, 3], [1, vocab + 5], [4, 5])]
    with pytest.raises((ValueError, IndexError), match="input_ids|index out of range"):
        runs[1].result()
    alone = ModelDraft(draft.model, name="alone", batch=1, slots=0)
    assert [runs[0].result(), runs[2].result()] == [alone.session().propose(s, K) for s in ([1, 2, 3], [4, 5])]


def test_batching_is_off_where_it_would_not_be_exact(tinystories_dir):
    assert ModelDraft.load(tinystories_dir, dtype=torch.bfloat16).batcher is None
    assert ModelDraft.load(tinystories_dir, batch=1).batcher is None
    with pytest.raises(ValueError):
        ModelDraft.load(tinystories_dir, batch=0)


def test_a_pool_lends_its_lowest_free_rows_and_steps_only_the_rows_it_needs(tinystories_dir):
    """Few sessions step few rows: rows go out lowest first, and a step runs the smallest row
    bucket holding every stepping row; a session alone in a high row still proposes what it
    proposes alone in the lowest."""
    pooled = batched_draft(tinystories_dir, "pool")
    assert row_buckets(SESSIONS) == [1, 4, SESSIONS] and row_buckets(2) == [1, 2] and row_buckets(1) == [1]
    sessions = [pooled.session() for _ in range(3)]
    assert [s._lane.index for s in sessions] == [0, 1, 2]
    sessions[1].close()
    again = pooled.session()
    assert again._lane.index == 1
    held = [pooled.session() for _ in range(SESSIONS - 3)]
    assert held[-1]._lane.index == SESSIONS - 1
    alone = ModelDraft(pooled.model, name="alone", batch=1, slots=0).session()
    prompt = [1, 17, 42, 99, 3, 8]
    assert held[-1].propose(prompt, 6) == alone.propose(prompt, 6) == sessions[0].propose(prompt, 6)


@pytest.mark.parametrize("kind", ["dynamic", "pool"])
def test_a_session_drafting_alone_steps_in_its_own_thread(tinystories_dir, kind):
    """No hand-over to the batch worker while nobody else drafts; then the worker batches."""
    draft = batched_draft(tinystories_dir, kind)
    batcher, vocab = draft.pool if kind == "pool" else draft.batcher, draft.model.config.vocab_size
    alone = ModelDraft(draft.model, name="alone", batch=1, slots=0)
    assert drive(draft, 0, vocab, None) == drive(alone, 0, vocab, None)
    assert batcher._worker is None and batcher.stats.steps > 0 and batcher.stats.largest == 1
    concurrently(draft, vocab, None)
    assert batcher._worker is not None and batcher.stats.largest > 1
