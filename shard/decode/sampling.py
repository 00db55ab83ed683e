"""Sampling that stays exact under speculation: the pure functions both ends run.

The tail turns the target's logits into the processed distribution p (temperature,
top-k, top-p, min-p) and chooses tokens; the coordinator's draft turns its own logits into
a proposal distribution q the same way and samples its guesses from it. Standard
speculative sampling then keeps the output distribution exactly p: a drafted token d is
accepted with probability min(1, p(d)/q(d)); otherwise the token is drawn from the
normalised residual max(0, p - q). That needs q wherever p > 0, so the draft cuts q to a
small support of its own choosing (any q keeps the result exact; only acceptance depends
on it) and ships that support with its probabilities: q is 0 everywhere else.

Randomness is counter-based: each uniform is a hash of (seed, position, purpose), so a
chunk replayed after a fail-over, or cut differently across stages, draws the same numbers
and chooses the same tokens. Nothing here keeps state."""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

import numpy as np

# The most tokens a drafted proposal's q may cover: the wire carries (id, prob) for each.
MAX_SUPPORT = 64


class Purpose(enum.IntEnum):
    """What a uniform decides; each has its own stream per (seed, position)."""

    SAMPLE = 1    # a token drawn from p (plain decode, or the bonus after accepted drafts)
    ACCEPT = 2    # the accept test of a drafted token
    RESIDUAL = 3  # the correction drawn from max(0, p - q) after a rejection
    DRAFT = 4     # the draft's own draw from q


@dataclass(frozen=True)
class SamplingParams:
    """The processing both p and q get. temperature 0 is greedy (argmax, no randomness)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Proposal:
    """A drafted token and the distribution q it was drawn from: q(ids[i]) = probs[i] / sum(probs),
    0 off `ids`. probs are float32 values (what the wire carries), so both ends compute the
    same q from the same numbers."""

    token: int
    ids: tuple[int, ...]
    probs: tuple[float, ...]

    @classmethod
    def one_hot(cls, token: int) -> "Proposal":
        """A deterministic guess (n-gram lookup, an oracle, a greedy draft): q puts all mass on it."""
        return cls(token, (token,), (1.0,))


def uniform(seed: int, position: int, purpose: Purpose) -> float:
    """A uniform in [0, 1) that depends only on (seed, position, purpose)."""
    digest = hashlib.blake2b(struct.pack(">QQB", seed, position, purpose), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) * 2.0 ** -53


def process(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The processed distribution (float64, sums to 1) of one position's logits, in
    transformers' order: temperature, top-k, top-p, min-p."""
    scaled = np.asarray(logits, dtype=np.float64) / params.temperature
    if 0 < params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = _softmax(scaled)
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
        keep = np.zeros(probs.size, dtype=bool)
        keep[order[before < params.top_p]] = True  # the smallest head whose mass reaches top_p
        probs = _renormalised(np.where(keep, probs, 0.0))
    if params.min_p > 0.0:
        probs = _renormalised(np.where(probs >= params.min_p * probs.max(), probs, 0.0))
    return probs


def log_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """What logprobs report: log of the processed distribution (raw softmax when greedy)."""
    if params.greedy:
        scaled = np.asarray(logits, dtype=np.float64)
        return scaled - scaled.max() - np.log(np.exp(scaled - scaled.max()).sum())
    with np.errstate(divide="ignore"):
        return np.log(process(logits, params))


def draw(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from unnormalised non-negative weights."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return min(index, int(np.flatnonzero(probs)[-1]))  # u * total may round up to total


def propose(probs: np.ndarray, seed: int, position: int, support: int = MAX_SUPPORT) -> Proposal:
    """The draft's guess at `position` from its processed distribution: q is that
    distribution cut to its `support` most likely tokens, stored as float32 like the wire."""
    top = np.flatnonzero(probs)
    if top.size > support:
        top = top[np.argpartition(-probs[top], support - 1)[:support]]
    top = top[np.argsort(-probs[top], kind="stable")]
    weights = probs[top].astype(np.float32)
    token = int(top[draw(weights.astype(np.float64), uniform(seed, position, Purpose.DRAFT))])
    return Proposal(token, tuple(int(i) for i in top), tuple(float(w) for w in weights))


def choose(p: np.ndarray, proposal: Proposal | None, seed: int, position: int) -> tuple[int, bool]:
    """The token at `position` given the target's processed distribution p there, and
    whether it is the drafted one. Without a proposal: a draw from p. With one: standard
    speculative sampling, whose result is distributed exactly as p for any q."""
    if proposal is None:
        return draw(p, uniform(seed, position, Purpose.SAMPLE)), False
    ids = np.asarray(proposal.ids, dtype=np.int64)
    weights = np.asarray(proposal.probs, dtype=np.float64)
    q = np.zeros_like(p)
    q[ids] = weights / weights.sum()
    d = proposal.token
    if uniform(seed, position, Purpose.ACCEPT) * q[d] < p[d]:  # u < p(d) / q(d), without dividing
        return d, True
    residual = np.maximum(p - q, 0.0)
    if residual.sum() <= 0.0:  # p == q to rounding: the rejection had probability ~0
        residual = p
    return draw(residual, uniform(seed, position, Purpose.RESIDUAL)), False


def check_proposal(proposal: Proposal, vocab_size: int) -> None:
    """ValueError for a proposal the tail cannot decide on exactly."""
    if not proposal.ids or len(proposal.ids) != len(proposal.probs) or len(proposal.ids) > MAX_SUPPORT:
        raise ValueError(f"a proposal's support needs 1 to {MAX_SUPPORT} ids, each with a probability")
    if len(set(proposal.ids)) != len(proposal.ids) or not all(0 <= i < vocab_size for i in proposal.ids):
        raise ValueError(f"a proposal's ids must be distinct and lie in [0, {vocab_size})")
    if not all(np.isfinite(w) and w >= 0 for w in proposal.probs) or sum(proposal.probs) <= 0:
        raise ValueError("a proposal's probabilities must be finite, non-negative, and not all 0")
    weight = dict(zip(proposal.ids, proposal.probs)).get(proposal.token, 0.0)
    if weight <= 0:
        raise ValueError("a drafted token must lie in its proposal's support with probability > 0")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _renormalised(x: np.ndarray) -> np.ndarray:
    return x / x.sum()


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log probability and the most likely tokens at its position."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Chosen:
    """What the tail chose for a sampled chunk: its drafted tokens up to the first it did
    not accept, then the correction or bonus; logprobs (one per id) when asked for."""

    ids: list[int]
    logprobs: list[TokenLogprob] | None = None


def report(logprobs: np.ndarray, token: int, alternatives: int) -> TokenLogprob:
    """The chosen token's logprob with the `alternatives` most likely tokens."""
    top = np.argsort(-logprobs, kind="stable")[:alternatives]
    return TokenLogprob(token, float(logprobs[token]), tuple((int(i), float(logprobs[i])) for i in top))
