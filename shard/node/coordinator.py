"""The coordinator's runtime: validate a generation request, tokenize, drive decoding
over the ring and stream committed text. Holds no target layers: it reads only the
model's config and tokenizer."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator

import grpc
from opentelemetry.context import Context
from transformers import AutoConfig, AutoTokenizer

from shard.decode.draft import Draft, DraftSession, NgramDraft
from shard.decode.oracle import OracleDraft
from shard.decode.sampling import Proposal, SamplingParams, TokenLogprob
from shard.decode.speculative import Finish, Lookahead, Rebuild, RingChanged, decode
from shard.errors import ShardError
from shard.metrics import GenerationMetrics, NodeMetrics
from shard.model.checkpoint import config_fingerprint
from shard.model.fingerprints import tokenizer_sha256
from shard.node.admission import Admission
from shard.node.kv_ledger import KVLedger, StageKV
from shard.node.generation import GenerationRequest, GenerationResult, TokenDelta
from shard.node.receipts import ReceiptMaker
from shard.node.request_sampling import check_sampling, chunk_sampling
from shard.node.ring import Ring, stages_to_rebuild
from shard.node.stop_strings import StopText
from shard.node.tail_sampling import ChunkSampling
from shard.telemetry import in_span, tracer
from shard.wire.signing import Signer
from shard.wire.tls import NodeTLS

log = logging.getLogger(__name__)


def _eos_ids(model_dir: Path, config) -> frozenset[int]:
    eos = config.eos_token_id
    generation_config = model_dir / "generation_config.json"
    if generation_config.exists():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(model_dir)


class TextStream:
    """Incremental detokenization: the text each new batch of ids adds."""

    def __init__(self, tokenizer):
        self._tokenizer, self._ids, self._text = tokenizer, [], ""

    def push(self, ids: list[int]) -> str:
        if self._tokenizer is None:
            return ""
        self._ids.extend(ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self._text):
            return ""  # an incomplete multi-byte character: wait for the next token
        delta, self._text = text[len(self._text):], text
        return delta


MAX_SPEC_K = 64
MAX_IN_FLIGHT = 64
DEFAULT_MAX_PROMPT_CHARS = 262144
REFERENCES_KEPT = 64  # prompts whose plain decode an oracle draft remembers


@dataclass
class Prepared:
    prompt_ids: list[int]
    max_tokens: int
    stop_at_eos: bool
    draft: Draft | None
    spec_k: int
    in_flight: int
    sampling: ChunkSampling | None = None  # None: greedy argmax ids
    stop: tuple[str, ...] = ()
    receipt: bool = False
    receipt_private: bool = False

    @property
    def positions(self) -> int:
        """The most positions the session will hold: its prompt and max_tokens."""
        return len(self.prompt_ids) + self.max_tokens


@dataclass
class _Settings:
    """What a request asks for besides its prompt, checked."""

    draft: Draft | None
    spec_k: int
    in_flight: int


class _Deltas:
    """Committed tokens as the client sees them: their text, cut before the first stop string."""

    def __init__(self, text: TextStream, stops: tuple[str, ...]):
        self._text, self._stops = text, StopText(stops) if stops else None
        self.kept = 0  # output tokens given to the client
        self.text = ""  # the text given to the client

    def push(self, ids: list[int], logprobs: list[TokenLogprob] | None) -> tuple[TokenDelta, bool]:
        """The delta for newly committed `ids`, and whether a stop string ended the text."""
        if self._stops is None:
            released, taken, stop = self._text.push(ids), len(ids), False
        else:
            # Token by token, so the delta ends with the token that completed the stop string.
            pieces, taken, stop = [], 0, False
            while taken < len(ids) and not stop:
                piece, stop = self._stops.push(self._text.push(ids[taken:taken + 1]))
                pieces.append(piece)
                taken += 1
            released = "".join(pieces)
        self.kept += taken
        self.text += released
        return TokenDelta(ids[:taken], released, logprobs[:taken] if logprobs is not None else None), stop

    def flush(self) -> str:
        """Text held back as a possible stop string's start, now that none can follow."""
        return self._stops.flush() if self._stops else ""


def _decoding(prepared: Prepared, draft_name: str) -> dict:
    """The decoding settings as a receipt states them: with the seed every chunk's spec carried,
    so a verifier can re-derive each sampled token (docs/receipts.md)."""
    sampling = prepared.sampling
    params = sampling.params if sampling else SamplingParams()
    return {"sampling": "greedy" if params.greedy else "sampled", "temperature": params.temperature,
            "top_p": params.top_p, "top_k": params.top_k, "min_p": params.min_p,
            "seed": None if params.greedy else params.seed, "logprobs": sampling.logprobs if sampling else None,
            "stop": list(prepared.stop), "draft": draft_name, "spec_k": prepared.spec_k,
            "in_flight": prepared.in_flight, "max_tokens": prepared.max_tokens, "stop_at_eos": prepared.stop_at_eos}


class SessionRing:
    """The driver's view of the ring for one session: chunk ids, futures, cancellation, and
    where the session's KV is whole, so that a replay computes only where it was lost."""

    def __init__(self, ring: Ring, session_id: str, positions: int, sampling: ChunkSampling | None = None):
        """`positions`: the most the session will hold, its prompt and max_tokens (stages
        on static KV size its attention by it)."""
        self._ring, self._session_id, self._sampling = ring, session_id, sampling
        self._positions = positions
        self._chunk_ids = itertools.count()
        # The ring layout of the last chunk whose result came back: its stages held the
        # session's KV then. () while unknown (none yet, or a replay not yet through).
        self._held_in: tuple = ()

    async def submit(self, *, start_pos: int, tokens: list[int], num_outputs: int, epoch: int,
                     proposals: list[Proposal] | None = None):
        chunk_id = next(self._chunk_ids)
        sampling = self._sampling
        if sampling is not None and proposals:
            sampling = replace(sampling, proposals=tuple(proposals))
        return self._track(self._ring.layout, await self._ring.submit(
            session_id=self._session_id, chunk_id=chunk_id, epoch=epoch, start_pos=start_pos, tokens=tokens,
            num_outputs=num_outputs, sampling=sampling, session_positions=self._positions))

    async def rebuild(self, *, tokens: list[int], epoch: int) -> Rebuild:
        now = self._ring.layout
        stages = stages_to_rebuild(self._held_in, now)
        self._held_in = ()  # a replay that fails says nothing about who holds what: the next goes everywhere
        done = await self._ring.replay(session_id=self._session_id, chunk_id=next(self._chunk_ids), epoch=epoch,
                                       tokens=tokens, stages=stages, session_positions=self._positions)
        return Rebuild(self._track(now, done), partial=stages != (0, len(now) - 1))

    def _track(self, layout: tuple, result: asyncio.Future) -> asyncio.Future:
        def came_back(future: asyncio.Future) -> None:
            if not future.cancelled() and future.exception() is None:
                self._held_in = layout

        result.add_done_callback(came_back)
        return result

    async def cancel(self, epoch: int) -> int:
        return await self._ring.cancel_epoch(self._session_id, epoch)

    async def wait_ready(self) -> None:
        await self._ring.wait_ready()


class CoordinatorNode:
    def __init__(self, *, node_id: str, model_dir: str, tls: NodeTLS | None, secrets: list[bytes] | None,
                 drafts: list[Draft] = (), spec_k: int = 4, in_flight: int = 4, chunk_timeout: float = 120.0,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS, max_concurrent: int = 64,
                 max_queued: int = 256, queue_timeout: float = 30.0):
        self.node_id = node_id
        # The first draft given is the default; n-gram lookup is always there, "none" is plain decode.
        self.drafts: dict[str, Draft | None] = {d.name: d for d in drafts}
        self.default_draft = next(iter(self.drafts), "none")
        self.drafts.setdefault("ngram", NgramDraft())
        self.drafts["none"] = None
        self.default_spec_k, self.default_in_flight = spec_k, in_flight
        self.max_prompt_chars = max_prompt_chars
        self.admission = Admission(max_running=max_concurrent, max_queued=max_queued,
                                   max_wait_seconds=queue_timeout)
        self.kv_ledger = KVLedger()
        self._kv_refresh = asyncio.Lock()
        # Draft steps run off the event loop that moves frames: in one thread for drafts
        # on a CPU (torch already spreads each op over the cores), in as many as a GPU draft
        # has CUDA streams, so sessions draft side by side instead of queueing.
        self._draft_threads = ThreadPoolExecutor(max_workers=max((d.threads for d in drafts), default=1),
                                                 thread_name_prefix="draft")
        # Oracle drafts' references: prompt -> the ring's plain decode after it.
        self.references: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
        # Tokenizing and chat templating take time in proportion to the prompt: off the event
        # loop, so other sessions' frames keep moving. One thread: the tokenizer is shared,
        # and the prompt limits bound each job.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        # A draft's record (per K) carries over between sessions: each starts well judged.
        self._lookaheads: dict[tuple[str, int], Lookahead] = {}
        path = Path(model_dir)
        self.config = AutoConfig.from_pretrained(path)
        self.fingerprint = config_fingerprint(path)
        self.tokenizer = _load_tokenizer(path)
        self.eos_ids = _eos_ids(path, self.config)
        self.context_length = getattr(self.config, "max_position_embeddings", None) or 1 << 20
        self.ring = Ring(node_id, tls, secrets, chunk_timeout=chunk_timeout)
        self.receipts = ReceiptMaker(node_id, Signer(tls.key_pem, tls.cert_pem) if tls else None, model={
            "config_sha256": self.fingerprint, "tokenizer_sha256": tokenizer_sha256(str(path)),
            "num_layers": self.config.num_hidden_layers})
        self.metrics = NodeMetrics("coordinator", node_id)
        self.generation_metrics = GenerationMetrics(self.metrics.meter)
        self.ring.on_round_trip = self.generation_metrics.ring_round_trip.record
        self._observe()

    def _observe(self) -> None:
        observe = self.metrics.observe
        observe("shard.generations.active", lambda: self.admission.running, unit="{generation}",
                description="generations running (each a session on every stage)")
        observe("shard.generations.queued", lambda: self.admission.queued + self.kv_ledger.waiting,
                unit="{generation}", description="generations waiting for a slot, or for room in the stages' KV")
        observe("shard.chunks.in_flight", lambda: self.ring.in_flight, unit="{chunk}",
                description="verify chunks in the ring whose results have not come back")
        self.metrics.observe_refused(self.ring.inbound.rejected)

    def check(self, request: GenerationRequest) -> _Settings:
        """Everything that can be checked before any work (no tokenizing): a request that
        fails here costs microseconds, however large its prompt."""
        inputs = [form for form in ("prompt", "chat", "prompt_ids") if getattr(request, form) is not None]
        if len(inputs) != 1:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "give one of a prompt, chat messages or prompt_ids")
        if inputs[0] != "prompt_ids" and self.tokenizer is None:
            raise ShardError(grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer: send prompt_ids")
        if request.prompt is not None:
            if not request.prompt:
                raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
            self._check_chars(len(request.prompt))
        elif request.chat is not None:
            if not request.chat:
                raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "chat has no messages")
            if not getattr(self.tokenizer, "chat_template", None):
                raise ShardError(grpc.StatusCode.FAILED_PRECONDITION, "this model has no chat template")
            self._check_chars(sum(len(m.role) + len(m.content) for m in request.chat))
        else:
            if len(request.prompt_ids) >= self.context_length:
                raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"the prompt has {len(request.prompt_ids)} tokens; the context holds "
                                 f"{self.context_length}")
            if any(i >= self.config.vocab_size for i in request.prompt_ids):
                raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"prompt_ids must lie in [0, {self.config.vocab_size})")
        if request.max_tokens <= 0:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1")
        check_sampling(request, has_tokenizer=self.tokenizer is not None)
        if request.receipt and self.receipts.signer is None:
            raise ShardError(grpc.StatusCode.FAILED_PRECONDITION,
                             "this coordinator has no node key (--insecure): it cannot sign receipts")
        draft_name = request.draft or self.default_draft
        if draft_name not in self.drafts:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"unknown draft {draft_name!r}; this coordinator has {sorted(self.drafts)}")
        draft = self.drafts[draft_name]
        spec_k = request.spec_k if request.spec_k is not None else (self.default_spec_k if draft else 0)
        in_flight = request.in_flight if request.in_flight is not None else (self.default_in_flight if draft else 1)
        if not 0 <= spec_k <= MAX_SPEC_K or not 1 <= in_flight <= MAX_IN_FLIGHT:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"spec_k must lie in [0, {MAX_SPEC_K}] and in_flight in [1, {MAX_IN_FLIGHT}]")
        return _Settings(draft, spec_k, in_flight)

    def _check_chars(self, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the prompt has {chars} characters; this coordinator takes at most "
                             f"{self.max_prompt_chars}")

    async def prepare(self, request: GenerationRequest, settings: _Settings) -> Prepared:
        """Tokenize (in the tokenizer's thread) and check the prompt against the context."""
        if request.prompt_ids is not None:
            prompt_ids = list(request.prompt_ids)
        else:
            prompt_ids = await asyncio.get_running_loop().run_in_executor(
                self._tokenizer_thread, self._tokenize, request)
        if not prompt_ids:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context_length}")
        if len(prompt_ids) + request.max_tokens > self.context_length:
            raise ShardError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(prompt_ids)} prompt tokens + max_tokens {request.max_tokens} exceed the context "
                f"of {self.context_length}")
        return Prepared(prompt_ids, request.max_tokens, request.stop_at_eos, settings.draft,
                        settings.spec_k, settings.in_flight, chunk_sampling(request.sampling, request.logprobs),
                        request.stop, request.receipt, request.receipt_private)

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        if request.prompt is not None:
            return self.tokenizer(request.prompt)["input_ids"]
        messages = [{"role": m.role, "content": m.content} for m in request.chat]
        return list(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    def _check_ready(self) -> None:
        if not self.ring.ready.is_set():
            problem = self.ring.problem
            raise ShardError(grpc.StatusCode.UNAVAILABLE,
                             f"the ring is not ready: {problem or 'stages are still loading'}")

    async def generate(self, request: GenerationRequest, trace_context: Context | None = None
                       ) -> AsyncIterator[TokenDelta | GenerationResult]:
        """Stream TokenDeltas as tokens are committed, then one GenerationResult. Waits in
        the admission queue for a slot first. `trace_context`: the caller's trace, which
        the generation's span then joins."""
        measured = self.generation_metrics.start()
        outcome = "cancelled"  # unless it ends otherwise: a caller that went away
        try:
            settings = self.check(request)
            self._check_ready()
            async with self.admission.slot():
                prepared = await self.prepare(request, settings)
                await self._follow_stage_kv()
                async with self.kv_ledger.hold(prepared.positions, self.admission.max_wait_seconds):
                    async for event in self._run(prepared, trace_context):
                        if isinstance(event, TokenDelta):
                            measured.committed(len(event.ids))
                        else:
                            measured.finished(len(event.prompt_ids), event.stats)
                        yield event
            outcome = "ok"
        except ShardError as error:
            outcome = error.code.name
            raise
        except Exception:
            outcome = "INTERNAL"
            raise
        finally:
            measured.ended(outcome)

    async def _follow_stage_kv(self) -> None:
        """The ledger learns the stages' KV budgets once per ring (a stage that does not
        answer leaves it as it was, to try again with the next generation)."""
        layout = self.ring.layout
        if layout == self.kv_ledger.layout:
            return
        async with self._kv_refresh:
            if layout != self.kv_ledger.layout:
                try:
                    infos = await self.ring.stage_infos()
                except grpc.aio.AioRpcError as error:
                    log.warning("could not read the stages' KV budgets: %s", error.details())
                    return
                if not all(info.kv_max_sessions for info in infos):
                    return  # a stage still loading its block: no KV yet to count
                await self.kv_ledger.follow(layout, [StageKV.from_info(info) for info in infos])

    async def _run(self, prepared: Prepared, trace_context: Context | None = None
                   ) -> AsyncIterator[TokenDelta | GenerationResult]:
        session_id = uuid.uuid4().hex
        deltas = _Deltas(TextStream(self.tokenizer), prepared.stop)
        # What decoding commits, then None once it has finished.
        committed: asyncio.Queue[TokenDelta | None] = asyncio.Queue()
        draft_session = await self._draft_session(prepared)
        record = self.ring.notary.open(session_id, transcript=not prepared.receipt_private) \
            if prepared.receipt else None
        ended = False
        sampling = prepared.sampling
        sampled = sampling is not None and not sampling.params.greedy

        async def emit(ids: list[int], logprobs: list[TokenLogprob] | None) -> bool:
            delta, stop = deltas.push(ids, logprobs)
            committed.put_nowait(delta)
            return stop

        async def propose(sequence: list[int], n: int) -> list[int] | list[Proposal]:
            run = (lambda: draft_session.propose_sampled(sequence, n, sampling.params)) if sampled else (
                lambda: draft_session.propose(sequence, n))
            return await asyncio.get_running_loop().run_in_executor(self._draft_threads, run)

        draft_name = prepared.draft.name if prepared.draft else "none"
        span = tracer.start_span("shard.generate", context=trace_context, attributes={
            "shard.session": session_id, "shard.prompt_tokens": len(prepared.prompt_ids),
            "shard.max_tokens": prepared.max_tokens, "shard.draft": draft_name,
            "shard.spec_k": prepared.spec_k, "shard.in_flight": prepared.in_flight,
            "shard.temperature": sampling.params.temperature if sampling else 0.0})
        decoding = asyncio.create_task(in_span(span, decode(
            SessionRing(self.ring, session_id, prepared.positions, sampling),
            prepared.prompt_ids, max_tokens=prepared.max_tokens,
            eos_ids=self.eos_ids if prepared.stop_at_eos else frozenset(), emit=emit,
            draft=draft_session, propose=propose if draft_session else None,
            spec_k=prepared.spec_k, in_flight=prepared.in_flight, max_positions=self.context_length,
            lookahead=self._lookaheads.setdefault((draft_name, prepared.spec_k, sampled), Lookahead()),
            sampled=sampled)))
        decoding.add_done_callback(lambda _: committed.put_nowait(None))
        try:
            while (delta := await committed.get()) is not None:
                yield delta
            try:
                stats = decoding.result()
            except RingChanged as error:
                raise ShardError(grpc.StatusCode.UNAVAILABLE, str(error)) from error
            if stats.finish == Finish.STOP:
                del stats.output_ids[deltas.kept:]  # decoded past the stop string: not the client's
            elif held := deltas.flush():
                yield TokenDelta(ids=[], text=held)
            span.set_attributes({"shard.tokens": len(stats.output_ids), "shard.traversals": stats.traversals,
                                 "shard.acceptance": stats.acceptance_rate})
            receipt = ""
            if record is not None:
                # The END goes first: a stage attests once it has passed, with every frame before it.
                await self.ring.end_session(session_id)
                ended = True
                receipt = await self.receipts.make(
                    self.ring, session_id, record, prompt_ids=prepared.prompt_ids, stats=stats,
                    private=prepared.receipt_private, finish=stats.finish.name,
                    decoding=_decoding(prepared, draft_name))
            yield GenerationResult(
                session_id=session_id, prompt_ids=prepared.prompt_ids,
                text=deltas.text if stats.finish == Finish.STOP else (
                    self.tokenizer.decode(stats.output_ids, skip_special_tokens=True) if self.tokenizer else ""),
                spec_k=prepared.spec_k, in_flight=prepared.in_flight, stats=stats, receipt=receipt,
                seed=sampling.params.seed if sampled else None)
            batching = prepared.draft.batching() if prepared.draft else None
            log.info("session %s: %d tokens in %.2f s (%.1f tok/s, %.2f tokens per traversal)%s",
                     session_id, len(stats.output_ids), stats.seconds,
                     len(stats.output_ids) / stats.seconds, stats.tokens_per_traversal,
                     f"; draft {draft_name} so far: {batching}" if batching else "")
        finally:
            # A cancelled stream lands here too: wait for decoding to wind down (its chunks
            # discarded, its cancels cancelled) so no task of it outlives the session.
            decoding.cancel()
            await asyncio.gather(decoding, return_exceptions=True)
            if draft_session is not None:
                draft_session.close()
            span.end()
            if not ended:
                await self.ring.end_session(session_id)
            self.ring.notary.close(session_id)

    async def _draft_session(self, prepared: Prepared) -> DraftSession | None:
        if prepared.draft is None:
            return None
        if isinstance(prepared.draft, OracleDraft):
            continuation = await self._reference(prepared.prompt_ids, prepared.max_tokens)
            return prepared.draft.session(prepared.prompt_ids + continuation)
        return prepared.draft.session()

    async def _reference(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """The ring's greedy continuation of a prompt, for an oracle draft: plain decode as
        a session of its own (EOS ignored: a longer reference serves any stop), run once per
        prompt and remembered, so only a prompt's first oracle generation pays for it."""
        key = tuple(prompt_ids)
        known = self.references.get(key)
        if known is None or len(known) < max_tokens:
            session_id = uuid.uuid4().hex

            async def ignore(ids: list[int], logprobs: None) -> None:
                """The result holds the tokens."""

            try:
                stats = await decode(SessionRing(self.ring, session_id, len(prompt_ids) + max_tokens), prompt_ids,
                                     max_tokens=max_tokens, eos_ids=frozenset(), emit=ignore,
                                     max_positions=self.context_length)
            except RingChanged as error:
                raise ShardError(grpc.StatusCode.UNAVAILABLE, str(error)) from error
            finally:
                await self.ring.end_session(session_id)
            known = self.references[key] = stats.output_ids
        self.references.move_to_end(key)
        while len(self.references) > REFERENCES_KEPT:
            self.references.popitem(last=False)
        return known[:max_tokens]
