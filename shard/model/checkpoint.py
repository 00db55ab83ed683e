"""A local HF checkpoint seen through its config and safetensors headers only.

Opening a checkpoint reads no weights: the tensor map, shapes and byte counts come from
the safetensors headers, so placement can size blocks of a model that fits nowhere.
`read` then loads just the tensors a block asks for. A dummy-weight folder
(shard.model.dummy: config.json and a marker, no weights) looks the same from outside;
its tensors are made on demand.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from shard.model.dummy import MARKER, DummyWeights, is_dummy

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# Bits per element of the safetensors dtypes (sub-byte formats are packed).
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: PreTrainedConfig
    fingerprint: str  # sha256 of config.json (and a dummy's marker): names the model across nodes
    prefix: str  # base-model key prefix, normally "model."
    files: dict[str, Path]  # tensor name -> safetensors file
    sizes: dict[str, int] = field(repr=False)  # tensor name -> bytes
    layers: tuple[tuple[str, ...], ...] = field(repr=False)  # names per decoder layer
    embed_weight: str  # the input embedding matrix
    head_weight: str  # the lm_head matrix: the same tensor as embed_weight when tied
    head_names: tuple[str, ...] = field(repr=False)  # final norm + head_weight
    dummy: DummyWeights | None = field(default=None, repr=False)  # a dummy folder's tensor maker

    @classmethod
    def open(cls, model_dir) -> Checkpoint:
        path = Path(model_dir)
        if not path.is_dir():
            raise ValueError(f"model directory not found: {path}")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"no config.json in {path}")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: cannot read config.json: {e}") from e
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        if causal_lm is None or config.is_encoder_decoder or not hasattr(config, "num_hidden_layers"):
            raise ValueError(f"{path}: {config.model_type!r} is not a decoder-only causal LM")

        dummy = DummyWeights.open(path, config) if is_dummy(path) else None
        if dummy is not None:
            files = {name: path / MARKER for name in dummy.shapes}
            sizes = {name: dummy.nbytes(name) for name in dummy.shapes}
        else:
            files, sizes = _read_headers(path)
        prefix = causal_lm.base_model_prefix + "."
        layer_re = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.")
        num_layers = config.num_hidden_layers
        layers: list[list[str]] = [[] for _ in range(num_layers)]
        rest = []  # names outside the decoder layers
        for name in sorted(files):
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a stale buffer some old checkpoints carry; it is recomputed
            if m := layer_re.match(name):
                if int(m[1]) >= num_layers:
                    raise ValueError(f"{path}: tensor {name} is beyond num_hidden_layers={num_layers}")
                layers[int(m[1])].append(name)
            elif name.startswith(prefix) or name.startswith("lm_head."):
                rest.append(name)
            else:
                raise ValueError(f"{path}: unexpected tensor {name} (expected {prefix}layers.N.* style keys)")
        missing = [i for i, names in enumerate(layers) if not names]
        if missing:
            raise ValueError(f"{path}: no {prefix}layers.N.* tensors for layers {missing[:8]}")

        # Tied models store the shared matrix once, under either name (both occur in the wild).
        embed, lm_head = prefix + "embed_tokens.weight", "lm_head.weight"
        if getattr(config, "tie_word_embeddings", False):
            embed = lm_head = embed if embed in files else lm_head
        for name in (embed, lm_head):
            if name not in files:
                raise ValueError(f"{path}: no {name} tensor (not a {prefix}embed_tokens / lm_head causal LM?)")
        # The tail holds the final norm (every other non-layer tensor) and its own lm_head copy.
        head = [n for n in rest if n not in (prefix + "embed_tokens.weight", "lm_head.weight")] + [lm_head]

        return cls(
            path=path,
            config=config,
            fingerprint=config_fingerprint(path),
            prefix=prefix,
            files=files,
            sizes=sizes,
            layers=tuple(tuple(names) for names in layers),
            embed_weight=embed,
            head_weight=lm_head,
            head_names=tuple(head),
            dummy=dummy,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self.files)

    def tensor_bytes(self, name: str) -> int:
        return self.sizes[name]

    def layer_bytes(self, i: int) -> int:
        return sum(map(self.tensor_bytes, self.layers[i]))

    @property
    def embed_bytes(self) -> int:
        return self.tensor_bytes(self.embed_weight)

    @property
    def head_bytes(self) -> int:
        return sum(map(self.tensor_bytes, self.head_names))

    @property
    def total_bytes(self) -> int:
        """Bytes stored in the checkpoint (each tensor once)."""
        return sum(self.sizes.values())

    def block_names(self, start: int, end: int, first: bool | None = None, last: bool | None = None) -> list[str]:
        """The tensors a block [start, end) holds; first/last default to whether it touches the ends."""
        first = start == 0 if first is None else first
        last = end == self.num_layers if last is None else last
        if not 0 <= start <= end <= self.num_layers or (start == end and not (first or last)):
            raise ValueError(f"bad block [{start}, {end}) for a model of {self.num_layers} layers")
        names = [n for i in range(start, end) for n in self.layers[i]]
        names += [self.embed_weight] if first else []
        names += self.head_names if last else []
        return list(dict.fromkeys(names))  # a tied one-block model holds the embedding once

    def block_bytes(self, start: int, end: int, first: bool | None = None, last: bool | None = None) -> int:
        return sum(map(self.tensor_bytes, self.block_names(start, end, first, last)))

    def iter_tensors(self, names: Iterable[str],
                     device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for the asked tensors, in their stored dtype on `device`,
        opening each file once."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.files:
                raise KeyError(f"{self.path}: no tensor {name}")
            by_file[self.files[name]].append(name)
        if self.dummy is not None:  # one "file", the marker: made in the order asked
            for name in by_file[self.path / MARKER]:
                yield name, self.dummy.tensor(name, device)
            return
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in file_names:
                    yield name, f.get_tensor(name).to(device)

    def read(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return dict(self.iter_tensors(names, device))


def _read_headers(path: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """Map every tensor to its file and byte size, reading only safetensors headers."""
    if (path / _INDEX).is_file():
        weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
        file_names = sorted(set(weight_map.values()))
    elif (path / _SINGLE).is_file():
        file_names = [_SINGLE]
    else:
        raise ValueError(f"no {_SINGLE} or {_INDEX} in {path}")
    files, sizes = {}, {}
    for file_name in file_names:
        file = path / file_name
        if not file.is_file():
            raise ValueError(f"{path}: {_INDEX} names a missing file {file_name}")
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                meta = f.get_slice(name)
                bits = _DTYPE_BITS.get(meta.get_dtype())
                if bits is None:
                    raise ValueError(f"{file}: tensor {name} has unsupported dtype {meta.get_dtype()}")
                files[name] = file
                sizes[name] = math.ceil(math.prod(meta.get_shape()) * bits / 8)
    return files, sizes


def config_fingerprint(model_dir) -> str:
    """The model's identity across nodes, for nodes (like the coordinator) that hold no
    weights: its config, and for dummy weights the marker too (the seed picks the weights)."""
    path = Path(model_dir)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    if is_dummy(path):
        digest.update((path / MARKER).read_bytes())
    return digest.hexdigest()
