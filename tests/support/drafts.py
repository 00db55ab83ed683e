"""Draft models that agree with a target often or never: copies of the target, perturbed
or re-drawn at random, each with the target's tokenizer files (a cut-down copy is
`shard.model.synthetic.truncated_copy`, which the benchmark uses too)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shard.model.synthetic import save_with_tokenizer


def perturbed_copy(source, out, *, noise: float, seed: int = 0) -> Path:
    """The target with Gaussian noise (relative to each tensor's spread) on every weight."""
    source, out = Path(source), Path(out)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = parameter.std() if parameter.numel() > 1 else parameter.abs()
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * noise)
    return save_with_tokenizer(model, source, out)


def unrelated_copy(source, out, *, seed: int = 1234) -> Path:
    """Same architecture and tokenizer, fresh random weights: a draft that never agrees."""
    source, out = Path(source), Path(out)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    return save_with_tokenizer(AutoModelForCausalLM.from_config(config, dtype=torch.float32), source, out)
