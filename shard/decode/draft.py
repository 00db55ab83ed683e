"""Drafts: cheap guesses of the target's next tokens, verified by the ring.

A draft is stateless from the driver's point of view: `propose(sequence, n)` gets the
whole current sequence (committed + speculative tokens) every time. A model draft keeps a
KV cache of what it has already read and crops it to the common prefix, so a rejection
upstream rolls it back without any explicit message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, DynamicCache


class DraftSession(Protocol):
    def propose(self, sequence: list[int], n: int) -> list[int]:
        """Up to `n` tokens likely to follow `sequence` (fewer, or none, is allowed)."""


class Draft(Protocol):
    name: str

    def session(self) -> DraftSession:
        """State for one generation (model drafts keep a KV cache per session)."""


class NgramDraft:
    """Prompt lookup: find the longest recent n-gram that occurred before and propose
    what followed it then. No model, so it costs microseconds."""

    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def session(self) -> "NgramDraft":
        return self

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


class ModelDraft:
    """A small Hugging Face causal LM sharing the target's tokenizer."""

    def __init__(self, model_dir: str | Path, *, name: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model_dir = Path(model_dir)
        self.name = name or str(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(device).eval()
        self.device = torch.device(device)

    def session(self) -> "ModelDraftSession":
        return ModelDraftSession(self)


class ModelDraftSession:
    def __init__(self, draft: ModelDraft):
        self._draft = draft
        self._cache = DynamicCache()
        self._read: list[int] = []  # tokens whose KV the cache holds

    @torch.inference_mode()
    def propose(self, sequence: list[int], n: int) -> list[int]:
        if n <= 0:
            return []
        common = _common_prefix(self._read, sequence)
        # Keep at least one token to feed, so there are logits to read.
        common = min(common, len(sequence) - 1)
        if common < len(self._read):
            self._cache.crop(common - len(self._read))  # negative: drop that many trailing positions
            del self._read[common:]
        proposal: list[int] = []
        feed = sequence[common:]
        for _ in range(n):
            logits = self._step(feed)
            token = int(logits[-1].argmax())
            proposal.append(token)
            feed = [token]
        # The last proposed token was never fed: the cache ends one short of the proposal.
        return proposal

    def _step(self, tokens: list[int]) -> torch.Tensor:
        model = self._draft.model
        ids = torch.tensor([tokens], device=self._draft.device)
        start = len(self._read)
        positions = torch.arange(start, start + len(tokens), device=self._draft.device)[None]
        out = model(input_ids=ids, position_ids=positions, cache=self._cache, use_cache=True)
        self._read.extend(tokens)
        return out.logits[0]


def _common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    for i in range(limit):
        if a[i] != b[i]:
            return i
    return limit


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


def load_draft(spec: str, target_dir: str | Path) -> Draft:
    """`ngram`, or a model folder that shares the target's tokenizer."""
    if spec == "ngram":
        return NgramDraft()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise DraftMismatch(f"draft {spec!r} is neither 'ngram' nor a model folder with a config.json")
    check_same_tokenizer(target_dir, path)
    return ModelDraft(path, name=spec)
