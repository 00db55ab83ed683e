"""Dummy-weight folders (a config and a marker, no weights): the checkpoint a real save
would write, deterministic values, the same weights through a block as in one process,
and a chain of blocks that decodes exactly as transformers does on them."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shard.config import ConfigError, check_model_dir
from shard.model.block import Block
from shard.model.causal_lm import load_causal_lm
from shard.model.checkpoint import Checkpoint, config_fingerprint
from shard.model.dummy import MARKER, uniform
from shard.model.synthetic import TINY_TARGET, build_dummy_model

from support.chain import LocalChain

PROMPT = [1, 17, 42, 99, 3, 250, 7, 311]


@pytest.fixture(scope="module")
def dummy_dir(tmp_path_factory):
    return build_dummy_model(tmp_path_factory.mktemp("dummy") / "tiny", TINY_TARGET, dtype="float32",
                             initializer_range=0.5)


def test_the_folder_holds_no_weights_yet_looks_like_the_real_checkpoint(dummy_dir, tmp_path):
    assert sorted(p.name for p in dummy_dir.iterdir()) == ["config.json", MARKER]
    check_model_dir(dummy_dir)  # a node accepts it as a model folder
    real_dir = tmp_path / "real"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dummy_dir)).save_pretrained(real_dir)
    dummy, real = Checkpoint.open(dummy_dir), Checkpoint.open(real_dir)
    assert dummy.sizes == real.sizes  # every tensor a save writes, at its size
    assert (dummy.layers, dummy.head_names, dummy.embed_weight) == (real.layers, real.head_names, real.embed_weight)
    assert dummy.block_bytes(0, 3) == real.block_bytes(0, 3)


def test_a_folder_without_weights_or_marker_is_refused(dummy_dir, tmp_path):
    (tmp_path / "config.json").write_text((dummy_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        check_model_dir(tmp_path)
    (tmp_path / MARKER).write_text(json.dumps({"format": 1, "seed": "zero"}))
    with pytest.raises(ValueError, match="unsupported format 1 or seed 'zero'"):
        Checkpoint.open(tmp_path)


def test_fingerprint_is_stable_and_names_the_seed(dummy_dir, tmp_path):
    assert Checkpoint.open(dummy_dir).fingerprint == Checkpoint.open(dummy_dir).fingerprint
    assert Checkpoint.open(dummy_dir).fingerprint == config_fingerprint(dummy_dir)
    other = build_dummy_model(tmp_path / "seed-1", TINY_TARGET, dtype="float32", initializer_range=0.5, seed=1)
    assert (other / "config.json").read_bytes() == (dummy_dir / "config.json").read_bytes()
    assert config_fingerprint(other) != config_fingerprint(dummy_dir)  # other weights, other model
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(Checkpoint.open(other).read([name])[name], Checkpoint.open(dummy_dir).read([name])[name])


def test_values_are_deterministic_and_shaped_like_an_init(dummy_dir):
    ckpt = Checkpoint.open(dummy_dir)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight",
             "model.layers.2.input_layernorm.weight", "lm_head.weight"]
    first, again = ckpt.read(names), Checkpoint.open(dummy_dir).read(names)
    assert all(torch.equal(first[n], again[n]) for n in names)
    assert not torch.equal(first[names[0]], first[names[1]])  # each name its own draw
    assert torch.equal(first[names[2]], torch.ones(TINY_TARGET["hidden_size"]))
    big = uniform((512, 1024), key=7, std=0.02, dtype=torch.float32, device="cpu")
    assert abs(float(big.mean())) < 1e-3 and abs(float(big.std()) - 0.02) < 2e-4
    assert float(big.abs().max()) <= 0.02 * 3**0.5
    # Neighbours are not correlated (a plain linear congruence would make ramps).
    flat = big.flatten()
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 0.01


def test_a_block_holds_the_one_process_models_tensors(tmp_path):
    """Stored in bfloat16, loaded in float32 both ways: the same bits in a stage as in the reference."""
    model_dir = build_dummy_model(tmp_path / "bf16", TINY_TARGET, initializer_range=0.5)
    whole = dict(load_causal_lm(model_dir, dtype=torch.float32).named_parameters())
    block = Block.load(model_dir, 2, 6, dtype=torch.float32, progress=False)
    held = {**{f"model.{k}": v for k, v in block.model.named_parameters()},
            **{f"lm_head.{k}": v for k, v in block.lm_head.named_parameters()}}
    for name, tensor in held.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        source = name.replace(f"layers.{layer}.", f"layers.{int(layer) + 2}.") if layer else name
        assert tensor.dtype == torch.float32 and torch.equal(tensor, whole[source]), name
    assert torch.equal(whole["model.embed_tokens.weight"].bfloat16().float(), whole["model.embed_tokens.weight"])


@pytest.mark.parametrize("bounds", [[(0, 6)], [(0, 2), (2, 6)], [(0, 1), (1, 4), (4, 6)]])
def test_blocks_decode_as_transformers_does(dummy_dir, bounds):
    model = load_causal_lm(dummy_dir)
    ids = torch.tensor([PROMPT])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                              do_sample=False)[0, len(PROMPT):].tolist()
    assert len(set(expected)) > 8  # a varied continuation, not one repeated token
    assert LocalChain(dummy_dir, bounds).greedy(PROMPT, 24) == expected
