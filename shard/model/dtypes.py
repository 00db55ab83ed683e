"""The dtype a model's config names."""

from __future__ import annotations

import torch


def config_dtype(config) -> torch.dtype:
    """The dtype of the checkpoint's weights as its config names it (a torch.dtype or its
    name), float32 where it names none."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
