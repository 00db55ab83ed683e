"""Draft models that agree with a target often, rarely or never: copies of the target,
perturbed, cut down or re-drawn at random, each with the target's tokenizer files."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt")


def _save(model, source: Path, out: Path) -> Path:
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


def perturbed_copy(source, out, *, noise: float, seed: int = 0) -> Path:
    """The target with Gaussian noise (relative to each tensor's spread) on every weight."""
    source, out = Path(source), Path(out)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = parameter.std() if parameter.numel() > 1 else parameter.abs()
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * noise)
    return _save(model, source, out)


def truncated_copy(source, out, *, layers: int) -> Path:
    """The target's first `layers` decoder layers, then its own norm and head."""
    source, out = Path(source), Path(out)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return _save(model, source, out)


def unrelated_copy(source, out, *, seed: int = 1234) -> Path:
    """Same architecture and tokenizer, fresh random weights: a draft that never agrees."""
    source, out = Path(source), Path(out)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    return _save(AutoModelForCausalLM.from_config(config, dtype=torch.float32), source, out)
