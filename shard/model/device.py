"""Where a model runs and in which precision, when the operator says "auto": a GPU where
there is one, in bfloat16 there (half the bytes to stream, and what GPUs compute fastest),
float32 on a CPU (which has no fast bfloat16 matmuls, and where CI checks exact equality)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype name of shard.config.DTYPES; "auto" follows the device."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]
