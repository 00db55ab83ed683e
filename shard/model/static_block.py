"""A block run over static KV caches in a few fixed chunk shapes, eagerly or as CUDA graphs.

A chunk of n tokens runs in the smallest configured size T >= n (`chunk_sizes`, e.g.
5, 16, 64, 256), its n real rows first and T - n padding rows after; a chunk longer than
the largest size runs as pieces of that size, so no other shape ever runs. Rows are
independent in every op but attention, and there a row sees only slots up to its own
position (static_kv), so padding changes no real row's inputs. With a chunk size of K+1 a one-token decode step
and a (K+1)-token verify chunk are the same computation for every row: on a GPU, where
a kernel's arithmetic depends on the shapes it is given, this is what makes speculative
decoding emit exactly the tokens of plain decoding (docs/gpu.md; with chunk sizes
(K+1,) alone every position of every chunk, prompts included, runs in that one shape).

On CUDA, `capture()` records one graph per (pooled cache, chunk size) after warming up
on a side stream; a forward then copies its inputs into the size's static buffers
(from pinned host memory, without waiting), replays, and waits only when the result is
copied back to pinned memory for the wire.

With `batched`, the pooled caches' decode-size chunks run together: one forward over the
whole pool (static_kv.KVPool), each session in its own row, the rows without a chunk
standing at their scratch slot. A session's decode chunks always run in that one shape,
alone or beside others: rows are independent in every op at a fixed shape (attention too:
each row reads only its own cache), so its tokens never depend on which sessions share
the stage. Longer chunks (prompts) run alone, as without it.

A session's decode-size chunks attend over the smallest extent (256, 1024, ... slots, up to
the whole cache) that holds every position the session said it would reach (`new_cache`):
a 16-layer 8B-shaped 9-token chunk takes 2.60 ms over 256 slots against 2.96 ms over 4096
on an H200. The extent is fixed for the session's life, so each of its positions runs in
the same shape whether it came in a plain step or a verify chunk. Batched decode chunks
attend over the whole cache: a batch holds sessions of every extent. Longer chunks
(prompts) attend over the whole cache too, which keeps the shapes compiled few.

With `compiled`, each layer is compiled by torch.compile for these fixed shapes before
capture: a graph replays kernels as they were launched, so a graph of eager layers still
runs ~50 small kernels per layer (norms, rotary, residuals), and fusing them is what brings
an 8B-shaped 16-layer 9-token chunk from 4.7 to 3.1 ms on an H200 (docs/gpu.md).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field

import torch

from shard.model.batch import Row
from shard.model.block import Block, CacheGapError, PositionCount, kv_head_shape
from shard.model.static_kv import KVPool, StaticKV, chunk_mask, length_buckets, slot_count, static_attention

log = logging.getLogger(__name__)

# Masks as transformers builds them for each attention implementation.
_MASK_KINDS = {"sdpa": "bool", "eager": "additive"}
# Decode-size chunks' attention extents grow 4x (256, 1024, 4096): each is a compile and a
# graph per pooled cache, and 2x steps between would save under 0.2 ms a chunk.
EXTENT_GROWTH = 4


@dataclass
class _Shape:
    """One chunk size's static device buffers (what its graphs read and write) and the
    pinned host buffers they are filled from and emptied into."""

    size: int
    # With a leading pool dimension in the batched shape ([P, T], ...):
    inputs: torch.Tensor  # [T] int64 ids on the first block, else [T, hidden]
    positions: torch.Tensor  # [T] int64: rows' positions, also the slots they write
    output: torch.Tensor  # [T, hidden], or [T] int64 argmax ids on the last block
    host_inputs: torch.Tensor | None = None
    host_positions: torch.Tensor | None = None
    host_output: torch.Tensor | None = None
    # By (cache slot, attention extent), None for the whole cache; the batched graph by None.
    graphs: dict[tuple[int, int | None] | None, torch.cuda.CUDAGraph] = field(default_factory=dict)


class StaticBlock:
    def __init__(self, block: Block, *, capacity: int, chunk_sizes: tuple[int, ...], pool_size: int = 0,
                 compiled: bool = False, batched: bool = False):
        """`capacity`: positions per session; `pool_size`: caches preallocated (and graphed
        by capture()); without a pool, new_cache() allocates one per session; `compiled`: on
        CUDA with a pool, the layers compiled by torch.compile when capture() warms up;
        `batched`: the pool's decode-size chunks (the smallest size) run as one forward of
        the whole pool, on CPU too."""
        if block.num_layers:
            implementation = block.model.config._attn_implementation
            if implementation not in _MASK_KINDS:
                raise ValueError(f"static KV supports attention {sorted(_MASK_KINDS)}, not {implementation!r}")
            self._additive = None if _MASK_KINDS[implementation] == "bool" else block.dtype
        if capacity < 1 or (block.max_positions is not None and capacity > block.max_positions):
            raise ValueError(f"capacity must lie in [1, {block.max_positions}], got {capacity}")
        if not chunk_sizes or min(chunk_sizes) < 1:
            raise ValueError(f"chunk sizes must be positive, got {chunk_sizes}")
        self.block, self.capacity = block, capacity
        self._decode_size = min(chunk_sizes)  # a plain step's and a verify chunk's size
        self.device = block.device
        self.on_cuda = block.device.type == "cuda"
        self.graphed = False
        pool_size = pool_size if block.num_layers else 0
        if batched and pool_size < 1:
            raise ValueError("a batched static block needs a pool of at least one cache")
        with torch.inference_mode():
            self._shapes = {size: self._new_shape(size) for size in sorted(set(chunk_sizes))}
            self._kv_index = torch.arange(slot_count(capacity), device=self.device)
            self._kv_pool = self._new_pool(pool_size) if pool_size else None
            # The batched decode shape: a chunk of the smallest size for every pooled cache.
            self._batch = self._new_shape(self._decode_size, rows=pool_size) if batched else None
        # The extents a session's decode-size chunks may attend over, short of the whole cache.
        self.extents = [] if batched else length_buckets(capacity, EXTENT_GROWTH)[:-1]
        self._pool = self._kv_pool.caches if self._kv_pool else []
        self._free = self._pool[::-1]
        # Recorded after the copies to the device, and after the copy back to pinned memory.
        self._staged = torch.cuda.Event() if self.on_cuda else None
        self._copied = torch.cuda.Event() if self.on_cuda else None
        if block.num_layers:
            config = block.model.config
            layers = block.model.layers[: config.num_hidden_layers]
            self._windows = [_window_of(layer, config) for layer in layers]
            self._eager_layers = list(layers)
            shapes = len(self._shapes) + len(self.extents) + 1
            self._layers = [compile_layer(layer, len(layers) * shapes) for layer in layers] \
                if compiled and self.on_cuda and self._pool else self._eager_layers
            parameters = inspect.signature(layers[0].forward).parameters
            # transformers renamed past_key_values to cache; older layers also want cache_position.
            self._cache_kw = "cache" if "cache" in parameters else "past_key_values"
            self._pass_cache_position = "cache_position" in parameters

    @property
    def chunk_sizes(self) -> list[int]:
        return list(self._shapes)

    @property
    def graph_count(self) -> int:
        return sum(len(shape.graphs) for shape in self._all_shapes())

    @property
    def batch_rows(self) -> int:
        """Sessions' chunks one forward runs at most: the pool when batched, else 1."""
        return self._batch.inputs.shape[0] if self._batch is not None else 1

    @property
    def batch_chunk(self) -> int | None:
        """The longest chunk that runs batched (the decode size); None when not batched."""
        return self._batch.size if self._batch is not None else None

    @staticmethod
    def bytes_per_session(block: Block, capacity: int) -> int:
        """What one session's cache takes: capacity positions, the scratch slot and alignment."""
        return slot_count(capacity) * block.kv_bytes_per_position

    # ---- caches -------------------------------------------------------------------

    def new_cache(self, *, pooled: bool = True, positions: int = 0) -> StaticKV | PositionCount:
        """A session's cache: from the pool, whose caches have graphs, or (`pooled=False`, or
        without a pool) one of its own, run without graphs. `positions`: the most the session
        will hold (0: not known); its decode-size chunks attend over the smallest extent
        that holds them, and no chunk may reach past it."""
        if not self.block.num_layers:
            return PositionCount()
        if self._pool and pooled:
            if not self._free:
                raise RuntimeError("every pooled KV cache is in use")  # the KV store's cap prevents this
            cache = self._free.pop()
            cache.length = 0
        else:
            with torch.inference_mode():
                cache = self._allocate(None)
        cache.extent = self.extent_for(positions)
        return cache

    def attention_slots(self, cache: StaticKV | PositionCount) -> int:
        """The slots a session's decode-size chunks attend over (0 for a block without layers)."""
        return 0 if isinstance(cache, PositionCount) else cache.extent or slot_count(self.capacity)

    def extent_for(self, positions: int) -> int | None:
        """The slots a session of at most `positions` positions attends over (None: all)."""
        return next((extent for extent in self.extents if extent >= positions), None) if positions else None

    def release(self, cache) -> None:
        """A session's cache is free again (back to the pool, if it came from one)."""
        if isinstance(cache, StaticKV) and cache.slot is not None:
            self._free.append(cache)

    def cache_length(self, cache) -> int:
        return self.block.cache_length(cache) if isinstance(cache, PositionCount) else cache.length

    def _allocate(self, slot: int | None) -> StaticKV:
        block = self.block
        kv_heads, head_dim = kv_head_shape(block.model.config)
        return StaticKV.allocate(num_layers=block.num_layers, kv_heads=kv_heads, head_dim=head_dim,
                                 capacity=self.capacity, dtype=block.dtype, device=self.device, slot=slot)

    def _new_pool(self, size: int) -> KVPool:
        block = self.block
        kv_heads, head_dim = kv_head_shape(block.model.config)
        return KVPool.allocate(size=size, num_layers=block.num_layers, kv_heads=kv_heads, head_dim=head_dim,
                               capacity=self.capacity, dtype=block.dtype, device=self.device)

    # ---- forward ------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, cache, start_pos: int, *, input_ids: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, num_outputs: int = 1, logits: bool = False) -> torch.Tensor:
        """Block.forward over a static cache: the same arguments and results, the results
        on the CPU (on CUDA: a view of pinned memory, valid until this block's next forward).
        Logits only from a block without layers: the graphs write argmax ids."""
        block = self.block
        if isinstance(cache, PositionCount):
            return block.forward(cache, start_pos, input_ids=input_ids, hidden=hidden, num_outputs=num_outputs,
                                 logits=logits).cpu()
        if logits:
            raise ValueError("a block on static KV returns argmax ids only: logits need a dynamic cache")
        n = block.check_chunk(start_pos, input_ids, hidden, num_outputs)
        self.check_room(cache, start_pos, n)
        x = input_ids if block.is_first else hidden
        first_output = n - num_outputs if block.is_last and num_outputs else 0
        largest = max(self._shapes)
        pieces = []
        with _on(self.device):
            for begin in range(0, n, largest):
                end = min(begin + largest, n)
                piece = x[begin:end]
                if self._runs_batched(cache, end - begin):
                    shape, row = self._batch, cache.slot
                    self._stage_inputs(shape, [(row, piece, start_pos + begin)])
                    self._replay(shape, None, self._step_batch)
                else:
                    shape, row = next(s for size, s in self._shapes.items() if size >= end - begin), None
                    extent = self._extent_of(cache, shape)
                    self._stage_inputs(shape, [(None, piece, start_pos + begin)])
                    self._replay(shape, (cache.slot, extent), lambda s: self._step(cache, s, extent))
                cache.length = start_pos + end
                if end > first_output:
                    rows = self._fetch(shape, [(row, max(first_output - begin, 0), end - begin)])[0]
                    pieces.append(rows if n <= largest else rows.clone())  # the next piece reuses the buffer
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    @torch.inference_mode()
    def forward_rows(self, rows: list[Row]) -> list[torch.Tensor]:
        """Several sessions' decode-size chunks as one forward of the pool: each row's
        output exactly as forward() returns it for that row alone (which runs the same
        shape). Each row's cache is a different pooled one holding start_pos positions or
        more, its chunk at most `batch_chunk` tokens; callers check rows first
        (`check_room`): an error here names no row."""
        block, staged, wanted = self.block, [], []
        for row in rows:
            inputs = (row.tokens, None) if block.is_first else (None, row.tokens)
            n = block.check_chunk(row.start_pos, *inputs, row.num_outputs)
            if not self._runs_batched(row.cache, n):
                raise ValueError(f"a batched forward runs pooled caches' chunks of at most {self.batch_chunk} "
                                 f"tokens, not {n}")
            self.check_room(row.cache, row.start_pos, n)
            staged.append((row.cache.slot, row.tokens, row.start_pos))
            wanted.append((row.cache.slot, n - row.num_outputs if block.is_last and row.num_outputs else 0, n))
        if len({slot for slot, _, _ in staged}) < len(staged):
            raise ValueError("a batched forward runs one chunk per session")
        with _on(self.device):
            self._stage_inputs(self._batch, staged)
            self._replay(self._batch, None, self._step_batch)
            for row in rows:
                row.cache.length = row.start_pos + row.tokens.shape[0]
            return self._fetch(self._batch, wanted)

    def check_room(self, cache: StaticKV, start_pos: int, n: int) -> None:
        """Whether a chunk of n tokens at start_pos can run on this cache."""
        if cache.length < start_pos:
            raise CacheGapError(f"cache holds {cache.length} positions, chunk starts at {start_pos}")
        if start_pos + n > cache.capacity:
            raise ValueError(f"positions up to {start_pos + n} exceed this stage's {cache.capacity} per session")
        if cache.extent is not None and start_pos + n > cache.extent:
            raise ValueError(f"positions up to {start_pos + n} exceed the {cache.extent} this session attends over "
                             f"(from the positions it said it would hold)")

    def _extent_of(self, cache: StaticKV, shape: _Shape) -> int | None:
        """What a chunk in `shape` attends over: the session's extent in the decode size."""
        return cache.extent if shape.size == self._decode_size else None

    def _runs_batched(self, cache: StaticKV, n: int) -> bool:
        return self._batch is not None and cache.slot is not None and n <= self._batch.size

    def _replay(self, shape: _Shape, key: tuple[int | None, int | None] | None, step) -> None:
        """The shape's graph for this key (cache slot and extent), else `step(shape)` eagerly."""
        graph = shape.graphs.get(key)
        if graph is not None:
            graph.replay()
        else:
            step(shape)

    def _stage_inputs(self, shape: _Shape, rows: list[tuple[int | None, torch.Tensor, int]]) -> None:
        """Chunks into the shape's static buffers, each (row of a batched shape or None, its
        inputs, start_pos): its real rows and their positions; every other row keeps whatever
        finite values it held and stands at the scratch slot."""
        positions = torch.full(shape.positions.shape, self.capacity, dtype=torch.int64)
        for row, x, start_pos in rows:
            (positions if row is None else positions[row])[:x.shape[0]] = torch.arange(start_pos, start_pos + x.shape[0])
        if shape.host_inputs is None:
            for row, x, _ in rows:
                (shape.inputs if row is None else shape.inputs[row])[:x.shape[0]].copy_(x)
            shape.positions.copy_(positions)
            return
        # Into pinned memory, then to the device without waiting. The last copies from host
        # buffers are done by now (a fetch waited after them) unless a piece of a long chunk
        # fetched nothing: then this wait, already over in the usual case, is what protects them.
        self._staged.synchronize()
        for row, x, _ in rows:
            (shape.host_inputs if row is None else shape.host_inputs[row])[:x.shape[0]].copy_(x)
        shape.host_positions.copy_(positions)
        shape.inputs.copy_(shape.host_inputs, non_blocking=True)
        shape.positions.copy_(shape.host_positions, non_blocking=True)
        self._staged.record()

    def _fetch(self, shape: _Shape, wanted: list[tuple[int | None, int, int]]) -> list[torch.Tensor]:
        """Output rows first..n-1 of each (row of a batched shape or None, first, n)."""
        outs = []
        for row, first, n in wanted:
            rows = (shape.output if row is None else shape.output[row])[first:n]
            if shape.host_output is None:
                outs.append(rows.to("cpu", copy=True))
                continue
            out = (shape.host_output if row is None else shape.host_output[row])[: n - first]
            out.copy_(rows, non_blocking=True)
            outs.append(out)
        if shape.host_output is not None:
            self._copied.record()
            self._copied.synchronize()  # the one wait: the bytes are about to leave the GPU
        return outs

    def _step(self, cache: StaticKV, shape: _Shape, extent: int | None = None) -> None:
        """The whole block on one cache and the shape's static buffers, attending over the
        first `extent` slots (None: all): what a graph records."""
        cache.write_slots, cache.visible = shape.positions, extent
        shape.output.copy_(self._through_layers(shape.inputs[None], shape.positions[None], cache.layers,
                                                self._kv_index[:extent])[0])

    def _step_batch(self, shape: _Shape) -> None:
        """The whole block on every pooled cache at once: the batched graph."""
        self._kv_pool.write_slots = shape.positions
        shape.output.copy_(self._through_layers(shape.inputs, shape.positions, self._kv_pool.layers, self._kv_index))

    def _through_layers(self, x: torch.Tensor, positions: torch.Tensor, layer_caches: list,
                        kv_index: torch.Tensor) -> torch.Tensor:
        """The block on [B, T] ids or [B, T, hidden] rows at [B, T] positions, each batch row
        over its own cache's slots `kv_index` (those it attends over): [B, T, hidden], or
        [B, T] argmax ids from the last block."""
        model, block = self.block.model, self.block
        h = model.get_input_embeddings()(x) if block.is_first else x
        position_embeddings = model.rotary_emb(h, positions)
        masks = {window: chunk_mask(positions, kv_index, window, self._additive)
                 for window in set(self._windows)}
        # Only older layers take it, and only to hand it to the cache, which ignores it.
        extra = {"cache_position": positions[0]} if self._pass_cache_position else {}
        with static_attention():
            for layer, window, layer_kv in zip(self._layers, self._windows, layer_caches):
                h = layer(h, attention_mask=masks[window], position_ids=positions,
                          position_embeddings=position_embeddings, use_cache=True,
                          **{self._cache_kw: layer_kv}, **extra)
                h = h[0] if isinstance(h, tuple) else h  # older layers return a tuple
        h = model.norm(h)
        return block.lm_head(h).argmax(-1) if block.is_last else h

    # ---- CUDA graphs ----------------------------------------------------------------

    @torch.inference_mode()
    def capture(self, warmup: int = 3) -> None:
        """One CUDA graph per pooled cache and chunk size, and one of the batched shape,
        sharing one memory pool (they never run at once). Warm-up first on a side stream,
        as capture requires; inputs stand at the scratch slot throughout, so no cache slot
        is written."""
        if not self.on_cuda or not self.block.num_layers or not self._pool:
            return
        with _on(self.device):
            for shape in self._all_shapes():
                shape.positions.fill_(self.capacity)
                shape.inputs.zero_()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            memory_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.stream(side):
                self._warm_up(warmup)
                side.synchronize()
                try:
                    self._capture_all(memory_pool)
                except RuntimeError as error:
                    # A layer that syncs with the host (GptOss's expert loop asks which experts
                    # were hit) cannot be captured: the same static path runs eagerly instead.
                    for shape in self._all_shapes():
                        shape.graphs.clear()
                    log.warning("layers of %s cannot be captured as CUDA graphs, running eagerly: %s",
                                type(self.block.model).__name__, first_line(error))
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
        self.graphed = all(shape.graphs for shape in self._all_shapes())

    def _pooled_shapes(self) -> list[_Shape]:
        """The single-cache shapes pooled caches run in: all but the decode size when batched."""
        return [shape for size, shape in self._shapes.items() if self._batch is None or size != self._batch.size]

    def _pooled_variants(self) -> list[tuple[_Shape, int | None]]:
        """(shape, extent) of every graph a pooled cache has: the decode size once per extent."""
        return [(shape, extent) for shape in self._pooled_shapes()
                for extent in ([*self.extents, None] if shape.size == self._decode_size else [None])]

    def _all_shapes(self) -> list[_Shape]:
        return self._pooled_shapes() + ([self._batch] if self._batch is not None else [])

    def _warm_up(self, steps: int) -> None:
        """Run every shape `steps` times (compiling it, if compiled). A compile that fails
        (Triton needs a C compiler at run time, which a slim image may lack) leaves the
        layers uncompiled: slower, never wrong."""
        try:
            for _ in range(steps):
                for shape, extent in self._pooled_variants():
                    self._step(self._pool[0], shape, extent)
                if self._batch is not None:
                    self._step_batch(self._batch)
        except Exception as error:  # torch.compile's failures have no common base class
            if self._layers is self._eager_layers:
                raise
            log.warning("compiling the layers of %s failed, running them uncompiled: %s",
                        type(self.block.model).__name__, first_line(error))
            self._layers = self._eager_layers
            self._warm_up(steps)

    def _capture_all(self, memory_pool) -> None:
        # capture_begin/end rather than torch.cuda.graph(), which empties the cache and
        # collects garbage before every one of these many captures.
        steps = [(shape, (cache.slot, extent), lambda s, c=cache, e=extent: self._step(c, s, e))
                 for cache in self._pool for shape, extent in self._pooled_variants()]
        if self._batch is not None:
            steps.append((self._batch, None, self._step_batch))
        for shape, slot, step in steps:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the stage's other threads may use CUDA meanwhile.
            graph.capture_begin(pool=memory_pool, capture_error_mode="thread_local")
            try:
                step(shape)
            finally:
                graph.capture_end()
            shape.graphs[slot] = graph

    # ---- buffers ------------------------------------------------------------------

    def _new_shape(self, size: int, rows: int | None = None) -> _Shape:
        """Buffers for chunks of `size` tokens: one chunk, or (`rows`) one per pooled cache."""
        block, device = self.block, self.device
        lead = (size,) if rows is None else (rows, size)
        ids, hidden = dict(size=lead, dtype=torch.int64), dict(size=(*lead, block.hidden_size), dtype=block.dtype)
        inputs = torch.zeros(**(ids if block.is_first else hidden), device=device)
        positions = torch.zeros(lead, dtype=torch.int64, device=device)
        output = torch.zeros(**(ids if block.is_last else hidden), device=device)
        shape = _Shape(size, inputs, positions, output)
        if self.on_cuda:
            # Zeroed, not empty: whole buffers go to the device, and padding rows must stay finite.
            shape.host_inputs = torch.zeros(inputs.shape, dtype=inputs.dtype, pin_memory=True)
            shape.host_positions = torch.zeros(lead, dtype=torch.int64, pin_memory=True)
            shape.host_output = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
        return shape


def compile_layer(layer, shapes: int):
    """`layer` compiled for fixed shapes. The layers of a block share one compiled graph per
    shape (each gets its own LayerKV, so no layer index is traced); the limit still allows
    one per layer and shape, for an architecture whose layer code does name a per-layer
    constant (dynamo then guards on it and recompiles for each layer)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 2 * shapes)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * shapes)
    return torch.compile(layer, dynamic=False)


def first_line(error: Exception) -> str:
    """What to log of a failure whose message may run to pages (torch.compile's do)."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _window_of(layer, config) -> int | None:
    """A layer's sliding window, None for full attention: its attention module says so
    where layer types differ (Qwen2/3, GptOss), else the config does for all (Mistral)."""
    attention = getattr(layer, "self_attn", None)
    if attention is not None and hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(config, "sliding_window", None)


def _on(device: torch.device):
    """The device's context on CUDA (a stage may use cuda:1), nothing elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
