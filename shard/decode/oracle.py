"""A draft of controlled acceptance, for benchmarks: `oracle:P[:DIR]`.

Throughput under speculation depends on two things about the draft: what a step costs and
how often the target agrees. No real pair of small models sharing a tokenizer is available
offline here (random-weight models agree by chance only), so this draft separates them: it
runs a real model (DIR, default the target itself) step for step as a model draft would,
for its cost, but proposes the target's own greedy token with probability P and a wrong
one otherwise.

The target's greedy tokens come from a reference: the same swarm's plain decode of the
prompt, which the coordinator runs once per prompt before the measured generation (the
Decoder's output is always that plain decode, so the oracle's "right" token is exactly
the one verification accepts). Whether a position gets the right token is drawn from a
generator seeded by (seed, position): a run repeats exactly, and the positions verified
are independent draws, so the measured acceptance rate is P up to sampling noise."""

from __future__ import annotations

import random

from shard.decode.draft import ModelDraft
from shard.decode.sampling import Proposal, SamplingParams

SEED = 0


class OracleDraft:
    def __init__(self, model: ModelDraft, p: float, *, name: str, seed: int = SEED):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"an oracle's P must lie in [0, 1], not {p}")
        self.model, self.p, self.name, self.seed = model, p, name, seed
        self.threads = model.threads
        self.vocab_size = model.model.config.vocab_size

    def batching(self) -> str | None:
        return self.model.batching()

    def session(self, reference: list[int]) -> "OracleSession":
        """`reference`: the prompt and the target's greedy continuation after it."""
        return OracleSession(self, list(reference))

    def right(self, position: int) -> bool:
        """Whether the token at `position` is proposed right; the same answer every time."""
        return random.Random(self.seed * 1_000_003 + position).random() < self.p


class OracleSession:
    def __init__(self, oracle: OracleDraft, reference: list[int]):
        self._oracle, self._reference = oracle, reference
        self._model = oracle.model.session()

    def propose(self, sequence: list[int], n: int) -> list[int]:
        """n tokens after `sequence`, none past the reference; the model reads them as it
        would read its own, so its cache and its cost follow the sequence as a real draft's do."""
        oracle, start = self._oracle, len(sequence)
        wanted = []
        for position in range(start, min(start + n, len(self._reference))):
            target = self._reference[position]
            wanted.append(target if oracle.right(position) else (target + 1) % oracle.vocab_size)
        if not wanted:
            return []
        return self._model.propose(sequence, len(wanted), forced=wanted)

    def propose_sampled(self, sequence: list[int], n: int, params: SamplingParams) -> list[Proposal]:
        """Under sampling the oracle's guesses stay its own (the greedy reference, right with
        probability P): one-hot proposals, accepted as often as the target samples them."""
        return [Proposal.one_hot(token) for token in self.propose(sequence, n)]

    def close(self) -> None:
        self._model.close()
