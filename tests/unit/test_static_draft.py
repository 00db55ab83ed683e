"""The static-cache draft (what a GPU draft captures as a CUDA graph) run eagerly on the
CPU: token for token the dynamic-cache draft's proposals, through rollbacks of every depth;
its slots (or a pool's rows) lent to one session at a time; its capacity a hard end."""

import pytest
import torch

from shard.decode.draft import DEFAULT_BATCH, ModelDraft, ModelDraftSession
from shard.decode.static_draft import StaticDraftSession

from support.drafts import drive


@pytest.mark.parametrize("slots", [1, 2], ids=["slot", "pool"])
@pytest.mark.parametrize("arch", ["tinystories", "llama", "qwen2", "qwen3"])
def test_static_proposals_equal_the_dynamic_drafts(arch, slots, tinystories_dir, tiny_model_dirs):
    model_dir = tinystories_dir if arch == "tinystories" else tiny_model_dirs[arch]
    dynamic = ModelDraft.load(model_dir)
    static = ModelDraft(dynamic.model, name="static", slots=slots)
    assert (static.pool is not None) == (slots > 1)
    sessions = [dynamic.session(), static.session()]
    assert [type(s) for s in sessions] == [ModelDraftSession, StaticDraftSession]
    made = drive(sessions, [1, 17, 42, 99, 3], dynamic.model.config.vocab_size, proposals=60, seed=len(arch))
    assert made[1] == made[0]
    assert sum(map(len, made[0])) > 150


@pytest.mark.parametrize("batch", [1, 2], ids=["slots", "pool"])
def test_slots_are_lent_one_session_at_a_time(tiny_model_dirs, batch):
    draft = ModelDraft.load(tiny_model_dirs["llama"], slots=2, batch=batch)
    assert (draft.pool is not None) == (batch > 1)
    first, second, third = draft.session(), draft.session(), draft.session()
    # Beyond the slots a session still drafts, eagerly over a dynamic cache.
    assert [type(s) for s in (first, second, third)] == [StaticDraftSession, StaticDraftSession, ModelDraftSession]
    prompt = [1, 17, 42, 99, 3]
    expected = third.propose(prompt, 5)
    assert first.propose(prompt, 5) == expected
    first.close()
    assert first.propose(prompt, 5) == []  # a closed session holds no slot to draft with
    fourth = draft.session()  # the slot given back, with another session's KV in it
    assert isinstance(fourth, StaticDraftSession)
    assert fourth.propose(prompt, 5) == expected
    first.close()  # closing twice gives nothing back twice
    assert isinstance(draft.session(), ModelDraftSession)


@pytest.mark.parametrize("slots", [1, 2], ids=["slot", "pool"])
def test_a_static_cache_ends_at_its_capacity(tiny_model_dirs, slots):
    draft = ModelDraft.load(tiny_model_dirs["llama"], slots=slots, max_positions=16)
    session = draft.session()
    # Up to position 15 can be written, and the last proposal is never fed: 16 + 1 - 14 = 3.
    assert len(session.propose(list(range(1, 15)), 8)) == 3
    assert session.propose(list(range(1, 18)), 8) == []


def test_static_decoding_only_where_it_fits(tiny_model_dirs):
    # A sliding window needs a mask the static step does not build.
    with pytest.raises(ValueError, match="full attention"):
        ModelDraft.load(tiny_model_dirs["mistral"], slots=1)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        ModelDraft.load(tiny_model_dirs["llama"], slots=1, capture=True)
    # By default the CPU drafts eagerly, its sessions' steps batched, each session in a thread.
    on_cpu = ModelDraft.load(tiny_model_dirs["llama"])
    assert isinstance(on_cpu.session(), ModelDraftSession) and on_cpu.threads == DEFAULT_BATCH
    assert on_cpu.batcher is not None
    assert on_cpu.model.dtype == torch.float32


def test_the_draft_step_benchmark_runs_on_a_cpu():
    from shard.bench.draft_step import draft_step_bench

    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=256)
    result = draft_step_bench(device="cpu", dtype=torch.float32, shape=shape, context=16, steps=4, repeats=2)
    assert result["eager_ms"] > 0 and result["static_eager_ms"] > 0
    assert result["graphed_ms"] is None and result["graphed_equals_static_eager"] is None  # no graphs on a CPU
    assert result["static_equals_dynamic"] is True


@pytest.mark.parametrize("slots", [1, 2], ids=["slot", "pool"])
def test_proposals_across_length_buckets_equal_the_dynamic_drafts(tinystories_dir, slots):
    """TinyStories' 512 positions make two attention extents (256 slots, all 576: its 512,
    scratch and alignment): proposals that cross from one to the other, and a rollback back
    into the first, change nothing."""
    dynamic = ModelDraft.load(tinystories_dir)
    static = ModelDraft(dynamic.model, name="static", slots=slots)
    sessions = [dynamic.session(), static.session()]
    assert (static.pool or sessions[1]._lane).buckets == [256, 576]
    prompt = [(7 * i) % 2000 + 1 for i in range(250)]
    for sequence, n in ((prompt, 12), (prompt[:100], 8), (prompt + [5] * 20, 6)):
        dynamic_tokens, static_tokens = (s.propose(sequence, n) for s in sessions)
        assert static_tokens == dynamic_tokens
