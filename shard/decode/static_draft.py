"""A model draft decoding over a static KV cache, one token per step, the step captured as a
CUDA graph on a GPU.

Eager single-token decoding of a 1B model is launch-bound: hundreds of small kernels, each
launched from Python, cost several times the work they do. A CUDA graph replays them all
with one launch, but only over fixed addresses and shapes. So each slot owns its inputs
(token id, position) and its KV as tensors allocated once, and its step is
"read `ids` at `position`, write that position's keys and values, `ids` <- the argmax,
`position` += 1": the same kernels whatever the position. Rolling back is only starting
from a smaller position: slots past it are masked out (the mask is computed from
`position`) until they are written again.

On a GPU the layers are also compiled by torch.compile before capture (as a stage's are,
shard.model.static_block): the graph then replays inductor's fused kernels instead of the
~50 small ones per layer that eager norms, rotary and residuals launch. Only the steps run
compiled; a prompt's one forward, whose length varies, runs the layers as they are.

A slot serves one session at a time; a session holds its slot from its first proposal to
`close()`. Each slot has its own CUDA stream, so sessions drafting in different threads
overlap on the GPU instead of queueing behind one another. A batched draft's sessions
decode through the rows of one pool instead (shard.decode.draft_pool), whose steps reuse
the pieces here: the forward, prompt prefill, compiling, capture. On a CPU the same code
runs eagerly (what CI checks against the dynamic-cache draft)."""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from typing import Callable, TypeVar

import torch

from shard.decode.sampling import Proposal, SamplingParams
from shard.model.block import kv_head_shape
from shard.model.static_block import compile_layer, first_line
from shard.model.static_kv import StaticKV, bucket_for, chunk_mask, length_buckets, slot_count, static_attention

log = logging.getLogger(__name__)
T = TypeVar("T")

# Families whose base model is exactly embed -> rotary -> decoder layers -> norm, each layer
# taking (hidden, attention_mask, position_embeddings, cache): the step calls those parts
# itself, so that its mask comes from the position tensor (HF's mask builder reads sizes on
# the host and cannot be captured).
STATIC_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
# A session's catch-up of at most this many tokens runs as graphed single-token steps; a
# longer one (the prompt) as one eager forward, then one step.
CATCH_UP_STEPS = 4
WARM_UP_STEPS = 3  # eager steps before capture: lazy initialisations, cuBLAS handles, autotuning


def supports_static(config) -> bool:
    """Whether a model fits the static step: a listed family, full attention only, through
    SDPA (which reads the boolean mask the step builds; the eager kernel would add it)."""
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return (config.model_type in STATIC_FAMILIES and all(t == "full_attention" for t in layer_types)
            and not sliding and config._attn_implementation == "sdpa")


def forward_static(model, layers, kv_layers: list, visible_slots: torch.Tensor, ids: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] after the last of `ids` [B, n] read at `positions` [B, n], through
    `layers` (the model's decoder layers, or those compiled) over static caches: `kv_layers`
    a StaticKV's (B = 1) or a KVPool's, whose `write_slots` the caller set; `visible_slots`
    the slot indices attention reads. Every shape is fixed by B, n and the extent, so a
    step (n = 1) can be captured."""
    base = model.model
    hidden = base.embed_tokens(ids)
    position_embeddings = base.rotary_emb(hidden, positions)
    # Position p attends to slots 0..p: the causal part, and nothing stale past a rollback.
    mask = chunk_mask(positions, visible_slots, None, None)
    with static_attention():
        for layer, layer_kv in zip(layers, kv_layers):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, cache=layer_kv,
                           use_cache=True)
    return model.lm_head(base.norm(hidden[:, -1]))


def prefill(model, kv: StaticKV, kv_index: torch.Tensor, tokens: list[int], start: int) -> None:
    """Write `tokens` at start.. of `kv` in one eager forward (a prompt: too long to step)."""
    positions = torch.arange(start, start + len(tokens), device=kv_index.device)
    kv.write_slots = positions
    forward_static(model, decoder_layers(model), kv.layers, kv_index[:kv.visible],
                   torch.tensor([tokens], dtype=torch.int64, device=kv_index.device), positions[None])


def decoder_layers(model) -> list:
    return list(model.model.layers[: model.config.num_hidden_layers])


def step_layers(model, *, compiled: bool, shapes: int, build: Callable[[list], T]) -> T:
    """`build(layers)` with the model's decoder layers compiled by torch.compile for `shapes`
    fixed shapes when `compiled` (`build` warms them up, which compiles them), else, or if
    compiling fails, as they are."""
    layers = decoder_layers(model)
    if compiled:
        try:
            return build([compile_layer(layer, shapes) for layer in layers])
        except Exception as error:  # torch.compile's failures have no common base class
            # Triton needs a C compiler at run time, which a slim image may lack: slower, never wrong.
            log.warning("compiling the draft's layers failed, graphing them uncompiled: %s", first_line(error))
    return build(layers)


def capture_steps(buckets: list[int], stream: torch.cuda.Stream, prepare: Callable[[int], None],
                  step: Callable[[], None]) -> dict[int, torch.cuda.CUDAGraph]:
    """One CUDA graph of `step` per length bucket, `prepare(bucket)` before each step. Each is
    warmed up on `stream` first (allocations, cuBLAS workspaces, kernel choices), then
    captured there."""
    graphs = {}
    for bucket in buckets:
        with torch.cuda.stream(stream):
            for _ in range(WARM_UP_STEPS):
                prepare(bucket)
                step()
        stream.synchronize()
        prepare(bucket)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
        stream.synchronize()
        graphs[bucket] = graph
    return graphs


def new_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A stream of its own on a GPU (None on a CPU), ordered after what the default stream
    has queued so far (the zeroing of the tensors it will use)."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def on_stream(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


class Slot:
    """One session's static KV and single-token step through `step_layers`; graphed on CUDA
    when `capture`."""

    def __init__(self, model, capacity: int, *, capture: bool, step_layers: list):
        self.model, self.capacity = model, capacity
        self.step_layers = step_layers
        device, dtype = model.device, model.dtype
        kv_heads, head_dim = kv_head_shape(model.config)
        self.kv = StaticKV.allocate(num_layers=model.config.num_hidden_layers, kv_heads=kv_heads,
                                    head_dim=head_dim, capacity=capacity, dtype=dtype, device=device)
        self.kv_index = torch.arange(slot_count(capacity), device=device)
        self.ids = torch.zeros((1, 1), dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.stream = new_stream(device)
        self.buckets = length_buckets(capacity)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            # The warm-up writes slot 0, which any session overwrites.
            self.graphs = capture_steps(self.buckets, self.stream, self._start_at_zero, self._step_eager)

    def _start_at_zero(self, bucket: int) -> None:
        self.kv.visible = bucket
        self.position.zero_()

    def _step_eager(self) -> None:
        self.kv.write_slots = self.position
        logits = forward_static(self.model, self.step_layers, self.kv.layers, self.kv_index[:self.kv.visible],
                                self.ids, self.position[None])
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.position.add_(1)

    def _step(self) -> None:
        graph = self.graphs.get(self.kv.visible)
        if graph is not None:
            graph.replay()
        else:
            self._step_eager()

    def decode(self, feed: list[int], start: int, n: int, forced: list[int] | None) -> list[int]:
        """Read `feed` at start.., then propose n tokens (reading forced[i] after the i-th
        instead of its own pick, when `forced`)."""
        self.kv.visible = bucket_for(self.buckets, start + len(feed) + n)
        with on_stream(self.stream):
            if len(feed) > CATCH_UP_STEPS:
                prefill(self.model, self.kv, self.kv_index, feed[:-1], start)
                start += len(feed) - 1
                feed = feed[-1:]
            self.position.fill_(start)
            for token in feed:
                self.ids.fill_(token)
                self._step()
            # The last step read feed[-1]: ids holds the first proposal, position the next slot.
            picks = torch.empty(n, dtype=torch.int64, device=self.ids.device)
            picks[0:1].copy_(self.ids[0])
            for i in range(1, n):
                if forced is not None:
                    self.ids.fill_(forced[i - 1])
                self._step()
                picks[i:i + 1].copy_(self.ids[0])
            return picks.tolist()  # the one wait for the GPU, on this slot's stream only


def graphed_slots(model, count: int, capacity: int, *, capture: bool, compiled: bool = False) -> list[Slot]:
    """Slots made at start-up (so capture never races serving). With `compiled`, their steps
    run the layers compiled by torch.compile, one compile per length bucket shared by every
    layer and slot (when capturing, at start-up)."""
    if not count:
        return []
    with torch.inference_mode():  # slot tensors are inference tensors, used only in inference mode
        first = step_layers(model, compiled=compiled, shapes=len(decoder_layers(model)) * len(length_buckets(capacity)),
                            build=lambda layers: Slot(model, capacity, capture=capture, step_layers=layers))
        return [first] + [Slot(model, capacity, capture=capture, step_layers=first.step_layers)
                          for _ in range(count - 1)]


class Lanes:
    """What a static session decodes through (a Slot, or a row of a batched pool), made at
    start-up and lent to one session at a time, the first free one first (a pool's lowest
    rows, so that few sessions step few rows)."""

    def __init__(self, lanes: list):
        self._order = {id(lane): i for i, lane in enumerate(lanes)}
        self._free = lanes[::-1]  # the next to lend last
        self._lock = threading.Lock()

    def take(self):
        with self._lock:
            return self._free.pop() if self._free else None

    def give_back(self, lane) -> None:
        with self._lock:
            self._free.append(lane)
            self._free.sort(key=lambda free: self._order[id(free)], reverse=True)


class StaticDraftSession:
    """A session's proposals through one lane (a Slot, or a row of a DraftPool). Like the
    dynamic session it keeps the tokens whose KV it holds and rolls back to the common
    prefix with the new sequence; here that is only a smaller start position."""

    def __init__(self, lanes: Lanes, lane):
        self._lanes, self._lane = lanes, lane
        self._read: list[int] = []  # tokens whose KV the lane holds, from position 0
        # The coordinator may close a session while its last proposal still runs in a
        # worker thread (a cancelled generation): the lane goes back only once that is done.
        self._lock = threading.Lock()
        self._busy = self._closed = False

    def propose(self, sequence: list[int], n: int, *, forced: list[int] | None = None) -> list[int]:
        """Up to `n` tokens after `sequence`; with `forced`, the model still runs each step
        but reads forced[i] instead of its own pick (the oracle draft), and forced is returned."""
        with self._lock:
            if self._closed:
                return []
            self._busy = True
        try:
            return self._propose(sequence, n, forced)
        finally:
            with self._lock:
                self._busy = False
                if self._closed:
                    self._lanes.give_back(self._lane)

    def propose_sampled(self, sequence: list[int], n: int, params: SamplingParams) -> list[Proposal]:
        """The step writes argmax ids only: its greedy guesses, as one-hot proposals (exact
        all the same; a draw from the draft's distribution would be accepted more often)."""
        return [Proposal.one_hot(token) for token in self.propose(sequence, n)]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._busy:
                self._lanes.give_back(self._lane)

    @torch.inference_mode()
    def _propose(self, sequence: list[int], n: int, forced: list[int] | None) -> list[int]:
        # Positions up to len(sequence) + n - 2 are written (the last proposal is never fed).
        n = min(n, self._lane.capacity + 1 - len(sequence), len(forced) if forced is not None else n)
        if n <= 0:
            return []
        common = min(common_prefix(self._read, sequence), len(sequence) - 1)
        del self._read[common:]
        proposal = self._lane.decode(sequence[common:], common, n, forced)
        if forced is not None:
            proposal = forced[:n]
        self._read = list(sequence) + proposal[:-1]
        return proposal


def common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    for i in range(limit):
        if a[i] != b[i]:
            return i
    return limit
