"""The controlled-acceptance draft: acceptance is what P says, the output stays the plain
decode whatever P, runs repeat, and the real model runs for its cost."""

import pytest

from shard.decode.draft import ModelDraft
from shard.decode.oracle import OracleDraft

from support.chain import AlwaysAhead, LocalChain, run
from support.reference import reference_greedy

PROMPT = [1, 415, 1022, 264, 727]
NEW = 160
EOS = frozenset([2])  # the model's; generate() stops there too


@pytest.fixture(scope="module")
def setting(tinystories_dir):
    model = ModelDraft.load(tinystories_dir)
    steps = []
    model.model.model.register_forward_hook(lambda *_: steps.append(1))  # the draft model's forwards
    expected = reference_greedy(tinystories_dir, PROMPT, NEW)
    return model, steps, expected, LocalChain(tinystories_dir, [(0, 1), (1, 2)])


@pytest.mark.parametrize("p, in_flight", [(1.0, 4), (0.8, 1), (0.0, 4)])
def test_acceptance_follows_p_and_the_output_is_plain_decode(setting, p, in_flight):
    model, steps, expected, chain = setting
    oracle = OracleDraft(model, p, name=f"oracle:{p}")
    outcomes = []
    for _ in range(2 if p == 0.8 else 1):
        steps.clear()
        session = oracle.session(PROMPT + expected)
        out, stats = run(chain, PROMPT, session, max_tokens=NEW, eos_ids=EOS, spec_k=4,
                         in_flight=in_flight, lookahead=AlwaysAhead())
        session.close()
        assert out == expected
        assert len(steps) >= stats.proposed  # the model ran a step per proposed token, at least
        outcomes.append((stats.drafted, stats.accepted))
    assert outcomes == outcomes[:1] * len(outcomes)  # seeded: a run repeats exactly
    drafted, accepted = outcomes[0]
    if p == 1.0:
        assert accepted == drafted > NEW // 2
    elif p == 0.0:
        assert accepted == 0 and drafted > NEW // 2
    else:
        assert drafted > 100 and abs(accepted / drafted - p) < 0.08


def test_an_oracle_over_a_static_draft(tinystories_dir, setting):
    _, _, expected, chain = setting
    static = ModelDraft(ModelDraft.load(tinystories_dir).model, name="static", slots=1)
    oracle = OracleDraft(static, 0.8, name="oracle:0.8")
    session = oracle.session(PROMPT + expected)
    out, stats = run(chain, PROMPT, session, max_tokens=NEW, eos_ids=EOS, spec_k=4, in_flight=4,
                     lookahead=AlwaysAhead())
    session.close()
    assert out == expected and 0 < stats.accepted < stats.drafted
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        OracleDraft(static, 1.5, name="oracle:1.5")
