import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import T5Config

from shard.model.checkpoint import Checkpoint
from shard.model.synthetic import ARCHS


def _all_tensors(model_dir):
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("name", [*ARCHS, "llama-sharded"])
def test_byte_accounting_matches_the_tensors(tiny_model_dirs, name):
    ckpt = Checkpoint.open(tiny_model_dirs[name])
    tensors = _all_tensors(tiny_model_dirs[name])
    assert ckpt.tensor_names == sorted(tensors)
    for tensor_name, tensor in tensors.items():
        assert ckpt.tensor_bytes(tensor_name) == tensor.numel() * tensor.element_size()
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    # Untied: every tensor belongs to exactly one part.
    L = ckpt.num_layers
    assert sum(ckpt.layer_bytes(i) for i in range(L)) + ckpt.embed_bytes + ckpt.head_bytes == ckpt.total_bytes
    assert ckpt.embed_bytes == tensors["model.embed_tokens.weight"].numel() * 4
    assert ckpt.head_bytes == (tensors["model.norm.weight"].numel() + tensors["lm_head.weight"].numel()) * 4
    assert ckpt.layer_bytes(1) == sum(
        t.numel() * 4 for n, t in tensors.items() if n.startswith("model.layers.1.")
    )
    assert ckpt.block_bytes(0, L) == ckpt.total_bytes
    assert ckpt.block_bytes(0, 2) + ckpt.block_bytes(2, L) == ckpt.total_bytes
    assert ckpt.block_bytes(1, 3) == ckpt.layer_bytes(1) + ckpt.layer_bytes(2)
    assert ckpt.block_bytes(1, 3, first=True, last=True) == ckpt.block_bytes(1, 3) + ckpt.embed_bytes + ckpt.head_bytes
    assert (ckpt.num_layers, ckpt.hidden_size, ckpt.vocab_size) == (6, 64, 512)


def test_tied_model_counts_the_embedding_in_the_head(tinystories_dir):
    # This checkpoint stores the tied matrix once, as lm_head.weight, and no embed_tokens.
    ckpt = Checkpoint.open(tinystories_dir)
    assert ckpt.embed_weight == ckpt.head_weight == "lm_head.weight"
    matrix = ckpt.tensor_bytes("lm_head.weight")
    assert ckpt.embed_bytes == matrix
    assert ckpt.head_bytes == matrix + ckpt.tensor_bytes("model.norm.weight")
    layers = ckpt.layer_bytes(0) + ckpt.layer_bytes(1)
    assert layers + ckpt.head_bytes == ckpt.total_bytes
    # Split, both ends hold a copy; in one block it is held once.
    assert ckpt.block_bytes(0, 1) + ckpt.block_bytes(1, 2) == ckpt.total_bytes + matrix
    assert ckpt.block_bytes(0, 2) == ckpt.total_bytes


def test_fingerprint_is_the_sha256_of_config_json(tiny_model_dirs):
    prints = {}
    for name, path in tiny_model_dirs.items():
        prints[name] = Checkpoint.open(path).fingerprint
        assert prints[name] == hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    assert len(set(prints[a] for a in ARCHS)) == len(ARCHS)
    # Same model saved as one file or many: same identity.
    assert prints["llama"] == prints["llama-sharded"]


def test_open_reads_headers_only_and_read_opens_each_file_once(tiny_model_dirs, safetensors_spy):
    path = tiny_model_dirs["llama-sharded"]
    ckpt = Checkpoint.open(path)
    assert safetensors_spy.tensors_read == []
    assert len(set(ckpt.files.values())) > 2

    names = ["model.layers.2.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight", "lm_head.weight"]
    safetensors_spy.opened.clear()
    got = ckpt.read(names)
    assert sorted(got) == sorted(names) and sorted(safetensors_spy.tensors_read) == sorted(names)
    assert sorted(safetensors_spy.opened) == sorted({ckpt.files[n] for n in names})
    everything = _all_tensors(path)
    for name in names:
        assert torch.equal(got[name], everything[name])
    with pytest.raises(KeyError):
        ckpt.read(["model.layers.99.mlp.up_proj.weight"])


def test_bad_blocks_are_rejected(tiny_model_dirs):
    ckpt = Checkpoint.open(tiny_model_dirs["llama"])
    for start, end in [(2, 2), (3, 1), (-1, 2), (0, 7)]:
        with pytest.raises(ValueError, match="bad block"):
            ckpt.block_bytes(start, end)


def _copy_config(src, dst):
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    return dst


def test_errors_name_the_path(tmp_path, tiny_model_dirs):
    src = tiny_model_dirs["llama"]
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"not found: {re.escape(str(missing))}"):
        Checkpoint.open(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"no config.json in {re.escape(str(empty))}"):
        Checkpoint.open(empty)

    no_weights = _copy_config(src, tmp_path / "no-weights")
    with pytest.raises(ValueError, match=f"no model.safetensors .* in {re.escape(str(no_weights))}"):
        Checkpoint.open(no_weights)

    seq2seq = tmp_path / "t5"
    T5Config(num_layers=1, d_model=8, d_kv=4, d_ff=8, num_heads=2, vocab_size=16).save_pretrained(seq2seq)
    with pytest.raises(ValueError, match=f"{re.escape(str(seq2seq))}: 't5' is not a decoder-only causal LM"):
        Checkpoint.open(seq2seq)

    gpt2_keys = _copy_config(src, tmp_path / "gpt2-keys")
    save_file({"transformer.h.0.attn.weight": torch.zeros(2)}, gpt2_keys / "model.safetensors")
    with pytest.raises(ValueError, match=f"{re.escape(str(gpt2_keys))}: unexpected tensor transformer.h.0"):
        Checkpoint.open(gpt2_keys)

    tensors = load_file(src / "model.safetensors")
    missing_layer = _copy_config(src, tmp_path / "missing-layer")
    save_file({n: t for n, t in tensors.items() if ".layers.3." not in n}, missing_layer / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers \[3\]"):
        Checkpoint.open(missing_layer)

    no_head = _copy_config(src, tmp_path / "no-head")
    save_file({n: t for n, t in tensors.items() if n != "lm_head.weight"}, no_head / "model.safetensors")
    with pytest.raises(ValueError, match="no lm_head.weight"):
        Checkpoint.open(no_head)

    broken_index = _copy_config(src, tmp_path / "broken-index")
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" for n in tensors}}
    (broken_index / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing file model-00001-of-00002.safetensors"):
        Checkpoint.open(broken_index)

    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ValueError, match=f"{re.escape(str(bad_config))}: cannot read config.json"):
        Checkpoint.open(bad_config)
