"""From a `--draft` value to a loaded draft (shard.decode.specs says what the values mean)."""

from __future__ import annotations

from pathlib import Path

import torch

from shard.decode.draft import Draft, DraftMismatch, ModelDraft, NgramDraft, check_same_tokenizer
from shard.decode.oracle import OracleDraft
from shard.decode.specs import parse_draft_spec


def load_draft(spec: str, target_dir: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, batch: int | None = None,
               compiled: bool | None = None) -> Draft | OracleDraft:
    """`ngram`, a model folder that shares the target's tokenizer, or `oracle:P[:DIR]`;
    model drafts are loaded onto `device` in `dtype`, batching up to `batch` sessions' steps
    (None: ModelDraft's default), their static steps compiled by torch.compile if `compiled`
    (None: on a GPU)."""
    try:
        parsed = parse_draft_spec(spec)
    except ValueError as error:
        raise DraftMismatch(str(error)) from None
    if parsed.kind == "ngram":
        return NgramDraft()
    model_dir = parsed.model_dir or Path(target_dir)
    check_same_tokenizer(target_dir, model_dir)
    model = ModelDraft.load(model_dir, name=spec, device=device, dtype=dtype, batch=batch, compiled=compiled)
    return OracleDraft(model, parsed.p, name=spec) if parsed.kind == "oracle" else model
