"""Draft models that agree with a target often or never: copies of the target, perturbed
or re-drawn at random, each with the target's tokenizer files (a cut-down copy is
`shard.model.synthetic.truncated_copy`, which the benchmark uses too); and a random
verification history to drive draft sessions through."""

from __future__ import annotations

import random
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


def drive(sessions, prompt: list[int], vocab: int, proposals: int, seed: int,
          max_length: int = 400) -> list[list[list[int]]]:
    """The same random verification history for every session: each proposal has a random
    prefix accepted, then a correction; now and then the sequence is cut far back (a ring
    replay), so the draft must roll back across many positions; past `max_length` tokens it
    starts again near the prompt. Returns each session's proposals."""
    rng = random.Random(seed)
    sequence = list(prompt)
    made = [[] for _ in sessions]
    for _ in range(proposals):
        n = rng.randint(1, 6)
        for record, session in zip(made, sessions):
            record.append(session.propose(sequence, n))
        accepted = rng.randint(0, n)
        sequence = sequence + made[0][-1][:accepted]
        if accepted < n or rng.random() < 0.5:
            sequence.append(rng.randrange(vocab))
        if rng.random() < 0.08:
            sequence = sequence[:max(len(prompt), len(sequence) - rng.randint(1, 30))]
        if len(sequence) > max_length:  # within every draft's context
            sequence = sequence[:len(prompt) + 7]
    return made
