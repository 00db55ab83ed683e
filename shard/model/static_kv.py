"""A session's KV cache at a fixed address and shape: what a CUDA graph can be replayed on.

Every layer's keys and values are preallocated as [1, kv_heads, slots, head_dim], with
`slots` = capacity + 1 rounded up to a multiple of SLOT_ALIGNMENT. Slots 0..capacity-1
hold positions 0..capacity-1; slot `capacity` is scratch: the padding rows of a chunk
write there, so padding never lands on a position's slot. The slots past it are never
written and always masked. Which slots a forward writes, and which positions its queries
stand at, come from one device tensor (`write_slots`), so a graph captured once serves every start_pos: rolling back is just
starting the next chunk at an earlier position, which overwrites those slots.

The invariant that makes this exact (see docs/gpu.md):
- a query at position p sees slots 0..p (and only p - window + 1..p in a sliding layer)
  and nothing else, however long the buffer and whatever stale keys lie beyond p;
- slots 0..length-1 always hold the keys of the tokens committed at those positions: a
  chunk starting at start_pos <= length writes its real tokens at start_pos.. before any
  query reads them (the layer writes its keys, then attends), and padding writes only the
  scratch slot, which no real query ever sees.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

# The slot count is a multiple of this: attention's score rows are then 16-byte aligned in
# bf16, which cuBLAS's Hopper GEMMs need. With capacity + 1 slots (4097) it fell back to old
# sm75 kernels: the probabilities-times-values product took 96 us per layer on an H200,
# over a third of a 16-layer 8B-shaped chunk (docs/gpu.md).
SLOT_ALIGNMENT = 64


def slot_count(capacity: int) -> int:
    """Slots of a static cache of `capacity` positions: theirs, the scratch slot, alignment."""
    return -(-(capacity + 1) // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


# A forward whose positions all lie below one of these extents attends over that many slots
# only: attention over the whole cache would cost as much at position 10 as at 4000. Each
# extent is a shape of its own (a graph, a compile), hence few of them.
SMALLEST_BUCKET = 256


def length_buckets(capacity: int, growth: int = 2) -> list[int]:
    """Attention extents for a cache of `capacity` positions, from SMALLEST_BUCKET up by
    `growth` times (its positions' slots, scratch and alignment: all of them last)."""
    buckets, size = [], SMALLEST_BUCKET
    while size < capacity:
        buckets.append(size)
        size *= growth
    return buckets + [slot_count(capacity)]


def bucket_for(buckets: list[int], length: int) -> int:
    """The smallest attention extent that holds positions 0..length-1."""
    return next(b for b in buckets if b >= length)


class StaticKV:
    """A session's keys and values for every layer of a block; each layer is handed its
    own view (`layers[i]`) as its cache."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], *, capacity: int,
                 slot: int | None = None):
        """`keys` and `values`: one [1, kv_heads, slot_count(capacity), head_dim] tensor per
        layer, its own (`allocate`) or a row of a KVPool's."""
        self.keys, self.values = keys, values
        self.capacity = capacity
        self.scratch = capacity  # the slot padding rows write
        self.slot = slot  # its index in a pool of graphed caches, None outside one
        self.length = 0  # positions 0..length-1 hold committed tokens' keys
        self.write_slots: torch.Tensor | None = None  # [T] int64, set by the forward that uses it
        # Slots 0..visible-1 are what attention reads (all of them when None): a forward whose
        # positions all lie below a smaller bound attends over less (the draft's length buckets).
        self.visible: int | None = None
        # The slots its decode-size chunks attend over, fixed when its session starts (None: all).
        self.extent: int | None = None
        self.layers = [LayerKV(self, keys, values) for keys, values in zip(self.keys, self.values)]

    @classmethod
    def allocate(cls, *, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device, slot: int | None = None) -> StaticKV:
        shape = (1, kv_heads, slot_count(capacity), head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   capacity=capacity, slot=slot)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class KVPool:
    """A block's pooled session caches as one tensor per layer, [size, kv_heads, slots,
    head_dim]: session i's StaticKV (`caches[i]`) is a view of row i, and a batched forward
    (`layers`, `write_slots` [size, T]) writes and reads every row at once. Its batch is
    the whole pool, rows without a chunk standing at their scratch slot: one shape
    whichever sessions fill it, so a session's arithmetic never depends on the others
    (static_block). `first_rows` is a pool of fewer rows on the same memory, for a batch
    that needs no more (the draft's row buckets)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], *, capacity: int):
        self.keys, self.values, self.capacity = keys, values, capacity
        self.write_slots: torch.Tensor | None = None  # [size, T] int64, set by the batched forward
        self.visible: int | None = None  # as StaticKV's: the slots attention reads (None: all)
        self.layers = [PoolLayerKV(self, keys, values) for keys, values in zip(self.keys, self.values)]
        self.caches = [StaticKV([k[row:row + 1] for k in self.keys], [v[row:row + 1] for v in self.values],
                                capacity=capacity, slot=row) for row in range(keys[0].shape[0])]

    @classmethod
    def allocate(cls, *, size: int, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> KVPool:
        shape = (size, kv_heads, slot_count(capacity), head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)], capacity=capacity)

    def first_rows(self, rows: int) -> KVPool:
        return KVPool([k[:rows] for k in self.keys], [v[:rows] for v in self.values], capacity=self.capacity)


class LayerKV:
    """One layer's part of a StaticKV, passed to that layer as its cache. It implements the
    one cache method transformers' attention layers call, `update`: write this chunk's keys
    and values at `write_slots`, return the buffers (the mask, not the shape, says which
    slots count). It holds its tensors itself rather than indexing the session's lists by
    `layer_idx`: so the code torch.compile traces names no layer, and every layer of a
    block shares one compiled graph per shape instead of compiling one per layer."""

    def __init__(self, session: StaticKV, keys: torch.Tensor, values: torch.Tensor):
        self.session, self.keys, self.values = session, keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # Older transformers pass cache_kwargs positionally, newer ones kwargs=...: neither is needed.
        session = self.session
        self.keys.index_copy_(2, session.write_slots, key_states)
        self.values.index_copy_(2, session.write_slots, value_states)
        return self.keys[:, :, :session.visible], self.values[:, :, :session.visible]


class PoolLayerKV:
    """One layer's part of a KVPool in a batched forward: each row's keys and values go to
    that row's slots (`write_slots[row]`), and attention reads every row's cache (up to
    `visible`)."""

    def __init__(self, pool: KVPool, keys: torch.Tensor, values: torch.Tensor):
        self.pool, self.keys, self.values = pool, keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        slots = self.pool.write_slots[:, None, :, None].expand_as(key_states)
        self.keys.scatter_(2, slots, key_states)
        self.values.scatter_(2, slots.expand_as(value_states), value_states)
        visible = self.pool.visible
        return self.keys[:, :, :visible], self.values[:, :, :visible]


def chunk_mask(positions: torch.Tensor, kv_index: torch.Tensor, window: int | None,
               additive_dtype: torch.dtype | None) -> torch.Tensor:
    """[B, 1, T, S] mask of which slots each query row may see (positions [T], B = 1, or
    [B, T]): slot j <= its position p (and j > p - window in a sliding layer), as
    transformers' causal and sliding-window masks define them. Boolean (True: attend) for
    SDPA; for eager attention, additive in `additive_dtype` (0 or the dtype's minimum).
    Device ops only: graph-capturable."""
    allowed = kv_index <= positions[..., None]
    if window is not None:
        allowed &= kv_index > positions[..., None] - window
    allowed = allowed.reshape(-1, 1, *allowed.shape[-2:])
    if additive_dtype is None:
        return allowed
    blocked = torch.full_like(allowed, torch.finfo(additive_dtype).min, dtype=additive_dtype)
    return blocked.masked_fill(allowed, 0.0)


def grouped_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """SDPA over a static cache that reads each KV head once. With a mask, transformers'
    SDPA path copies every KV head to each of its query heads (`repeat_kv`): over a whole
    static cache, every step. Here the query heads of one KV head become rows instead
    ([1, heads, T, d] -> [1, kv_heads, groups * T, d], the mask repeated to match), which
    needs no copy of the cache; every row is still attended on its own. Same signature and
    result layout ([1, T, heads, d], None) as transformers' attention functions."""
    batch, heads, rows, dim = query.shape
    groups = heads // key.shape[1]
    query = query.reshape(batch, heads // groups, groups * rows, dim)
    mask = attention_mask.expand(batch, 1, rows, -1).repeat(1, 1, groups, 1)
    if query.is_cuda:
        out = _few_rows_attention(query, key, value, mask, scaling if scaling is not None else dim ** -0.5)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, rows, dim).transpose(1, 2).contiguous(), None


def _few_rows_attention(query, key, value, mask, scale: float) -> torch.Tensor:
    """Attention as two batched GEMMs around a float32 softmax. Written out because the fused
    SDPA kernels split work by query block: with the 1-36 rows of a decode step or a verify
    chunk they leave most of a GPU idle while walking the whole cache (measured on an H200:
    227 us per layer for one row over 4096 slots with the memory-efficient kernel, 85 us for
    nine rows over 2048 with cuDNN's), where these GEMMs take a few microseconds."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)


# Architectures whose SDPA attention takes nothing grouped_sdpa ignores (GptOss's sinks, say).
_GROUPED_SDPA_MODELS = {"llama", "qwen2", "qwen3", "mistral"}
_scope = threading.local()


@contextmanager
def static_attention():
    """Within it, this thread's SDPA attention layers (of the models above) attend with
    grouped_sdpa: a static-cache forward, eager or being captured. Layers look their attention
    function up by the config's name on every call, so the choice is made there, per thread:
    swapping the config's name instead would race between drafts stepping in parallel."""
    before = getattr(_scope, "static", False)
    _scope.static = True
    try:
        yield
    finally:
        _scope.static = before


try:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _own_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def _sdpa(module, *args, **kwargs):
        if getattr(_scope, "static", False) and module.config.model_type in _GROUPED_SDPA_MODELS:
            return grouped_sdpa(module, *args, **kwargs)
        return _own_sdpa(module, *args, **kwargs)

    AttentionInterface.register("sdpa", _sdpa)
except ImportError:  # a transformers without attention registration: its own SDPA path serves
    pass
