"""The analytic throughput bound to hold each measurement against (../shared/DESIGN.md).

alpha: per-token acceptance; g = (1 - alpha^(K+1)) / (1 - alpha) tokens committed per
verified chunk (K + 1 at full acceptance).
- synchronous: g / (K*t_d + T(K)), T(K) the traversal time of a (K+1)-token chunk;
- pipelined: chunks leave every period = max((K+1)*t_d, slowest stage's chunk time,
  per-frame overhead); a fully accepted chunk costs one period, a rejection flushes the
  pipe and costs a traversal plus a fresh draft; and W chunks can cover at most W per
  traversal."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    k: int
    w: int
    alpha: float              # per-token acceptance
    draft_seconds_per_token: float
    stage_seconds: tuple[float, ...]  # per chunk, per stage, for this K
    traversal_seconds: float  # T(K): one chunk around the ring


def tokens_per_chunk(k: int, alpha: float) -> float:
    if k == 0:
        return 1.0
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def bound_tokens_per_second(m: Measured, overhead_seconds: float) -> float:
    g = tokens_per_chunk(m.k, m.alpha)
    if m.w == 1:
        return g / (m.k * m.draft_seconds_per_token + m.traversal_seconds)
    drafting = (m.k + 1) * m.draft_seconds_per_token
    period = max(drafting, max(m.stage_seconds, default=0.0), overhead_seconds)
    full = m.alpha ** (m.k + 1) if m.k else 1.0
    per_chunk = full * period + (1 - full) * (m.traversal_seconds + drafting)
    window = m.w * g / (m.traversal_seconds + drafting)
    return min(g / per_chunk, window)
