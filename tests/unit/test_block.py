"""Blocks chained in one process reproduce transformers' generate() token for token."""

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shard.model.block import Block, CacheGapError
from shard.model.checkpoint import Checkpoint
from shard.model.synthetic import ARCHS

from support.chain import LocalChain
from support.reference import reference_greedy, reference_model

MODELS = [*ARCHS, "llama-sharded", "tinystories"]
N_NEW = 40  # well past the tiny models' sliding window of 8
TINY_PROMPT = [1, 17, 42, 99, 3, 250, 7, 311]


@pytest.fixture(params=MODELS)
def model_dir(request, tiny_model_dirs):
    if request.param == "tinystories":
        return request.getfixturevalue("tinystories_dir")
    return tiny_model_dirs[request.param]


@functools.cache
def prompt_for(model_dir) -> list[int]:
    if (model_dir / "tokenizer.json").is_file():  # the real model: real text
        return AutoTokenizer.from_pretrained(model_dir)("Once upon a time")["input_ids"]
    return TINY_PROMPT


def bounds_for(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """One block, two halves, or the uneven [0,1) [1,4) [4,L); a model too short for that
    gets layer-less ends: the embedding alone, all layers, the head alone."""
    if stages == 3 and num_layers < 5:
        return [(0, 0), (0, num_layers), (num_layers, num_layers)]
    cuts = {1: [], 2: [num_layers // 2], 3: [1, 4]}[stages]
    return list(zip([0, *cuts], [*cuts, num_layers]))


def chain_for(model_dir, stages: int) -> LocalChain:
    return LocalChain(model_dir, bounds_for(Checkpoint.open(model_dir).num_layers, stages))


def reference_for(model_dir, n: int = N_NEW) -> list[int]:
    ref = reference_greedy(model_dir, prompt_for(model_dir), n)
    assert len(ref) == n, "generate() stopped early at eos; pick another prompt"
    return ref


def near_ties(model_dir, tokens: list[int], positions) -> str:
    """Reference top-1 minus top-2 logit at positions: what a float-noise flip would need."""
    with torch.no_grad():
        logits = reference_model(str(model_dir.resolve()))(torch.tensor([tokens])).logits[0]
    top2 = logits.topk(2, dim=-1).values
    return ", ".join(f"pos {p}: margin {float(top2[p, 0] - top2[p, 1]):.2e}" for p in positions)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_decode_matches_generate(model_dir, stages):
    chain = chain_for(model_dir, stages)
    prompt, ref = prompt_for(model_dir), reference_for(model_dir)
    assert chain.greedy(prompt, N_NEW) == ref
    # A config-less cache keeps every position, also in sliding-window layers.
    assert chain.cache_lengths() == [len(prompt) + N_NEW - 1] * stages
    assert all(len(cache.layers) == block.num_layers
               for block, cache in zip(chain.blocks, chain.caches) if block.num_layers)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_multi_token_chunks_match_generate(model_dir, stages):
    """A verify chunk's every argmax is the next reference token (what speculation relies on).

    Chunks are not bitwise equal to one-token steps in float32 (other matmul shapes), so a
    reference near tie could flip; the failure message shows the reference margins.
    """
    chain = chain_for(model_dir, stages)
    prompt, ref = prompt_for(model_dir), reference_for(model_dir)
    got = chain(0, prompt)
    for i in range(0, N_NEW - 1, 5):
        chunk = ref[i : i + 5]
        got += chain(len(prompt) + i, chunk, num_outputs=0)[: N_NEW - 1 - i]
    wrong = [len(prompt) - 1 + i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert got == ref, near_ties(model_dir, prompt + ref, wrong)


def test_tiny_models_are_not_degenerate_and_really_slide(tiny_model_dirs):
    for arch in ARCHS:
        assert len(set(reference_for(tiny_model_dirs[arch]))) > N_NEW // 2, arch
    # Same seed, same weights; Mistral only adds the 8-token window: the window changes the text.
    llama, mistral = (Checkpoint.open(tiny_model_dirs[a]) for a in ("llama", "mistral"))
    some = ["model.layers.3.mlp.up_proj.weight", "lm_head.weight"]
    assert all(torch.equal(llama.read(some)[n], mistral.read(some)[n]) for n in some)
    assert reference_for(tiny_model_dirs["llama"]) != reference_for(tiny_model_dirs["mistral"])


def test_num_outputs_selects_the_last_positions(tiny_model_dirs):
    model_dir = tiny_model_dirs["qwen3"]
    ref = reference_for(model_dir)
    tokens = TINY_PROMPT + ref[:10]
    chain = chain_for(model_dir, 2)
    assert chain(0, tokens, num_outputs=3) == ref[8:11]
    assert chain(0, tokens, num_outputs=0)[-11:] == ref[:11]


def test_rollback_crops_and_continues_exactly(model_dir):
    num_layers = Checkpoint.open(model_dir).num_layers
    chain = LocalChain(model_dir, bounds_for(num_layers, 3 if num_layers > 4 else 2))
    prompt, ref = prompt_for(model_dir), reference_for(model_dir)
    p = len(prompt)
    assert chain(0, prompt) == ref[:1]
    assert chain(p, ref[:20], num_outputs=0) == ref[1:21]
    wrong = [(t + 1) % 100 for t in ref[20:32]]
    chain(p + 20, wrong, num_outputs=0)
    assert chain.cache_lengths() == [p + 32] * len(chain.blocks)
    # Back 22 positions (more than a sliding window) with no message but start_pos.
    assert chain(p + 10, ref[10:15], num_outputs=0) == ref[11:16]
    assert chain.cache_lengths() == [p + 15] * len(chain.blocks)
    # Feed a wrong token, then overwrite that very position.
    chain(p + 15, [(ref[15] + 1) % 100])
    out = ref[:16]
    while len(out) < N_NEW:
        out += chain(p + len(out) - 1, out[-1:])
    assert out == ref


def test_a_gap_in_the_cache_is_an_error(tiny_model_dirs):
    block = Block.load(tiny_model_dirs["mistral"], 0, 3, progress=False)
    cache = block.new_cache()
    with pytest.raises(CacheGapError):
        block.forward(cache, 1, input_ids=torch.tensor([1, 2]))
    assert block.cache_length(cache) == 0
    block.forward(cache, 0, input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(CacheGapError):
        block.forward(cache, 4, input_ids=torch.tensor([5]))
    assert block.cache_length(cache) == 3
    assert block.forward(cache, 3, input_ids=torch.tensor([5])).shape == (1, 64)


def _bad_first_block_calls(vocab, max_pos):
    ids = torch.tensor([1, 2, 3])
    return {
        "float ids": dict(input_ids=ids.float()),
        "int32 ids": dict(input_ids=ids.int()),
        "2-D ids": dict(input_ids=ids[None]),
        "empty": dict(input_ids=ids[:0]),
        "id == vocab": dict(input_ids=torch.tensor([1, vocab])),
        "negative id": dict(input_ids=torch.tensor([-1, 2])),
        "hidden to first": dict(hidden=torch.zeros(3, 64)),
        "both": dict(input_ids=ids, hidden=torch.zeros(3, 64)),
        "neither": dict(),
        "ids as list": dict(input_ids=[1, 2, 3]),
        "num_outputs > n": dict(input_ids=ids, num_outputs=4),
        "num_outputs < 0": dict(input_ids=ids, num_outputs=-1),
        "negative start_pos": dict(input_ids=ids, start_pos=-1),
        "float start_pos": dict(input_ids=ids, start_pos=0.0),
        "past max positions": dict(input_ids=ids, start_pos=max_pos - 2),
    }


def _bad_later_block_calls():
    return {
        "ids to later block": dict(input_ids=torch.tensor([1, 2])),
        "wrong width": dict(hidden=torch.zeros(3, 63)),
        "1-D hidden": dict(hidden=torch.zeros(64)),
        "3-D hidden": dict(hidden=torch.zeros(1, 3, 64)),
        "int hidden": dict(hidden=torch.zeros(3, 64, dtype=torch.int64)),
        "empty hidden": dict(hidden=torch.zeros(0, 64)),
    }


def test_bad_inputs_are_value_errors_and_leave_the_cache_alone(tiny_model_dirs):
    head = Block.load(tiny_model_dirs["llama"], 0, 3, progress=False)
    tail = Block.load(tiny_model_dirs["llama"], 3, 6, progress=False)
    head_cache, tail_cache = head.new_cache(), tail.new_cache()
    tail.forward(tail_cache, 0, hidden=head.forward(head_cache, 0, input_ids=torch.tensor([4, 5])))
    calls = [(head, head_cache, _bad_first_block_calls(head.vocab_size, 512))]
    calls.append((tail, tail_cache, _bad_later_block_calls()))
    for block, cache, bad in calls:
        for what, kwargs in bad.items():
            start_pos = kwargs.pop("start_pos", 2)
            with pytest.raises(ValueError):
                block.forward(cache, start_pos, **kwargs)
                pytest.fail(f"accepted: {what}")
            assert block.cache_length(cache) == 2, what


def test_load_rejects_bad_bounds(tiny_model_dirs, tmp_path):
    for start, end, ends in [(3, 2, {}), (-1, 2, {}), (0, 7, {}), (2, 2, {}),
                             (1, 3, {"first": True}), (1, 3, {"last": True})]:
        with pytest.raises(ValueError, match="bad block|holds no layers"):
            Block.load(tiny_model_dirs["llama"], start, end, progress=False, **ends)
    with pytest.raises(ValueError, match="not found"):
        Block.load(tmp_path / "nope", 0, 1)


def test_a_block_reads_and_holds_only_its_tensors(tiny_model_dirs, safetensors_spy):
    model_dir = tiny_model_dirs["llama-sharded"]
    ckpt = Checkpoint.open(model_dir)
    block = Block.load(model_dir, 1, 3, progress=False)  # a middle block of [0,1) [1,3) [3,5) [5,6)

    names = ckpt.block_names(1, 3)
    assert sorted(safetensors_spy.tensors_read) == sorted(names)
    assert {file for file, _ in safetensors_spy.reads} == {ckpt.files[n] for n in names}
    assert len({ckpt.files[n] for n in names}) < len(set(ckpt.files.values()))
    assert block.weight_bytes == ckpt.block_bytes(1, 3) < ckpt.total_bytes / 2
    keys = set(block.model.state_dict())
    assert {k.split(".")[1] for k in keys if k.startswith("layers.")} == {"0", "1"}
    assert not any(k.startswith(("embed_tokens", "norm")) for k in keys)
    assert block.lm_head is None and (block.is_first, block.is_last) == (False, False)
    assert not any(t.is_meta for t in [*block.model.parameters(), *block.model.buffers()])


@pytest.mark.parametrize("stages", [1, 2])
def test_weight_bytes_match_the_checkpoint(model_dir, stages):
    ckpt = Checkpoint.open(model_dir)
    for block in chain_for(model_dir, stages).blocks:
        assert block.weight_bytes == ckpt.block_bytes(block.start, block.end)
        assert block.fingerprint == ckpt.fingerprint
        assert (block.hidden_size, block.vocab_size) == (ckpt.hidden_size, ckpt.vocab_size)


def test_tied_one_block_model_holds_the_matrix_once(tinystories_dir):
    block = Block.load(tinystories_dir, 0, 2, progress=False)
    assert block.lm_head.weight is block.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_same_choices_as_from_pretrained(tiny_model_dirs, arch):
    """The attention kernel and the recomputed rotary buffers are the reference's."""
    ref = reference_model(str(tiny_model_dirs[arch].resolve()))
    block = Block.load(tiny_model_dirs[arch], 2, 6, progress=False)
    assert block.model.config._attn_implementation == ref.config._attn_implementation
    assert torch.equal(block.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert block.model.rotary_emb.attention_scaling == ref.model.rotary_emb.attention_scaling


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dtypes_follow_from_pretrained(tiny_model_dirs, dtype):
    model_dir = tiny_model_dirs["gpt_oss"]  # keeps its norms in float32 under float16
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ref_dtypes = {k: v.dtype for k, v in ref.state_dict().items()}
    block = Block.load(model_dir, 4, 6, dtype=dtype, progress=False)
    for name, tensor in block.model.state_dict().items():
        global_name = "model." + name.replace("layers.0.", "layers.4.").replace("layers.1.", "layers.5.")
        assert tensor.dtype == ref_dtypes[global_name], name
    assert block.lm_head.weight.dtype == ref_dtypes["lm_head.weight"]
    assert block.dtype == dtype


def test_bfloat16_chain_runs(tiny_model_dirs):
    chain = LocalChain(tiny_model_dirs["qwen2"], [(0, 3), (3, 6)], dtype=torch.bfloat16)
    hidden = chain.blocks[0].forward(chain.caches[0], 0, input_ids=torch.tensor(TINY_PROMPT))
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (len(TINY_PROMPT), 64)
    ids = chain.blocks[1].forward(chain.caches[1], 0, hidden=hidden.float(), num_outputs=0)
    assert ids.dtype == torch.int64 and ids.shape == (len(TINY_PROMPT),)
