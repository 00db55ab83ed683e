"""The analytic throughput bound to hold each measurement against (../shared/DESIGN.md),
for the generations actually run rather than the steady state.

A generation is a sequence of verified chunks. A chunk whose successor cannot be drafted
before its result is back (a drafted token in it is rejected, or the draft has nothing to
propose past it) breaks the pipeline, so the chunks fall into runs. Within a run, chunk i
leaves one period after chunk i-1, period = max(drafting, slowest stage's chunk time,
per-hop overhead), and no sooner than one cycle (drafting + T) after chunk i-W, the window;
the run ends a cycle after its last chunk leaves. W = 1 gives synchronous speculation,
chunks * cycle; K = 0 gives plain decode. In the steady state at full acceptance this is
the design's K / max(K*t_d, max_i tau_i(K+1), overhead). Chunks, breaks and drafting per
chunk are measured, and they depend on the draft and the target only (an n-gram draft
proposes fewer than K tokens, or none, when it finds no match), so the bound holds the
system, not the draft, to account. Runs are taken as equally long."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    w: int
    tokens: int                       # committed, over all generations
    generations: int
    chunks: int                       # verified chunks (each one traversal's results used)
    pipeline_breaks: int              # verified chunks that start a new run, last ones excluded
    draft_seconds_per_chunk: float    # over the chunks sent, wasted ones included
    stage_seconds: tuple[float, ...]  # per chunk, per stage
    traversal_seconds: float          # T: one chunk around the ring


def bound_seconds(m: Measured, overhead_seconds: float) -> float:
    cycle = m.draft_seconds_per_chunk + m.traversal_seconds
    period = max(m.draft_seconds_per_chunk, max(m.stage_seconds, default=0.0), overhead_seconds)
    runs = min(m.pipeline_breaks + m.generations, m.chunks)  # a generation's last chunk ends a run
    length, longer = divmod(m.chunks, runs)
    return (longer * _run_seconds(length + 1, period, cycle, m.w)
            + (runs - longer) * _run_seconds(length, period, cycle, m.w))


def _run_seconds(chunks: int, period: float, cycle: float, w: int) -> float:
    if chunks == 0:
        return 0.0
    departures: list[float] = []
    for i in range(chunks):
        leaves = departures[-1] + period if departures else 0.0
        if i >= w:
            leaves = max(leaves, departures[i - w] + cycle)
        departures.append(leaves)
    return departures[-1] + cycle


def bound_tokens_per_second(m: Measured, overhead_seconds: float) -> float:
    return m.tokens / bound_seconds(m, overhead_seconds)
