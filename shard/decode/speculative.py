"""The decoding driver: plain, speculative and pipelined speculative decoding are one loop.

The driver keeps one token stream: committed tokens, then speculative ones. It sends the
stream to the ring in chunks of up to K+1 verify positions, keeps up to W chunks in
flight (each assuming the earlier ones are fully accepted), and verifies results in
order: a speculative token stands when it equals the target's argmax at the position
before it. On the first mismatch the target's token is committed, the rest of the stream
is dropped, the epoch is bumped and the stages are told to skip the stale frames. A chunk
carries absolute positions, so the stages' caches roll back by themselves.

Plain decode is K = 0, W = 1 with no draft: one token per traversal. W is a ceiling: the
driver only drafts as deep ahead as the draft's recent record makes worth it (Lookahead)."""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from shard.decode.draft import DraftSession

MAX_REPLAYS = 5


class Lookahead:
    """How deep ahead drafting pays. A chunk sent with d unverified chunks ahead of it is
    useful only if all d are fully accepted (probability p^d, p from a running estimate);
    then it saves a whole cycle (drafting + traversal). If not, it cost its drafting,
    which can delay the correction. So it is sent when p^d * cycle >= (1 - p^d) * drafting.
    Over a WAN (cycle >> drafting) nearly any draft is worth running ahead; on a LAN a
    draft that keeps missing falls back to one chunk at a time instead of loading the
    coordinator and the stages with waste."""

    WEIGHT = 0.25  # of the newest observation in each running estimate

    def __init__(self) -> None:
        self.full_rate = 1.0  # optimistic until the draft shows otherwise
        self.draft_seconds = 0.0
        self.traversal_seconds = 0.0

    def record_chunk(self, fully_accepted: bool) -> None:
        self.full_rate += self.WEIGHT * (float(fully_accepted) - self.full_rate)

    def record_draft(self, seconds: float) -> None:
        self.draft_seconds += self.WEIGHT * (seconds - self.draft_seconds)

    def record_traversal(self, seconds: float) -> None:
        self.traversal_seconds += self.WEIGHT * (seconds - self.traversal_seconds)

    def allows(self, depth: int) -> bool:
        useful = self.full_rate ** depth
        return useful * (self.draft_seconds + self.traversal_seconds) >= (1 - useful) * self.draft_seconds


class RingChanged(Exception):
    """The ring lost state (a stage died and was replaced): chunks in flight are gone and
    the stages' KV caches for the session may be too."""


class Finish(enum.Enum):
    LENGTH = "length"
    EOS = "eos"


class Ring(Protocol):
    async def submit(self, *, start_pos: int, tokens: list[int], num_outputs: int,
                     epoch: int) -> Awaitable[list[int]]:
        """Send a chunk; the awaitable yields the argmax ids of its last num_outputs positions."""

    async def cancel(self, epoch: int) -> int:
        """Tell the stages to skip this session's frames older than `epoch`; frames dropped."""

    async def wait_ready(self) -> None:
        """Return once the ring serves again after a RingChanged."""


@dataclass
class DecodeStats:
    output_ids: list[int] = field(default_factory=list)
    finish: Finish = Finish.LENGTH
    traversals: int = 0        # chunks whose results were used
    chunks_sent: int = 0
    chunks_wasted: int = 0     # in flight when an earlier chunk was rejected
    chunks_cancelled: int = 0  # frames the stages skipped after being told
    # Used chunks whose successor had to wait for their result: a drafted token in them was
    # rejected, or the draft had nothing to propose past them. Each starts the pipeline anew.
    pipeline_breaks: int = 0
    replays: int = 0           # times the committed sequence was replayed into a new ring
    proposed: int = 0          # tokens the draft produced
    drafted: int = 0           # speculative tokens checked against the target
    accepted: int = 0
    draft_seconds: float = 0.0
    ring_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_traversal(self) -> float:
        return len(self.output_ids) / self.traversals if self.traversals else 0.0


@dataclass
class _Chunk:
    start: int
    end: int
    first_output: int  # the position of the chunk's first returned argmax
    result: Awaitable[list[int]]
    sent_at: float
    draft_ran_dry: bool = False  # the draft had nothing to propose past this chunk
    arrived_at: float | None = None  # when the result came back (it may wait to be read)

    def watch_arrival(self) -> None:
        if not isinstance(self.result, asyncio.Future):
            return
        if self.result.done():
            self.arrived_at = self.sent_at
        else:
            self.result.add_done_callback(self._arrived)

    def _arrived(self, _result: asyncio.Future) -> None:
        self.arrived_at = time.perf_counter()

    @property
    def traversal_seconds(self) -> float:
        return (self.arrived_at or time.perf_counter()) - self.sent_at


Propose = Callable[[list[int], int], Awaitable[list[int]]]


class _NoDraft:
    def propose(self, sequence: list[int], n: int) -> list[int]:
        return []


async def decode(
    ring: Ring,
    prompt_ids: list[int],
    *,
    max_tokens: int,
    eos_ids: frozenset[int],
    emit: Callable[[list[int]], Awaitable[None]],
    draft: DraftSession | None = None,
    spec_k: int = 0,
    in_flight: int = 1,
    max_positions: int | None = None,
    propose: Propose | None = None,
    lookahead: Lookahead | None = None,
) -> DecodeStats:
    """Generate up to `max_tokens` tokens after `prompt_ids`, emitting them as committed.

    `propose` runs the draft (e.g. in a worker thread); by default it is called inline.
    `lookahead` carries a draft's record from earlier generations."""
    if not prompt_ids or max_tokens < 1 or spec_k < 0 or in_flight < 1:
        raise ValueError("need a prompt, max_tokens >= 1, spec_k >= 0 and in_flight >= 1")
    draft = draft or _NoDraft()
    run_draft = propose or (lambda sequence, n: _inline(draft, sequence, n))
    stats = DecodeStats()
    started = time.perf_counter()
    prompt_len = len(prompt_ids)
    stream = list(prompt_ids)      # committed tokens, then speculative ones
    committed = prompt_len         # stream[:committed] is final
    sent = 0                       # stream[:sent] has gone to the ring
    epoch = 0
    flight: deque[_Chunk] = deque()
    lookahead = lookahead or Lookahead()
    # The last position whose argmax is worth computing: it predicts the last allowed token.
    last_useful = prompt_len + max_tokens - 2
    if max_positions is not None:
        last_useful = min(last_useful, max_positions - 2)

    async def fill() -> None:
        nonlocal sent
        while len(flight) < in_flight and sent <= last_useful and lookahead.allows(len(flight)):
            # The next chunk verifies positions first_output..last: the drafted tokens up to
            # `last` (the last one's argmax is the bonus, or checks the next chunk's guess).
            first_output = max(sent, committed - 1)
            last = min(first_output + spec_k, last_useful)
            wanted = last + 1 - len(stream)
            ran_dry = False  # the draft stopped short: it has nothing to propose past this chunk
            if wanted > 0:
                began = time.perf_counter()
                proposal = (await run_draft(list(stream), wanted))[:wanted]
                drafting = time.perf_counter() - began
                lookahead.record_draft(drafting)
                stats.draft_seconds += drafting
                stats.proposed += len(proposal)
                stream.extend(proposal)
                ran_dry = len(proposal) < wanted
            end = min(len(stream), last + 1)
            if end <= sent:  # the draft had nothing to add: wait for results
                if flight:
                    flight[-1].draft_ran_dry = True
                return
            result = await ring.submit(start_pos=sent, tokens=stream[sent:end], epoch=epoch,
                                       num_outputs=end - first_output)
            chunk = _Chunk(sent, end, first_output, result, sent_at=time.perf_counter(), draft_ran_dry=ran_dry)
            chunk.watch_arrival()
            flight.append(chunk)
            stats.chunks_sent += 1
            sent = end

    async def drop_in_flight() -> None:
        nonlocal epoch
        if flight:
            stats.chunks_wasted += len(flight)
            for chunk in flight:
                _discard(chunk.result)
            flight.clear()
            epoch += 1
            cancels.append(asyncio.ensure_future(ring.cancel(epoch)))

    async def replay() -> None:
        """After a fail-over: drop what was in flight, wait for the new ring, and send the
        committed sequence again from position 0 to rebuild every stage's KV."""
        nonlocal sent, epoch
        if stats.replays >= MAX_REPLAYS:
            raise RingChanged(f"the ring changed {stats.replays} times during one generation")
        stats.replays += 1
        for chunk in flight:
            _discard(chunk.result)
        flight.clear()
        del stream[committed:]
        sent, epoch = 0, epoch + 1
        await ring.wait_ready()

    async def refill() -> None:
        while True:
            try:
                return await fill()
            except RingChanged:
                await replay()

    cancels: list[asyncio.Future] = []
    try:
        await refill()
        while flight:
            chunk = flight.popleft()
            began = time.perf_counter()
            try:
                argmaxes = await chunk.result
            except RingChanged:
                await replay()
                await refill()
                continue
            stats.ring_seconds += time.perf_counter() - began
            stats.traversals += 1
            lookahead.record_traversal(chunk.traversal_seconds)
            new: list[int] = []
            finished = None
            drafted_before, rejected = stats.drafted, False
            for position in range(chunk.first_output, chunk.end):
                target = argmaxes[position - chunk.first_output]
                speculative = position + 1 < len(stream)
                if speculative:
                    stats.drafted += 1
                accepted = speculative and stream[position + 1] == target
                if accepted:
                    stats.accepted += 1
                else:
                    if speculative:  # rejected: everything after it is stale
                        rejected = True
                        del stream[position + 1:]
                        sent = min(sent, position + 1)
                        await drop_in_flight()
                    stream.append(target)  # the correction, or the bonus token
                committed = position + 2
                new.append(target)
                finished = _finished(target, eos_ids, committed - prompt_len, max_tokens)
                if finished or not accepted:
                    break  # later positions of this chunk followed a token that is not final
            if stats.drafted > drafted_before:
                lookahead.record_chunk(fully_accepted=not rejected)
            if (rejected or chunk.draft_ran_dry) and not finished:
                stats.pipeline_breaks += 1
            stats.output_ids += new
            await emit(new)
            if finished:
                stats.finish = finished
                await drop_in_flight()
                break
            await refill()
        if cancels:
            stats.chunks_cancelled = sum(await asyncio.gather(*cancels))
    finally:
        for chunk in flight:
            _discard(chunk.result)
        for pending in cancels:
            pending.cancel()
    stats.seconds = time.perf_counter() - started
    return stats


def _finished(token: int, eos_ids: frozenset[int], produced: int, max_tokens: int) -> Finish | None:
    if token in eos_ids:
        return Finish.EOS
    if produced >= max_tokens:
        return Finish.LENGTH
    return None


def _discard(result) -> None:
    if isinstance(result, asyncio.Future):
        result.cancel()


async def _inline(draft: DraftSession, sequence: list[int], n: int) -> list[int]:
    return draft.propose(sequence, n)
