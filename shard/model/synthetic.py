"""Small models made offline, saved like real checkpoints: tiny random ones of every
supported architecture, a demo one with a byte tokenizer (`shard up` without the shared
real model), a compute-heavy one (benchmarks) and a target cut to its first layers (a
draft for it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt_oss")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    max_position_embeddings=512,
    # Much larger than the 0.02 default: with it, greedy decoding of a random model
    # collapses to one repeated token; with this, continuations are varied.
    initializer_range=0.5,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

_EXTRA = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    # A small window so that 32+ token tests really slide.
    "mistral": dict(sliding_window=8),
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 3,
        # YaRN, as the real model uses, with a context short enough to be consistent.
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=8.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
            original_max_position_embeddings=64,
        ),
    ),
}


def build_tiny_model(arch: str, out_dir, *, seed: int = 0, sharded: bool = False) -> Path:
    """Save a tiny random `arch` model (config, safetensors, generation config) to out_dir."""
    if arch not in _EXTRA:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    out = Path(out_dir)
    config = AutoConfig.for_model(arch, **_COMMON, **_EXTRA[arch])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # No eos: generate() must never stop early, whatever the random model says.
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=None)
    # A small shard size forces several files and a model.safetensors.index.json.
    model.save_pretrained(out, max_shard_size="100KB" if sharded else "10GB")
    return out


def build_demo_model(out_dir) -> Path:
    """A tiny random llama with a byte-level tokenizer, so `shard up` has text to show
    (gibberish) on a machine without the shared real model. Reused if already built."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if (out / "tokenizer.json").is_file() and (out / "config.json").is_file():
        return out
    build_tiny_model("llama", out)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(out)
    return out


def build_compute_model(out_dir) -> Path:
    """A random llama heavy enough that compute, not the wire, dominates each token on a
    CPU (tens of ms), for the pipeline-overhead benchmark. Reused if already built."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    config = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                  num_attention_heads=16, num_key_value_heads=4, vocab_size=8192,
                                  max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=None)
    model.save_pretrained(out)
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt")


def save_with_tokenizer(model, source, out) -> Path:
    """Save `model` to out with the tokenizer files of the model folder `source`."""
    source, out = Path(source), Path(out)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


def truncated_copy(source, out, *, layers: int) -> Path:
    """The target's first `layers` decoder layers, then its own norm and head."""
    model = AutoModelForCausalLM.from_pretrained(Path(source), dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return save_with_tokenizer(model, source, out)


# Dummy-weight shapes (shard.model.dummy: a config and a marker, tensors made on demand).
# Llama-3-8B's and Llama-3.2-1B's shapes, with a context long enough for benchmarks.
LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=4096)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=4096)
# Llama-3-70B's and Llama-3.1-405B's shapes: targets no single GPU holds (one stage per GPU).
LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=28672, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=4096)
LLAMA_405B = dict(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                  intermediate_size=53248, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=4096)
# Their stand-ins for CPU runs of the same harness: the tiny llama, and a 2-layer draft.
TINY_TARGET = {k: v for k, v in _COMMON.items() if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads", "head_dim",
                                                          "vocab_size", "max_position_embeddings")}
TINY_DRAFT = {**TINY_TARGET, "num_hidden_layers": 2}


def build_dummy_model(out_dir, shape: dict, *, dtype: str = "bfloat16", seed: int = 0,
                      initializer_range: float = 0.02) -> Path:
    """A llama of `shape` as a dummy-weight folder: nothing but config.json and the marker."""
    from shard.model.dummy import write_dummy_model

    config = AutoConfig.for_model("llama", **shape, dtype=dtype, initializer_range=initializer_range,
                                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                  pad_token_id=None)
    return write_dummy_model(out_dir, config, seed=seed)
