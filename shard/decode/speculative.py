"""The decoding driver: plain, speculative and pipelined speculative decoding are one loop.

The driver keeps one token stream: committed tokens, then speculative ones. It sends the
stream to the ring in chunks of up to K+1 verify positions, keeps up to W chunks in
flight (each assuming the earlier ones are fully accepted), and verifies results in
order: a speculative token stands when it equals the target's argmax at the position
before it. On the first mismatch the target's token is committed, the rest of the stream
is dropped, the epoch is bumped and the stages are told to skip the stale frames. A chunk
carries absolute positions, so the stages' caches roll back by themselves.

Plain decode is K = 0, W = 1 with no draft: one token per traversal. W is a ceiling: the
driver only drafts as deep ahead as the draft's recent record makes worth it (Lookahead).

Sampled decoding is the same loop: the draft's guesses come with the distribution q they
were drawn from, each chunk carries the q of the drafted tokens it verifies, and the tail
answers with the tokens it chose by speculative sampling (shard.decode.sampling) instead
of argmaxes. A correction never equals the drafted token (the residual is 0 there), so
"a drafted token stands when it equals the tail's token" holds for both. A chunk sent
ahead verifies its first token against the previous chunk's bonus draw from p: it stands
when the two agree, which keeps the committed token that draw, so exactly p."""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from shard.decode.draft import DraftSession
from shard.decode.sampling import Chosen, Proposal, TokenLogprob

MAX_REPLAYS = 5


class Lookahead:
    """How deep ahead drafting pays, and how long to draft before looking at the results.

    A chunk sent with d unverified chunks ahead of it is useful only if all d are fully
    accepted (probability p^d, p from a running estimate); then it saves a whole cycle
    (drafting + traversal). If not, it cost its drafting, which can delay the correction.
    So it is sent when p^d * cycle >= (1 - p^d) * drafting. Over a WAN (cycle >> drafting)
    nearly any draft is worth running ahead; on a LAN a draft that keeps missing falls back
    to one chunk at a time instead of loading the coordinator and the stages with waste.

    While chunks are in flight a draft works in pieces, and the decoder reads a result that
    came back before drafting the next piece: a rejection makes the rest of the chunk's
    drafting waste. Each piece costs a hand-off to the draft's thread and a wait for its
    device (PIECE_SECONDS); a piece of s tokens wastes about s * t / 2 (t per token) when
    the chunk ahead is rejected (probability q). Over a chunk of K tokens that is
    K / s * PIECE_SECONDS + q * s * t / 2, least at s = sqrt(2 * K * PIECE_SECONDS / (q * t)):
    a draft that is always right drafts whole chunks, a slow one that misses token by token."""

    WEIGHT = 0.25  # of the newest observation in each running estimate
    PIECE_SECONDS = 0.0002

    def __init__(self) -> None:
        self.full_rate = 1.0  # optimistic until the draft shows otherwise
        self.token_seconds = 0.0  # drafting one token
        self.traversal_seconds = 0.0

    def record_chunk(self, fully_accepted: bool) -> None:
        self.full_rate += self.WEIGHT * (float(fully_accepted) - self.full_rate)

    def record_draft(self, seconds: float, tokens: int) -> None:
        if tokens:
            observed = seconds / tokens
            self.token_seconds += (self.WEIGHT if self.token_seconds else 1.0) * (observed - self.token_seconds)

    def record_traversal(self, seconds: float) -> None:
        self.traversal_seconds += self.WEIGHT * (seconds - self.traversal_seconds)

    def allows(self, depth: int, chunk_tokens: int) -> bool:
        useful = self.full_rate ** depth
        drafting = self.token_seconds * chunk_tokens
        return useful * (drafting + self.traversal_seconds) >= (1 - useful) * drafting

    def piece(self, wanted: int) -> int:
        """How many of `wanted` tokens to draft before looking at the results again."""
        missed = 1.0 - self.full_rate
        if missed <= 0.0 or self.token_seconds <= 0.0:
            return wanted
        best = math.sqrt(2 * wanted * self.PIECE_SECONDS / (missed * self.token_seconds))
        return max(1, min(wanted, round(best)))


class RingChanged(Exception):
    """The ring lost state (a stage died and was replaced): chunks in flight are gone and
    the stages' KV caches for the session may be too."""


class Finish(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"  # the consumer of the tokens asked to stop (a stop string)


@dataclass(frozen=True)
class Rebuild:
    """A replay sent into the ring: `done` resolves once the stages hold the session's KV
    again (before any later chunk's result); `partial` when only the blocks that lost it compute."""

    done: Awaitable[list[int]]
    partial: bool


class Ring(Protocol):
    async def submit(self, *, start_pos: int, tokens: list[int], num_outputs: int, epoch: int,
                     proposals: list[Proposal] | None = None) -> Awaitable[list[int] | Chosen]:
        """Send a chunk; the awaitable yields the argmax ids of its last num_outputs positions,
        or in sampled decoding (`proposals`: q of the chunk's drafted tokens) the Chosen tokens."""

    async def cancel(self, epoch: int) -> int:
        """Tell the stages to skip this session's frames older than `epoch`; frames dropped."""

    async def wait_ready(self) -> None:
        """Return once the ring serves again after a RingChanged."""

    async def rebuild(self, *, tokens: list[int], epoch: int) -> Rebuild:
        """After wait_ready: make the stages hold `tokens` at positions 0.. again, computing
        them only in the blocks that lost them where the rest kept theirs."""


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
    partial_replays: int = 0   # of them, those that computed only in the blocks that lost it
    replayed_positions: int = 0  # committed positions sent again, over all replays
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
    def arrived(self) -> bool:
        return self.arrived_at is not None

    @property
    def traversal_seconds(self) -> float:
        return (self.arrived_at or time.perf_counter()) - self.sent_at


Propose = Callable[[list[int], int], Awaitable[list[int] | list[Proposal]]]
# Told each batch of committed tokens (with their logprobs when the ring reports them);
# returns True to stop the generation there (Finish.STOP).
Emit = Callable[[list[int], list[TokenLogprob] | None], Awaitable[bool | None]]


class _NoDraft:
    def propose(self, sequence: list[int], n: int) -> list[int]:
        return []


async def decode(
    ring: Ring,
    prompt_ids: list[int],
    *,
    max_tokens: int,
    eos_ids: frozenset[int],
    emit: Emit,
    draft: DraftSession | None = None,
    spec_k: int = 0,
    in_flight: int = 1,
    max_positions: int | None = None,
    propose: Propose | None = None,
    lookahead: Lookahead | None = None,
    sampled: bool = False,
) -> DecodeStats:
    """Generate up to `max_tokens` tokens after `prompt_ids`, emitting them as committed.

    `propose` runs the draft (e.g. in a worker thread); by default it is called inline.
    `lookahead` carries a draft's record from earlier generations. `sampled`: `propose`
    yields Proposals, and the ring chooses tokens by speculative sampling."""
    if not prompt_ids or max_tokens < 1 or spec_k < 0 or in_flight < 1:
        raise ValueError("need a prompt, max_tokens >= 1, spec_k >= 0 and in_flight >= 1")
    draft = draft or _NoDraft()
    decoder = Decoder(ring, prompt_ids, max_tokens=max_tokens, eos_ids=eos_ids, emit=emit,
                      propose=propose or (lambda sequence, n: _inline(draft, sequence, n)),
                      spec_k=spec_k, in_flight=in_flight, max_positions=max_positions,
                      lookahead=lookahead or Lookahead(), sampled=sampled)
    return await decoder.run()


class Decoder:
    """One generation's state and its transitions.

    State: the token stream (committed tokens, then speculative ones), how much of it is
    final (`committed`) and how much has gone to the ring (`sent`), the epoch the stages
    accept, the chunks in flight (oldest first) and the statistics. The loop: fill the
    window (draft ahead, submit), take the oldest chunk's result, accept its tokens up to
    the first mismatch (reject: cut the stream, drop what is in flight, bump the epoch),
    emit, fill again. A RingChanged anywhere replays the committed tokens into the new ring
    (into the blocks that lost them, when the ring can tell which)."""

    def __init__(self, ring: Ring, prompt_ids: list[int], *, max_tokens: int, eos_ids: frozenset[int],
                 emit: Emit, propose: Propose, spec_k: int, in_flight: int,
                 max_positions: int | None, lookahead: Lookahead, sampled: bool = False):
        self.ring, self.emit, self.propose, self.lookahead = ring, emit, propose, lookahead
        self.sampled = sampled
        self.proposals: dict[int, Proposal] = {}  # sampled: q of each drafted token, by position
        self.max_tokens, self.eos_ids, self.spec_k, self.in_flight = max_tokens, eos_ids, spec_k, in_flight
        self.prompt_len = len(prompt_ids)
        self.stream = list(prompt_ids)  # committed tokens, then speculative ones
        self.committed = self.prompt_len  # stream[:committed] is final
        self.sent = 0                     # stream[:sent] has gone to the ring
        self.epoch = 0
        self.flight: deque[_Chunk] = deque()
        self.rebuilding: Awaitable[list[int]] | None = None  # a replay not yet known to be through
        self.cancels: list[asyncio.Future] = []  # CancelEpoch calls, counted at the end
        self.stats = DecodeStats()
        # The last position whose argmax is worth computing: it predicts the last allowed token.
        self.last_useful = self.prompt_len + max_tokens - 2
        if max_positions is not None:
            self.last_useful = min(self.last_useful, max_positions - 2)

    async def run(self) -> DecodeStats:
        started = time.perf_counter()
        try:
            await self.fill()
            while self.flight:
                chunk = self.flight.popleft()
                try:
                    await self.rebuilt()
                    argmaxes = await self.result_of(chunk)
                except RingChanged:
                    await self.replay()
                    await self.fill()
                    continue
                chosen = argmaxes if isinstance(argmaxes, Chosen) else Chosen(argmaxes)
                new, finished = self.verify(chunk, chosen.ids)
                self.stats.output_ids += new
                logprobs = chosen.logprobs[:len(new)] if chosen.logprobs is not None else None
                if await self.emit(new, logprobs):
                    finished = Finish.STOP
                if finished:
                    self.stats.finish = finished
                    self.drop_in_flight()
                    break
                await self.fill()
            if self.cancels:
                self.stats.chunks_cancelled = sum(await asyncio.gather(*self.cancels))
        finally:
            self.discard_in_flight()
            for pending in self.cancels:
                pending.cancel()
        self.stats.seconds = time.perf_counter() - started
        return self.stats

    async def fill(self) -> None:
        """Keep the window as full as the Lookahead allows, replaying after a ring change."""
        while True:
            try:
                while (len(self.flight) < self.in_flight and self.sent <= self.last_useful
                       and self.lookahead.allows(len(self.flight), self.spec_k)):
                    if not await self.send_next_chunk():
                        return
                return
            except RingChanged:
                await self.replay()

    async def send_next_chunk(self) -> bool:
        """Draft ahead as far as the next chunk needs and submit it; False when the draft
        had nothing to add, or a result came back first, so results must move the stream on."""
        # The chunk verifies positions first_output..last: the drafted tokens up to `last`
        # (the last one's argmax is the bonus, or checks the next chunk's guess).
        first_output = max(self.sent, self.committed - 1)
        # The prompt goes alone, as in plain decode: on a GPU a position's arithmetic depends
        # on the shape of the chunk it runs in, and the stages pad every later chunk to one
        # shape (K+1), so only an equal start keeps speculative output plain decode's.
        last = first_output if self.sent == 0 else min(first_output + self.spec_k, self.last_useful)
        wanted = last + 1 - len(self.stream)
        ran_dry = False
        if wanted > 0:
            drafted = await self.draft_ahead(wanted)
            if drafted is None:
                return False
            ran_dry = len(drafted) < wanted
        end = min(len(self.stream), last + 1)
        if end <= self.sent:
            if self.flight:
                self.flight[-1].draft_ran_dry = True
            return False
        # Sampled: the q of every drafted token the chunk verifies (those after its first output).
        proposals = [self.proposals[p] for p in range(first_output + 1, end)] if self.sampled else None
        result = await self.ring.submit(start_pos=self.sent, tokens=self.stream[self.sent:end], epoch=self.epoch,
                                        num_outputs=end - first_output, proposals=proposals)
        chunk = _Chunk(self.sent, end, first_output, result, sent_at=time.perf_counter(), draft_ran_dry=ran_dry)
        chunk.watch_arrival()
        self.flight.append(chunk)
        self.stats.chunks_sent += 1
        self.sent = end
        return True

    async def draft_ahead(self, wanted: int) -> list[int] | None:
        """Extend the stream by up to `wanted` drafted tokens, in pieces; None when the
        oldest chunk's result came back between two pieces (it decides whether drafting
        on is worth anything, so it is read first; what was drafted stays in the stream)."""
        drafted: list[int] = []
        while len(drafted) < wanted:
            if drafted and self.flight and self.flight[0].arrived:
                return None
            need = wanted - len(drafted)
            piece = self.lookahead.piece(need) if self.flight else need  # no result to wait for
            proposal = await self.draft_piece(piece)
            drafted += proposal
            if len(proposal) < piece:
                break  # the draft ran dry
        return drafted

    async def draft_piece(self, wanted: int) -> list[int]:
        began = time.perf_counter()
        proposal = (await self.propose(list(self.stream), wanted))[:wanted]
        if self.sampled:
            self.proposals.update(zip(range(len(self.stream), len(self.stream) + len(proposal)), proposal))
            proposal = [guess.token for guess in proposal]
        drafting = time.perf_counter() - began
        self.lookahead.record_draft(drafting, len(proposal))
        self.stats.draft_seconds += drafting
        self.stats.proposed += len(proposal)
        self.stream.extend(proposal)
        return proposal

    async def result_of(self, chunk: _Chunk) -> list[int]:
        began = time.perf_counter()
        argmaxes = await chunk.result
        self.stats.ring_seconds += time.perf_counter() - began
        self.stats.traversals += 1
        self.lookahead.record_traversal(chunk.traversal_seconds)
        return argmaxes

    def verify(self, chunk: _Chunk, argmaxes: list[int]) -> tuple[list[int], Finish | None]:
        """Commit the chunk's tokens up to its first rejected guess (the target's token
        replaces it) or its bonus token; the tokens committed and whether that finished.
        Sampled, `argmaxes` are the tail's choices: they end at the first that is not a guess."""
        new: list[int] = []
        finished = None
        drafted_before, rejected = self.stats.drafted, False
        for position in range(chunk.first_output, chunk.end):
            target = argmaxes[position - chunk.first_output]
            speculative = position + 1 < len(self.stream)
            if speculative:
                self.stats.drafted += 1
            accepted = speculative and self.stream[position + 1] == target
            if accepted:
                self.stats.accepted += 1
            else:
                if speculative:
                    rejected = True
                    self.reject_after(position)
                self.stream.append(target)  # the correction, or the bonus token
            self.committed = position + 2
            self.proposals.pop(position + 1, None)  # final now: its q is no longer needed
            new.append(target)
            finished = _finished(target, self.eos_ids, self.committed - self.prompt_len, self.max_tokens)
            if finished or not accepted:
                break  # later positions of this chunk followed a token that is not final
        if self.stats.drafted > drafted_before:
            self.lookahead.record_chunk(fully_accepted=not rejected)
        if (rejected or chunk.draft_ran_dry) and not finished:
            self.stats.pipeline_breaks += 1
        return new, finished

    def reject_after(self, position: int) -> None:
        """The guess after `position` was wrong: everything after it is stale."""
        self.cut(position + 1)
        self.sent = min(self.sent, position + 1)
        self.drop_in_flight()

    def cut(self, length: int) -> None:
        """Drop the stream's speculative tokens from `length` on, with their q."""
        for position in range(length, len(self.stream)):
            self.proposals.pop(position, None)
        del self.stream[length:]

    def drop_in_flight(self) -> None:
        """Give up the chunks in flight and tell the stages to skip their frames."""
        if not self.flight:
            return
        self.stats.chunks_wasted += len(self.flight)
        self.discard_in_flight()
        self.epoch += 1
        self.cancels.append(asyncio.ensure_future(self.ring.cancel(self.epoch)))

    async def replay(self) -> None:
        """After a fail-over: drop what was in flight, wait for the new ring, and have it
        rebuild the session's KV for the committed positions every stage had computed (all
        but the last committed token, which the next chunk carries), in the blocks that
        lost it where it can. Chunks follow at once: the replay's result comes first."""
        if self.stats.replays >= MAX_REPLAYS:
            raise RingChanged(f"the ring changed {self.stats.replays} times during one generation")
        self.stats.replays += 1
        self.discard_in_flight()
        self.cut(self.committed)
        self.epoch += 1
        await self.ring.wait_ready()
        self.sent = self.committed - 1
        if not self.sent:
            return
        try:
            rebuild = await self.ring.rebuild(tokens=self.stream[:self.sent], epoch=self.epoch)
        except RingChanged:
            return await self.replay()
        self.rebuilding = rebuild.done
        self.stats.partial_replays += rebuild.partial
        self.stats.replayed_positions += self.sent

    async def rebuilt(self) -> None:
        """Wait for the last replay to be through the ring; raises what it failed with."""
        if self.rebuilding is not None:
            rebuilding, self.rebuilding = self.rebuilding, None
            await rebuilding

    def discard_in_flight(self) -> None:
        for chunk in self.flight:
            _discard(chunk.result)
        self.flight.clear()
        if self.rebuilding is not None:
            _discard(self.rebuilding)
            self.rebuilding = None


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
