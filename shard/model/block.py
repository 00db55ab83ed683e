"""One stage's computation: decoder layers [start, end) of a HF decoder-only model.

The block is a smaller model of the same architecture (same code, same masks, same
attention kernels as `transformers` itself), built on the meta device and given only this
block's tensors, so no process ever holds more than its own layers.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoModel, DynamicCache, PreTrainedModel

from shard.model.checkpoint import Checkpoint
from shard.model.dtypes import config_dtype


class CacheGapError(Exception):
    """The cache holds fewer positions than a chunk's start_pos: earlier chunks are missing."""


@dataclass
class PositionCount:
    """The "cache" of a block with no layers (only the embedding, or only the head): it
    keeps no KV, just how many positions it has seen, so gaps are still caught."""

    length: int = 0


def kv_head_shape(config) -> tuple[int, int]:
    """(KV heads, head dim): what each layer's cache holds per position."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim


def kv_bytes_per_layer_position(config, dtype: torch.dtype) -> int:
    """What one position adds to one layer's cache: a key and a value."""
    kv_heads, head_dim = kv_head_shape(config)
    return 2 * kv_heads * head_dim * dtype.itemsize


class Block:
    def __init__(
        self,
        checkpoint: Checkpoint | None,
        start: int,
        end: int,
        model: nn.Module,
        lm_head: nn.Linear | None,
        dtype: torch.dtype,
        device: torch.device,
        *,
        first: bool,
        last: bool,
    ):
        self.checkpoint = checkpoint
        self.start, self.end = start, end
        self.num_layers = end - start
        self.is_first, self.is_last = first, last
        self.hidden_size = model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        # A block built in memory (benchmarks) has no checkpoint to name.
        self.fingerprint = checkpoint.fingerprint if checkpoint is not None else ""
        self.model = model
        self.lm_head = lm_head
        params = {id(p): p for m in (model, lm_head) if m is not None for p in m.parameters()}
        self.weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
        self.dtype, self.device = dtype, device
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        # What one more position adds to a session's cache.
        self.kv_bytes_per_position = kv_bytes_per_layer_position(model.config, dtype) * self.num_layers

    @classmethod
    def load(cls, model_dir, start: int, end: int, *, first: bool | None = None, last: bool | None = None,
             device="cpu", dtype=None, progress=True) -> Block:
        """`first`/`last` (holding the embedding / the head) default to start == 0 / end == L;
        a ring with more stages than layers passes them for its layer-less end blocks."""
        ckpt = Checkpoint.open(model_dir)
        first = start == 0 if first is None else first
        last = end == ckpt.num_layers if last is None else last
        if not 0 <= start <= end <= ckpt.num_layers or (first and start) or (last and end != ckpt.num_layers):
            raise ValueError(f"bad block [{start}, {end}) for a model of {ckpt.num_layers} layers")
        if start == end and not (first or last):
            raise ValueError(f"block [{start}, {end}) holds no layers, no embedding and no head")
        device = torch.device(device)
        dtype = dtype or config_dtype(ckpt.config)

        config, model, lm_head = _meta_block(ckpt.config, start, end, first, last, dtype,
                                             head_bias="lm_head.bias" in ckpt.files)

        # Checkpoint name -> names in this block ("lm_head." ones address lm_head). A tied
        # matrix in a one-block model is both the embedding and lm_head.
        layer_re = re.compile(rf"^{re.escape(ckpt.prefix)}layers\.(\d+)\.")
        targets: dict[str, list[str]] = {}
        for name in ckpt.block_names(start, end, first, last):
            local = ["embed_tokens.weight"] * (first and name == ckpt.embed_weight)
            local += ["lm_head.weight"] * (last and name == ckpt.head_weight)
            renumbered = layer_re.sub(lambda m: f"layers.{int(m[1]) - start}.", name)
            targets[name] = local or [renumbered.removeprefix(ckpt.prefix)]

        # Match from_pretrained's dtypes: params declared in another dtype keep it, and the
        # model's keep-in-fp32 modules stay float32 in half precision.
        keep_fp32 = set(model._keep_in_fp32_modules_strict or ()) if dtype in (torch.float16, torch.bfloat16) else set()
        if dtype == torch.float16:
            keep_fp32 |= set(model._keep_in_fp32_modules or ())
        keep_fp32_re = re.compile("|".join(n.replace("*", ".*") for n in keep_fp32)) if keep_fp32 else None
        meta = {**model.state_dict(), **{f"lm_head.{k}": v for k, v in lm_head.state_dict().items()}}

        def place(name: str, local: str, tensor: torch.Tensor) -> torch.Tensor:
            if not tensor.is_floating_point():
                return tensor.to(device)
            fp32 = keep_fp32_re is not None and keep_fp32_re.search(name)
            return tensor.to(device=device, dtype=torch.float32 if fp32 else meta[local].dtype)

        state = {}
        loading = ckpt.iter_tensors(targets, device)  # dummy weights are made there directly
        for name, tensor in tqdm(loading, total=len(targets), desc=f"block [{start},{end})", disable=not progress):
            for local in targets[name]:
                state[local] = place(name, local, tensor)
        head_state = {k.removeprefix("lm_head."): state.pop(k) for k in list(state) if k.startswith("lm_head.")}
        try:  # strict: a tensor that does not fit this architecture is an error, never ignored
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{ckpt.path}: block [{start},{end}) does not fit {type(model).__name__}: {e}") from e
        model.requires_grad_(False)
        _rebuild_rotary(model, device)
        if last:
            lm_head.load_state_dict(head_state, strict=True, assign=True)
            lm_head.requires_grad_(False)
            if first and ckpt.head_weight == ckpt.embed_weight:
                lm_head.weight = model.get_input_embeddings().weight  # tied: hold it once
        else:
            lm_head = None

        on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if on_meta:
            raise ValueError(f"{ckpt.path}: block [{start},{end}) has tensors not in the checkpoint: {on_meta[:8]}")
        return cls(ckpt, start, end, model.eval(), lm_head, dtype, device, first=first, last=last)

    @classmethod
    def random(cls, config, num_layers: int, *, first: bool = False, last: bool = False, device="cpu",
               dtype=torch.bfloat16, seed: int = 0, std: float = 0.02) -> Block:
        """A block of `num_layers` layers shaped by `config`, with random weights made on the
        device itself: benchmarks of large shapes without writing (or reading) a checkpoint."""
        device = torch.device(device)
        config = copy.deepcopy(config)
        config.num_hidden_layers = num_layers
        config, model, lm_head = _meta_block(config, 0, num_layers, first, last, dtype, head_bias=False)
        model.to_empty(device=device)
        lm_head = lm_head.to_empty(device=device) if last else None
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in [*model.named_parameters(), *((lm_head.named_parameters()) if lm_head else ())]:
                if "norm" in name:
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, std, generator=generator)
        model.requires_grad_(False)
        if lm_head is not None:
            lm_head.requires_grad_(False)
        _rebuild_rotary(model, device)
        return cls(None, 0, num_layers, model.eval(), lm_head, dtype, device, first=first, last=last)

    @classmethod
    def whole(cls, model: PreTrainedModel) -> Block:
        """A whole causal LM already in memory (a model draft) as one block that is first and
        last: its decoder and head, shared, not copied."""
        param = next(model.parameters())
        return cls(None, 0, model.config.num_hidden_layers, model.base_model, model.get_output_embeddings(),
                   param.dtype, param.device, first=True, last=True)

    def new_cache(self, *, positions: int = 0) -> DynamicCache | PositionCount:
        """A session's cache, growing with it: `positions` (what a static cache sizes its
        attention by, StaticBlock.new_cache) changes nothing here."""
        if not self.num_layers:
            return PositionCount()
        # No config: every layer keeps every position, so crop() is always exact (rollback may
        # go further back than a sliding window); sliding layers are still masked to their window.
        return DynamicCache()

    def attention_slots(self, cache: DynamicCache | PositionCount) -> int:
        """0: a dynamic cache attends over its length (StaticBlock's answers with its extent)."""
        return 0

    def cache_length(self, cache: DynamicCache | PositionCount) -> int:
        return cache.length if isinstance(cache, PositionCount) else cache.get_seq_length()

    @torch.inference_mode()
    def forward(
        self,
        cache: DynamicCache,
        start_pos: int,
        *,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        num_outputs: int = 1,
        logits: bool = False,
    ) -> torch.Tensor:
        """Run positions start_pos..start_pos+n through the block.

        Returns hidden states [n, hidden_size], or on the last block the int64 argmax ids of
        the last `num_outputs` positions (all n when num_outputs == 0), or their logits
        [num_outputs, vocab] with `logits` (what a sampling tail chooses from).
        """
        n = self.check_chunk(start_pos, input_ids, hidden, num_outputs)
        have = self.cache_length(cache)
        if have < start_pos:
            raise CacheGapError(f"cache holds {have} positions, chunk starts at {start_pos}")
        if isinstance(cache, PositionCount):
            cache.length = start_pos + n
            return self._forward_without_layers(input_ids, hidden, num_outputs, logits)
        if have > start_pos:
            cache.crop(start_pos - have)  # a negative count: drop that many trailing positions
        positions = torch.arange(start_pos, start_pos + n, device=self.device)[None]
        if self.is_first:
            inputs = dict(input_ids=input_ids.to(self.device)[None])
        else:
            inputs = dict(inputs_embeds=hidden.to(self.device, self.dtype)[None])
        # The cache length now equals start_pos, so a cache_position derived from it is exact.
        out = self.model(**inputs, position_ids=positions, cache=cache, use_cache=True)
        h = out.last_hidden_state[0]
        if not self.is_last:
            return h
        return self._head(h, num_outputs, logits)

    def _forward_without_layers(self, input_ids, hidden, num_outputs, logits) -> torch.Tensor:
        if self.is_first:
            return self.model.get_input_embeddings()(input_ids.to(self.device))
        return self._head(self.model.norm(hidden.to(self.device, self.dtype)), num_outputs, logits)

    def _head(self, h: torch.Tensor, num_outputs: int, logits: bool) -> torch.Tensor:
        scores = self.lm_head(h[-num_outputs:] if num_outputs else h)
        return scores if logits else scores.argmax(-1)

    def check_chunk(self, start_pos, input_ids, hidden, num_outputs) -> int:
        """The chunk's length; ValueError for anything this block cannot take."""
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos must be an int >= 0, got {start_pos!r}")
        if self.is_first:
            if hidden is not None or not isinstance(input_ids, torch.Tensor):
                raise ValueError("the first block takes input_ids (and no hidden)")
            if input_ids.dtype != torch.int64 or input_ids.ndim != 1:
                raise ValueError(f"input_ids must be 1-D int64, got {input_ids.dtype} {tuple(input_ids.shape)}")
            n = input_ids.shape[0]
            if n and not (0 <= int(input_ids.min()) and int(input_ids.max()) < self.vocab_size):
                raise ValueError(f"input_ids must lie in [0, {self.vocab_size})")
        else:
            if input_ids is not None or not isinstance(hidden, torch.Tensor):
                raise ValueError("a block after the first takes hidden (and no input_ids)")
            if not hidden.is_floating_point() or hidden.ndim != 2 or hidden.shape[1] != self.hidden_size:
                raise ValueError(
                    f"hidden must be floating [n, {self.hidden_size}], got {hidden.dtype} {tuple(hidden.shape)}"
                )
            n = hidden.shape[0]
        if n == 0:
            raise ValueError("empty chunk")
        if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or not 0 <= num_outputs <= n:
            raise ValueError(f"num_outputs must be an int in [0, {n}], got {num_outputs!r}")
        if self.max_positions is not None and start_pos + n > self.max_positions:
            raise ValueError(f"positions up to {start_pos + n} exceed max_position_embeddings={self.max_positions}")
        return n


def _meta_block(full_config, start: int, end: int, first: bool, last: bool, dtype, *, head_bias: bool):
    """The block's config, its model and head on the meta device (no memory), without the
    embedding unless first and without the final norm unless last."""
    config = copy.deepcopy(full_config)
    config.num_hidden_layers = end - start
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[start:end]
    with torch.device("meta"):
        # from_config picks the attention implementation the same way from_pretrained does.
        # Its layers are numbered 0..n-1: exactly their index in the block-local cache.
        model = AutoModel.from_config(config, dtype=dtype)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=head_bias, dtype=dtype)
    if not first:
        model.set_input_embeddings(None)
    if not last:
        model.norm = nn.Identity()
    return config, model, lm_head


def _rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """inv_freq is a computed buffer, not in the checkpoint: rebuild rotary modules for real,
    on CPU as from_pretrained does, then move them."""
    for child_name, child in model.named_children():
        if "RotaryEmbedding" in type(child).__name__:
            setattr(model, child_name, type(child)(config=child.config).to(device))
