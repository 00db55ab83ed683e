"""Dummy weights: a model folder holding only config.json and a marker file, whose
tensors are made on demand, so benchmarks of 8B-sized shapes write nothing big to disk.

Every tensor a real checkpoint of that config would hold gets a deterministic value from
(seed, name, element index) alone: norms are ones, biases zeros, everything else uniform
with the config's initializer_range as its standard deviation. The values come from
exact integer hashing, so they are the same on every device: a stage that makes its block
on a GPU and a reference that makes the whole model on the CPU see the same weights."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from shard.model.dtypes import config_dtype
from transformers import AutoModelForCausalLM, PretrainedConfig

MARKER = "shard-dummy.json"
_FORMAT = 1
_PRIME = 2**31 - 1  # hashing stays below 2**31 so products of two stay below 2**63: exact everywhere
_MULTIPLIERS = (2654435761, 2246822519, 3266489917)  # odd, below 2**32
_CHUNK = 1 << 24  # elements hashed at once: bounds the int64 temporaries (128 MiB)
_BITS = 24  # uniform bits per element: exact in float32


def is_dummy(model_dir) -> bool:
    return (Path(model_dir) / MARKER).is_file()


def write_dummy_model(out_dir, config: PretrainedConfig, *, seed: int = 0) -> Path:
    """A dummy-weight model folder: config.json and the marker naming the seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"format": _FORMAT, "seed": seed}) + "\n")
    return out


@dataclass(frozen=True)
class DummyWeights:
    """The tensors of a dummy folder: their shapes (those of the real checkpoint), the dtype
    they are stored in (the config's) and how each is drawn."""

    seed: int
    std: float
    dtype: torch.dtype
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def open(cls, model_dir, config: PretrainedConfig) -> DummyWeights:
        marker = Path(model_dir) / MARKER
        try:
            spec = json.loads(marker.read_text())
            seed, version = spec["seed"], spec["format"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{marker}: not a dummy-weight marker ({e})") from None
        if version != _FORMAT or not isinstance(seed, int):
            raise ValueError(f"{marker}: unsupported format {version!r} or seed {seed!r}")
        dtype = config_dtype(config)
        return cls(seed=seed, std=float(getattr(config, "initializer_range", 0.02)), dtype=dtype,
                   shapes=checkpoint_shapes(config, dtype))

    def nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * self.dtype.itemsize

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor `name`, made on `device` in the stored dtype."""
        shape = self.shapes[name]
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            return torch.ones(shape, dtype=self.dtype, device=device)
        if leaf == "bias":
            return torch.zeros(shape, dtype=self.dtype, device=device)
        return uniform(shape, key=_key(self.seed, name), std=self.std, dtype=self.dtype, device=device)


def checkpoint_shapes(config: PretrainedConfig, dtype: torch.dtype) -> dict[str, tuple[int, ...]]:
    """The tensors save_pretrained would write for this config: the model's state dict
    (persistent tensors only), without lm_head when it is tied to the embedding."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def _key(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % _PRIME


def uniform(shape: tuple[int, ...], *, key: int, std: float, dtype: torch.dtype,
            device: torch.device | str) -> torch.Tensor:
    """Uniform values of standard deviation `std` hashed from (key, index): integer ops
    only up to one float32 multiply, so every device gives the same bits."""
    numel = math.prod(shape)
    if numel >= _PRIME:
        raise ValueError(f"a dummy tensor of {numel} elements is too large (at most {_PRIME - 1})")
    out = torch.empty(numel, dtype=dtype, device=device)
    # A uniform on [-a, a] has std a / sqrt(3); a float32 tensor, so no device widens it.
    scale = torch.tensor(std * math.sqrt(12.0), dtype=torch.float32, device=device)
    for begin in range(0, numel, _CHUNK):
        x = torch.arange(begin, min(begin + _CHUNK, numel), dtype=torch.int64, device=device)
        x = (x * _MULTIPLIERS[0] % _PRIME + key) % _PRIME
        for multiplier in _MULTIPLIERS[1:]:
            x ^= x >> 15
            x = x * multiplier % _PRIME
            x ^= x >> 13
        bits = (x & ((1 << _BITS) - 1)).to(torch.float32)
        # Exact: k / 2**24 - 0.5; then one correctly rounded multiply, then one rounding to dtype.
        out[begin:begin + x.numel()] = ((bits * 2.0**-_BITS - 0.5) * scale).to(dtype)
    return out.view(shape)
