"""Batched model drafts: sessions proposing at once, their steps run as one forward, propose
exactly what each proposes alone (greedy tokens, sampled tokens and their q), rolling back
at different times; and the batches really hold several sessions."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from shard.decode.draft import ModelDraft
from shard.decode.sampling import SamplingParams
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


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])
def test_every_architecture_batches_its_draft_exactly(tiny_model_dirs, arch):
    batched = ModelDraft.load(tiny_model_dirs[arch], batch=SESSIONS)
    alone = ModelDraft(batched.model, name="alone", batch=1)
    vocab = batched.model.config.vocab_size
    expected = [drive(alone, i, vocab, None) for i in range(SESSIONS)]
    assert concurrently(batched, vocab, None) == expected
    assert batched.batcher.stats.largest > 1


def test_a_bad_step_fails_only_its_own_session(tinystories_dir):
    draft = ModelDraft.load(tinystories_dir, batch=SESSIONS)
    vocab = draft.model.config.vocab_size
    barrier = threading.Barrier(3)

    def propose(sequence):
        barrier.wait()
        return draft.session().propose(sequence, K)

    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(propose, sequence) for sequence in ([1, 2, 3], [1, vocab + 5], [4, 5])]
    with pytest.raises(ValueError, match="input_ids"):
        runs[1].result()
    alone = ModelDraft(draft.model, name="alone", batch=1)
    assert [runs[0].result(), runs[2].result()] == [alone.session().propose(s, K) for s in ([1, 2, 3], [4, 5])]


def test_batching_is_off_where_it_would_not_be_exact(tinystories_dir):
    assert ModelDraft.load(tinystories_dir, dtype=torch.bfloat16).batcher is None
    assert ModelDraft.load(tinystories_dir, batch=1).batcher is None
    with pytest.raises(ValueError):
        ModelDraft.load(tinystories_dir, batch=0)
