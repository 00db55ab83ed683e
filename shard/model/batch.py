"""Many sessions' chunks through one block in one forward: a ragged batch.

Each row is one session's chunk: its own cache, start position and length. The rows run as
one batch the way `transformers` runs left-padded batched generation: every row's past KV
is copied into a batch cache, right-aligned at the longest past (left padding), each
chunk is right-padded to the longest chunk, and a 2-D padding mask marks the real key
slots. Left padding keeps a row's slot distance equal to its position distance, so the
model's own masks (causal, sliding windows, layer types) stay exact per row, and every
architecture the block runs batches the same way; per-row position ids give per-row RoPE.
After the forward each row's new keys and values are appended to its own cache.

A padded key is masked (weight exactly zero) and padded queries come after every real
query, so no row reads another's values or its own padding: in float32 a row's tokens equal
those of the chunk run alone (only the rounding of differently shaped matmuls may differ).
The past KV is copied for every batch: cheap next to a CPU block's matmuls, not the way
to batch on a GPU (the static path keeps running one chunk at a time)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from shard.model.block import Block, CacheGapError


@dataclass
class Row:
    """One session's chunk: positions start_pos..start_pos+n written into `cache` (a
    DynamicCache here, a pooled StaticKV in StaticBlock.forward_rows)."""

    cache: DynamicCache
    start_pos: int
    tokens: torch.Tensor  # input_ids [n] on the first block, hidden [n, hidden_size] after it
    num_outputs: int = 1


@torch.inference_mode()
def forward_batch(block: Block, rows: list[Row], *, logits: bool = False) -> list[torch.Tensor]:
    """Each row's output, as `block.forward` would return it for that row alone (with
    `logits`, the last block's scores rather than their argmax). Every row
    must be valid for the block (`block.check_chunk`) and its cache hold start_pos positions
    or more (it is cropped to start_pos); a ValueError or CacheGapError names no row, so
    callers check rows first. A block without layers, or a single row, runs row by row."""
    if not block.num_layers or len(rows) == 1:
        return [_alone(block, row, logits) for row in rows]
    lengths = [block.check_chunk(row.start_pos, *_inputs(block, row), row.num_outputs) for row in rows]
    for row in rows:
        have = block.cache_length(row.cache)
        if have < row.start_pos:
            raise CacheGapError(f"cache holds {have} positions, chunk starts at {row.start_pos}")
        if have > row.start_pos:
            row.cache.crop(row.start_pos - have)
    past, chunk = max(row.start_pos for row in rows), max(lengths)
    cache = _batch_cache(block, rows, past)
    valid = torch.zeros(len(rows), past + chunk, dtype=torch.long, device=block.device)
    positions = torch.empty(len(rows), chunk, dtype=torch.long, device=block.device)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        valid[i, past - row.start_pos:past + n] = 1
        # Padded queries get the positions that follow: they are computed and discarded.
        positions[i] = torch.arange(row.start_pos, row.start_pos + chunk, device=block.device)
    if block.is_first:
        ids = torch.zeros(len(rows), chunk, dtype=torch.long, device=block.device)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            ids[i, :n] = row.tokens.to(block.device)
        inputs = dict(input_ids=ids)
    else:
        hidden = torch.zeros(len(rows), chunk, block.hidden_size, dtype=block.dtype, device=block.device)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            hidden[i, :n] = row.tokens.to(block.device, block.dtype)
        inputs = dict(inputs_embeds=hidden)
    out = block.model(**inputs, attention_mask=valid, position_ids=positions, cache=cache, use_cache=True)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        for layer, batched in enumerate(cache.layers):
            new = slice(past, past + n)
            row.cache.update(batched.keys[i:i + 1, :, new], batched.values[i:i + 1, :, new], layer)
    outputs = []
    for i, (row, n) in enumerate(zip(rows, lengths)):
        h = out.last_hidden_state[i, :n]
        if block.is_last:
            h = block.lm_head(h[-row.num_outputs:] if row.num_outputs else h)
            h = h if logits else h.argmax(-1)
        outputs.append(h)
    return outputs


def _inputs(block: Block, row: Row) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (row.tokens, None) if block.is_first else (None, row.tokens)


def _alone(block: Block, row: Row, logits: bool) -> torch.Tensor:
    input_ids, hidden = _inputs(block, row)
    return block.forward(row.cache, row.start_pos, input_ids=input_ids, hidden=hidden,
                         num_outputs=row.num_outputs, logits=logits)


def _batch_cache(block: Block, rows: list[Row], past: int) -> DynamicCache:
    """A cache holding every row's past KV right-aligned at `past` slots, zeros before it
    (masked, and zero rather than garbage so that a zero weight times it stays zero)."""
    cache = DynamicCache()
    for layer in range(block.num_layers):
        keys = values = None
        for i, row in enumerate(rows):
            if row.start_pos == 0:
                continue
            held = row.cache.layers[layer]
            if keys is None:
                shape = (len(rows), held.keys.shape[1], past, held.keys.shape[3])
                keys = held.keys.new_zeros(shape)
                values = held.values.new_zeros(shape[:3] + (held.values.shape[3],))
            keys[i, :, past - row.start_pos:] = held.keys[0]
            values[i, :, past - row.start_pos:] = held.values[0]
        if keys is not None:
            cache.update(keys, values, layer)
    return cache
