"""The static-KV, padded-shape path (what a GPU stage graphs), run eagerly on the CPU in
float32: token for token what transformers' generate() and the dynamic path produce,
through padding, chunks split into pieces, rollbacks and sliding windows."""

import pytest
import torch

from shard.model.block import Block, CacheGapError
from shard.model.checkpoint import Checkpoint
from shard.model.static_block import StaticBlock
from shard.model.static_kv import StaticKV, slot_count

from support.chain import LocalChain
from test_block import N_NEW, bounds_for, model_dir, near_ties, prompt_for, reference_for  # noqa: F401 (a fixture)

# Small sizes so that the tests' prompts (8 and 5 tokens) are padded and also split.
STATIC = dict(capacity=96, chunk_sizes=(3, 6))


def static_chain(model_dir, stages: int, **overrides) -> LocalChain:
    bounds = bounds_for(Checkpoint.open(model_dir).num_layers, stages)
    return LocalChain(model_dir, bounds, static={**STATIC, **overrides})


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_static_greedy_decode_matches_generate(model_dir, stages):
    chain = static_chain(model_dir, stages)
    prompt, ref = prompt_for(model_dir), reference_for(model_dir)
    assert chain.greedy(prompt, N_NEW) == ref
    assert chain.cache_lengths() == [len(prompt) + N_NEW - 1] * stages


@pytest.mark.parametrize("chunk_sizes", [(3, 6), (5,), (64,)])
def test_static_verify_chunks_match_generate(model_dir, chunk_sizes):
    """Chunks of 5 in a size of 6 (padded), of 5 (exact) and of 64 (mostly padding); a
    prompt over the largest size runs as pieces."""
    chain = static_chain(model_dir, 2, chunk_sizes=chunk_sizes)
    prompt, ref = prompt_for(model_dir), reference_for(model_dir)
    got = chain(0, prompt)
    for i in range(0, N_NEW - 1, 5):
        got += chain(len(prompt) + i, ref[i : i + 5], num_outputs=0)[: N_NEW - 1 - i]
    wrong = [len(prompt) - 1 + i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert got == ref, near_ties(model_dir, prompt + ref, wrong)


def test_static_rollback_overwrites_and_masks_stale_slots(model_dir):
    """Rejected tokens stay in their slots until overwritten: the mask must hide them."""
    num_layers = Checkpoint.open(model_dir).num_layers
    chain = static_chain(model_dir, 3 if num_layers > 4 else 2)
    prompt, ref = prompt_for(model_dir), reference_for(model_dir)
    p = len(prompt)
    assert chain(0, prompt) == ref[:1]
    assert chain(p, ref[:20], num_outputs=0) == ref[1:21]
    chain(p + 20, [(t + 1) % 100 for t in ref[20:32]], num_outputs=0)
    # Back 22 positions (more than a sliding window), with 12 stale slots left beyond.
    assert chain(p + 10, ref[10:15], num_outputs=0) == ref[11:16]
    assert set(chain.cache_lengths()) == {p + 15}
    chain(p + 15, [(ref[15] + 1) % 100])  # a wrong token, then that very position again
    out = ref[:16]
    while len(out) < N_NEW:
        out += chain(p + len(out) - 1, out[-1:])
    assert out == ref


def test_padding_never_writes_a_position_slot(tiny_model_dirs):
    block = Block.load(tiny_model_dirs["llama"], 0, 3, last=False, progress=False)
    static = StaticBlock(block, capacity=16, chunk_sizes=(8,))
    cache = static.new_cache()
    static.forward(cache, 0, input_ids=torch.tensor([5, 6, 7]))
    assert cache.length == 3
    keys = cache.keys[0][0, :, :, :]
    assert keys[:, :3].abs().sum() > 0
    assert keys[:, 3:16].abs().sum() == 0  # padding rows wrote only the scratch slot
    assert keys[:, 16].abs().sum() > 0


def test_static_errors_leave_the_cache_alone(tiny_model_dirs):
    block = Block.load(tiny_model_dirs["mistral"], 0, 3, last=False, progress=False)
    static = StaticBlock(block, capacity=10, chunk_sizes=(4,))
    cache = static.new_cache()
    with pytest.raises(CacheGapError):
        static.forward(cache, 1, input_ids=torch.tensor([1, 2]))
    static.forward(cache, 0, input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(CacheGapError):
        static.forward(cache, 4, input_ids=torch.tensor([5]))
    with pytest.raises(ValueError, match="exceed this stage's 10 per session"):
        static.forward(cache, 3, input_ids=torch.tensor(list(range(8))))
    with pytest.raises(ValueError):
        static.forward(cache, 3, input_ids=torch.tensor([1, 10**6]))
    assert cache.length == 3
    assert static.forward(cache, 3, input_ids=torch.tensor(list(range(7)))).shape == (7, 64)
    assert cache.length == 10


def test_bad_settings_are_refused(tiny_model_dirs):
    block = Block.load(tiny_model_dirs["llama"], 0, 6, progress=False)
    for settings in [dict(capacity=0, chunk_sizes=(4,)), dict(capacity=513, chunk_sizes=(4,)),
                     dict(capacity=8, chunk_sizes=()), dict(capacity=8, chunk_sizes=(0, 4))]:
        with pytest.raises(ValueError):
            StaticBlock(block, **settings)


def test_a_pool_hands_out_each_cache_once_and_takes_it_back(tiny_model_dirs):
    block = Block.load(tiny_model_dirs["qwen3"], 0, 2, last=False, progress=False)
    static = StaticBlock(block, capacity=8, chunk_sizes=(4,), pool_size=2)
    a, b = static.new_cache(), static.new_cache()
    assert isinstance(a, StaticKV) and {a.slot, b.slot} == {0, 1}
    with pytest.raises(RuntimeError, match="in use"):
        static.new_cache()
    static.forward(a, 0, input_ids=torch.tensor([1, 2]))
    static.release(a)
    again = static.new_cache()
    assert again is a and again.length == 0  # a new session starts empty
    # 8 positions and the scratch slot, rounded up to an aligned slot count (64).
    assert static.bytes_per_session(block, 8) == a.nbytes == 64 * block.kv_bytes_per_position
    assert slot_count(63) == 64 and slot_count(64) == 128


def test_a_random_block_made_in_memory_runs_like_a_loaded_one():
    """Block.random (the GPU benchmark's 8B-shaped blocks, here small) on both paths."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                  max_position_embeddings=256)
    block = Block.random(config, 3, device="cpu", dtype=torch.float32)
    assert block.num_layers == 3 and not (block.is_first or block.is_last) and block.fingerprint == ""
    assert block.weight_bytes == 3 * 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256 + 2 * 128)  # q o, k v, mlp, norms
    generator = torch.Generator().manual_seed(0)
    prefix, chunk = torch.randn(20, 128, generator=generator), torch.randn(9, 128, generator=generator)
    static = StaticBlock(block, capacity=64, chunk_sizes=(9, 16))
    cache, dynamic = static.new_cache(), block.new_cache()
    static.forward(cache, 0, hidden=prefix)
    block.forward(dynamic, 0, hidden=prefix)
    torch.testing.assert_close(static.forward(cache, 20, hidden=chunk), block.forward(dynamic, 20, hidden=chunk))
    ends = StaticBlock(Block.random(config, 2, first=True, last=True, dtype=torch.float32), capacity=8,
                       chunk_sizes=(4,))
    ids = ends.forward(ends.new_cache(), 0, input_ids=torch.tensor([1, 2, 3]), num_outputs=0)
    assert ids.shape == (3,) and ids.dtype == torch.int64


def test_grouped_sdpa_is_transformers_sdpa_without_copying_kv_heads(tiny_model_dirs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from shard.model.static_kv import _few_rows_attention, chunk_mask, grouped_sdpa, static_attention

    block = Block.load(tiny_model_dirs["llama"], 0, 2, last=False, progress=False)
    attention = block.model.layers[0].self_attn  # 4 query heads over 2 KV heads
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 5, 16, generator=generator)
    key, value = torch.randn(2, 1, 2, 33, 16, generator=generator)
    mask = chunk_mask(torch.tensor([7, 8, 9, 32, 32]), torch.arange(33), None, None)
    ours, _ = grouped_sdpa(attention, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(ours, theirs)
    # The layers' lookup: grouped inside a static forward (this thread only), their own outside.
    layers_sdpa = ALL_ATTENTION_FUNCTIONS[block.model.config._attn_implementation]
    with static_attention():
        assert torch.equal(layers_sdpa(attention, query, key, value, mask, scaling=0.25)[0], ours)
    assert torch.equal(layers_sdpa(attention, query, key, value, mask, scaling=0.25)[0], theirs)
    # The CUDA path's two GEMMs, checked here on the CPU.
    rows = query.reshape(1, 2, 10, 16)
    two_gemms = _few_rows_attention(rows, key, value, mask.repeat(1, 1, 2, 1), 0.25)
    torch.testing.assert_close(two_gemms, torch.nn.functional.scaled_dot_product_attention(
        rows, key, value, attn_mask=mask.repeat(1, 1, 2, 1), scale=0.25))
