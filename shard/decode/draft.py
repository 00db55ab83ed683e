"""Drafts: cheap guesses of the target's next tokens, verified by the ring.

A draft is stateless from the driver's point of view: `propose(sequence, n)` gets the
whole current sequence (committed + speculative tokens) every time. A model draft keeps a
KV cache of what it has already read and crops it to the common prefix, so a rejection
upstream rolls it back without any explicit message."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from shard.decode.draft_batch import DraftBatcher
from shard.decode.draft_pool import DraftPool
from shard.decode.static_draft import (STATIC_FAMILIES, Lanes, StaticDraftSession, common_prefix, graphed_slots,
                                       supports_static)
from shard.decode.sampling import Proposal, SamplingParams, process
from shard.decode.sampling import propose as draw_proposal
from shard.model.causal_lm import load_causal_lm

log = logging.getLogger(__name__)

DEFAULT_GPU_SLOTS = 4  # sessions drafting at once through their own graph and static cache (batch 1)
DEFAULT_BATCH = 16  # sessions whose steps run as one forward: a GPU's graphed pool, a float32 CPU draft's
STATIC_MAX_POSITIONS = 4096  # a static cache's length: a session drafts no further


class DraftSession(Protocol):
    def propose(self, sequence: list[int], n: int) -> list[int]:
        """Up to `n` tokens likely to follow `sequence` (fewer, or none, is allowed)."""

    def propose_sampled(self, sequence: list[int], n: int, params: SamplingParams) -> list[Proposal]:
        """Up to `n` guesses drawn from the draft's processed distribution, each with that
        distribution (a deterministic draft: one-hot), with the counter-based randomness."""

    def close(self) -> None:
        """The generation is over: give back what the session holds."""


class Draft(Protocol):
    name: str
    threads: int  # sessions that may draft at once, each in a thread of its own

    def session(self) -> DraftSession:
        """State for one generation (model drafts keep a KV cache per session)."""

    def batching(self) -> str | None:
        """How its sessions' steps were batched so far (None: it does not batch)."""


class NgramDraft:
    """Prompt lookup: find the longest recent n-gram that occurred before and propose
    what followed it then. No model, so it costs microseconds."""

    name = "ngram"
    threads = 1

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def session(self) -> "NgramDraft":
        return self

    def batching(self) -> None:
        return None

    def propose(self, sequence: list[int], n: int) -> list[int]:
        if n <= 0:
            return []
        for size in range(min(self.max_ngram, len(sequence) - 1), self.min_ngram - 1, -1):
            tail = sequence[-size:]
            # The most recent earlier occurrence predicts best.
            for start in range(len(sequence) - size - 1, -1, -1):
                if sequence[start:start + size] == tail:
                    follow = sequence[start + size:start + size + n]
                    if follow:
                        return follow
        return []

    def propose_sampled(self, sequence: list[int], n: int, params: SamplingParams) -> list[Proposal]:
        return [Proposal.one_hot(token) for token in self.propose(sequence, n)]

    def close(self) -> None:
        """Stateless: nothing to give back."""


class ModelDraft:
    """A small Hugging Face causal LM sharing the target's tokenizer.

    With `slots` (default on a GPU, for the architectures static decoding supports: `batch`,
    at least 4; none on a CPU) up to that many sessions at once decode over a static KV
    cache, their step a CUDA graph on a GPU (shard.decode.static_draft) of layers compiled
    by torch.compile (`compiled`, default: on a GPU); other sessions use the eager dynamic
    cache.

    `batch` (default 16 on a GPU with static decoding, and for a float32 draft on a CPU,
    where batching is exact; else 1) runs up to that many sessions' steps as one forward:
    the static sessions' as rows of one graphed pool (shard.decode.draft_pool), else the
    dynamic ones' as one ragged batch (shard.decode.draft_batch; on a GPU only when `batch`
    is given); beside a pool, sessions beyond its rows draft alone. `threads` says how many
    sessions may draft at once without queueing."""

    def __init__(self, model: PreTrainedModel, *, name: str, slots: int | None = None,
                 capture: bool | None = None, max_positions: int = STATIC_MAX_POSITIONS,
                 batch: int | None = None, compiled: bool | None = None):
        self.model, self.name = model.eval(), name
        self.device = model.device
        on_gpu = self.device.type == "cuda"
        static = supports_static(model.config)
        # On a GPU only the graphed pool batches by default: the dynamic batch waits to be asked for.
        batch_dynamic = batch is not None or not on_gpu
        if batch is None:
            exact_on_cpu = self.device.type == "cpu" and model.dtype == torch.float32
            batch = DEFAULT_BATCH if exact_on_cpu or (on_gpu and static) else 1
        if batch < 1:
            raise ValueError(f"draft {name}: a draft batch holds at least 1 step, not {batch}")
        if slots is None:
            slots = max(DEFAULT_GPU_SLOTS, batch) if on_gpu and static else 0
            if on_gpu and not slots:
                log.warning("draft %s: no static decoding for %s; it drafts eagerly", name,
                            model.config.model_type)
        elif slots and not static:
            raise ValueError(f"draft {name}: static decoding supports {', '.join(STATIC_FAMILIES)} "
                             f"with full attention through SDPA, not this {model.config.model_type} "
                             f"({model.config._attn_implementation} attention)")
        capture = on_gpu if capture is None else capture
        compiled = on_gpu if compiled is None else compiled
        if capture and not on_gpu:
            raise ValueError("CUDA graphs need a CUDA device")
        capacity = min(max_positions, getattr(model.config, "max_position_embeddings", None) or max_positions)
        self.pool = DraftPool(model, slots, capacity, capture=capture, compiled=compiled) \
            if slots > 1 and batch > 1 else None
        self._lanes = Lanes(self.pool.rows if self.pool else
                            graphed_slots(model, slots, capacity, capture=capture, compiled=compiled))
        self.batcher = DraftBatcher(model, batch) if batch > 1 and batch_dynamic and not self.pool else None
        # Graphed and batched sessions each draft (or wait for their step) in a thread of their own.
        self.threads = max(slots if capture or self.pool else 0, self.batcher.max_batch if self.batcher else 1)

    @classmethod
    def load(cls, model_dir: str | Path, *, name: str | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, **kwargs) -> "ModelDraft":
        model = load_causal_lm(Path(model_dir), device=device, dtype=dtype)
        return cls(model, name=name or str(model_dir), **kwargs)

    def session(self) -> "ModelDraftSession | StaticDraftSession":
        lane = self._lanes.take()
        return StaticDraftSession(self._lanes, lane) if lane else ModelDraftSession(self)

    def batching(self) -> str | None:
        described = [f"{kind} {batcher.stats.describe()}" for kind, batcher in
                     (("static", self.pool), ("dynamic", self.batcher)) if batcher and batcher.stats.steps]
        return "; ".join(described) or None


class ModelDraftSession:
    """Eager decoding over a dynamic cache: any architecture, any device."""

    def __init__(self, draft: ModelDraft):
        self._draft = draft
        self._cache = DynamicCache()
        self._read: list[int] = []  # tokens whose KV the cache holds

    @torch.inference_mode()
    def propose(self, sequence: list[int], n: int, *, forced: list[int] | None = None) -> list[int]:
        """Up to `n` tokens after `sequence`; with `forced`, the model still runs each step
        but reads forced[i] instead of its own pick (the oracle draft), and forced is returned."""
        n = n if forced is None else min(n, len(forced))
        return [token for token, _ in self._decode(
            sequence, n, lambda i, logits: (int(logits.argmax()) if forced is None else forced[i], None))]

    @torch.inference_mode()
    def propose_sampled(self, sequence: list[int], n: int, params: SamplingParams) -> list[Proposal]:
        """Guesses drawn from the processed distribution, each token's position keying its draw."""
        def pick(i: int, logits: torch.Tensor) -> tuple[int, Proposal]:
            probs = process(logits.to(torch.float64).cpu().numpy(), params)
            proposal = draw_proposal(probs, params.seed, len(sequence) + i)
            return proposal.token, proposal

        return [proposal for _, proposal in self._decode(sequence, n, pick)]

    def _decode(self, sequence: list[int], n: int, pick) -> list[tuple[int, object]]:
        """n steps after `sequence`; `pick(i, logits)` gives step i's token (the next step
        reads it) and what to return for it."""
        if n <= 0:
            return []
        common = common_prefix(self._read, sequence)
        # Keep at least one token to feed, so there are logits to read.
        common = min(common, len(sequence) - 1)
        if common < len(self._read):
            self._cache.crop(common - len(self._read))  # negative: drop that many trailing positions
            del self._read[common:]
        picked: list[tuple[int, object]] = []
        feed = sequence[common:]
        batcher = self._draft.batcher
        with batcher.proposing() if batcher else nullcontext():
            for i in range(n):
                picked.append(pick(i, self._step(feed)))
                feed = [picked[-1][0]]
        # The last proposed token was never fed: the cache ends one short of the proposal.
        return picked

    def close(self) -> None:
        """Nothing to give back: the cache goes with the session."""

    def _step(self, tokens: list[int]) -> torch.Tensor:
        """The logits after `tokens`, which the cache then holds."""
        start = len(self._read)
        if self._draft.batcher:
            logits = self._draft.batcher.step(self._cache, start, tokens)
        else:
            ids = torch.tensor([tokens], device=self._draft.device)
            positions = torch.arange(start, start + len(tokens), device=self._draft.device)[None]
            logits = self._draft.model(input_ids=ids, position_ids=positions, cache=self._cache,
                                       use_cache=True, logits_to_keep=1).logits[0, -1]
        self._read.extend(tokens)
        return logits


class DraftMismatch(ValueError):
    """A draft that cannot propose for the target: it speaks another vocabulary."""


def check_same_tokenizer(target_dir: str | Path, draft_dir: str | Path) -> None:
    """A draft must tokenize exactly like the target; compare vocabularies, not names."""
    target, draft = _vocabulary(Path(target_dir)), _vocabulary(Path(draft_dir))
    if target != draft:
        raise DraftMismatch(f"draft {draft_dir} does not share the tokenizer of {target_dir} "
                            f"({_describe(draft)} vs {_describe(target)})")


def _vocabulary(model_dir: Path):
    """The tokenizer's token -> id map if the folder has a tokenizer, else the vocab size."""
    tokenizer_file = model_dir / "tokenizer.json"
    if tokenizer_file.is_file():
        model = json.loads(tokenizer_file.read_text())["model"]
        vocab = model.get("vocab")
        return ("tokens", tuple(sorted(vocab.items())) if isinstance(vocab, dict) else tuple(map(tuple, vocab)))
    config = json.loads((model_dir / "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return ("size", size)


def _describe(vocabulary) -> str:
    kind, value = vocabulary
    return f"{len(value)} tokens" if kind == "tokens" else f"no tokenizer, vocab_size {value}"
