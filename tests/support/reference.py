"""The lossless yardstick: transformers' own greedy generate() of the whole model, in one
process, float32 on CPU. Only tests and checks use it; stages never load a whole model."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


@functools.lru_cache(maxsize=8)
def reference_model(model_dir: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=256)
def _greedy(model_dir: str, prompt_ids: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    ids = torch.tensor([prompt_ids])
    out = reference_model(model_dir).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return tuple(out[0, len(prompt_ids) :].tolist())


def reference_greedy(model_dir, prompt_ids, max_new_tokens: int) -> list[int]:
    """The new tokens of greedy generate() (fewer if the model emits its eos token)."""
    return list(_greedy(str(Path(model_dir).resolve()), tuple(int(i) for i in prompt_ids), max_new_tokens))
