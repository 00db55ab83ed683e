"""What a receipt names a model by: the sha256 of a block's weights, of the tokenizer, of
the config. Weights are hashed as stored (the bytes in the safetensors files, whatever
dtype a node computes in), so any holder of the checkpoint recomputes the same hash.

Block weight hash: sha256 over the block's tensors in name order, each as
len(name) (4, big-endian) || name || len(meta) || meta || sha256(data), where meta is the
tensor's safetensors dtype and shape as "F32:[64,128]". A folder of dummy weights (no
files: synthetic tensors from a seed) hashes its marker and the block's names instead.

Hashing reads the block once; results are kept per process (a stage hashes at load, and
the model folder may be read-only)."""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from pathlib import Path

from shard.model.checkpoint import Checkpoint
from shard.model.dummy import MARKER

_LEN = struct.Struct(">I")
_READ = 1 << 24
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


def _lp(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def _safetensors_index(file: Path) -> tuple[int, dict]:
    """(where the data starts, the header) of a safetensors file."""
    with file.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size, json.loads(f.read(size))


@functools.lru_cache(maxsize=64)
def block_weights_sha256(model_dir: str, start: int, end: int, first: bool, last: bool) -> str:
    checkpoint = Checkpoint.open(model_dir)
    names = sorted(checkpoint.block_names(start, end, first, last))
    digest = hashlib.sha256()
    if checkpoint.dummy is not None:
        digest.update((checkpoint.path / MARKER).read_bytes())
        for name in names:
            digest.update(_lp(name.encode()))
        return digest.hexdigest()
    indexes: dict[Path, tuple[int, dict]] = {}
    for name in names:
        file = checkpoint.files[name]
        if file not in indexes:
            indexes[file] = _safetensors_index(file)
        base, header = indexes[file]
        meta = header[name]
        begin, stop = meta["data_offsets"]
        tensor = hashlib.sha256()
        with file.open("rb") as f:
            f.seek(base + begin)
            left = stop - begin
            while left:
                piece = f.read(min(left, _READ))
                if not piece:
                    raise ValueError(f"{file}: tensor {name} is cut short")
                tensor.update(piece)
                left -= len(piece)
        described = f"{meta['dtype']}:{json.dumps(meta['shape'], separators=(',', ':'))}".encode()
        digest.update(_lp(name.encode()) + _lp(described) + tensor.digest())
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def tokenizer_sha256(model_dir: str) -> str:
    """sha256 over the tokenizer files present, each as len(name) || name || sha256(bytes),
    in the order of TOKENIZER_FILES; the hash of nothing when the model has none."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(_lp(name.encode()) + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
