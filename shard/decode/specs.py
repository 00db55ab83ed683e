"""What a `--draft` value names, parsed without torch (the configuration checks it at start-up).

- `ngram`: prompt lookup, no model.
- `DIR`: a model folder sharing the target's tokenizer.
- `oracle:P` or `oracle:P:DIR`: the benchmarks' controlled-acceptance draft. It runs the
  model in DIR (default: the target's own folder) for its cost, but proposes the target's
  greedy token with probability P and a wrong one otherwise (see shard.decode.oracle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ORACLE = "oracle:"


@dataclass(frozen=True)
class DraftSpec:
    kind: str  # "ngram", "model" or "oracle"
    model_dir: Path | None = None  # None for ngram, and for an oracle running the target itself
    p: float = 0.0  # an oracle's chance of proposing the target's token


def parse_draft_spec(spec: str) -> DraftSpec:
    """The draft a --draft value names; ValueError, in one line, for anything else."""
    if spec == "ngram":
        return DraftSpec("ngram")
    if spec.startswith(ORACLE):
        chance, _, folder = spec.removeprefix(ORACLE).partition(":")
        try:
            p = float(chance)
        except ValueError:
            p = -1.0
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"draft {spec!r}: oracle:P needs a probability P in [0, 1] (e.g. oracle:0.8)")
        model_dir = Path(folder) if folder else None
        if model_dir is not None and not (model_dir / "config.json").is_file():
            raise ValueError(f"draft {spec!r}: {folder} is not a model folder with a config.json")
        return DraftSpec("oracle", model_dir, p)
    if not (Path(spec) / "config.json").is_file():
        raise ValueError(f"draft {spec!r} is neither 'ngram' nor a model folder with a config.json "
                         f"(nor oracle:P[:DIR])")
    return DraftSpec("model", Path(spec))
