"""The coordinator's runtime: validate a generation request, tokenize, drive decoding
over the ring and stream committed text. Holds no target layers: it reads only the
model's config and tokenizer."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc
from transformers import AutoConfig, AutoTokenizer

from shard.decode.plain import Finish, plain_decode
from shard.model.checkpoint import config_fingerprint
from shard.node.ring import Ring, RingError
from shard.v1 import coordinator_pb2
from shard.wire.tls import NodeTLS

log = logging.getLogger(__name__)

_FINISH = {Finish.LENGTH: coordinator_pb2.FINISH_REASON_LENGTH, Finish.EOS: coordinator_pb2.FINISH_REASON_EOS}


class GenerateError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


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


@dataclass
class Prepared:
    prompt_ids: list[int]
    max_tokens: int
    stop_at_eos: bool


class CoordinatorNode:
    def __init__(self, *, node_id: str, model_dir: str, tls: NodeTLS | None, secrets: list[bytes] | None,
                 chunk_timeout: float = 120.0):
        self.node_id = node_id
        path = Path(model_dir)
        self.config = AutoConfig.from_pretrained(path)
        self.fingerprint = config_fingerprint(path)
        self.tokenizer = _load_tokenizer(path)
        self.eos_ids = _eos_ids(path, self.config)
        self.context_length = getattr(self.config, "max_position_embeddings", None) or 1 << 20
        self.ring = Ring(node_id, tls, secrets, chunk_timeout=chunk_timeout)
        self.active_sessions = 0

    def prepare(self, request: coordinator_pb2.GenerateRequest) -> Prepared:
        which = request.WhichOneof("input")
        if which is None:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "give a prompt, chat messages or prompt_ids")
        if which != "prompt_ids" and self.tokenizer is None:
            raise GenerateError(grpc.StatusCode.FAILED_PRECONDITION,
                                "this model has no tokenizer: send prompt_ids")
        if which == "prompt":
            if not request.prompt:
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
            prompt_ids = self.tokenizer(request.prompt)["input_ids"]
        elif which == "chat":
            if not request.chat.messages:
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "chat has no messages")
            if not getattr(self.tokenizer, "chat_template", None):
                raise GenerateError(grpc.StatusCode.FAILED_PRECONDITION, "this model has no chat template")
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            prompt_ids = list(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        else:
            prompt_ids = list(request.prompt_ids.ids)
            if any(i >= self.config.vocab_size for i in prompt_ids):
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"prompt_ids must lie in [0, {self.config.vocab_size})")
        if not prompt_ids:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context_length}")
        if request.max_tokens <= 0:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1")
        if len(prompt_ids) + request.max_tokens > self.context_length:
            raise GenerateError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(prompt_ids)} prompt tokens + max_tokens {request.max_tokens} exceed the context "
                f"of {self.context_length}")
        stop_at_eos = request.stop_at_eos if request.HasField("stop_at_eos") else True
        return Prepared(prompt_ids, request.max_tokens, stop_at_eos)

    async def generate(self, request: coordinator_pb2.GenerateRequest
                       ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        """Stream TokenDeltas as tokens are committed, then one GenerationSummary."""
        prepared = self.prepare(request)
        if not self.ring.ready.is_set():
            problem = self.ring.plan.problem if self.ring.plan else "no plan from the registry yet"
            raise GenerateError(grpc.StatusCode.UNAVAILABLE,
                                f"the ring is not ready: {problem or 'stages are still loading'}")
        session_id = uuid.uuid4().hex
        text = TextStream(self.tokenizer)
        committed: asyncio.Queue[list[int]] = asyncio.Queue()
        chunk_ids = itertools.count()

        async def step(start_pos: int, tokens: list[int], num_outputs: int) -> list[int]:
            return await self.ring.run_chunk(session_id=session_id, chunk_id=next(chunk_ids), epoch=0,
                                             start_pos=start_pos, tokens=tokens, num_outputs=num_outputs)

        async def emit(ids: list[int]) -> None:
            committed.put_nowait(ids)

        started = time.perf_counter()
        decoding = asyncio.create_task(plain_decode(
            step, prepared.prompt_ids, max_tokens=prepared.max_tokens,
            eos_ids=self.eos_ids if prepared.stop_at_eos else frozenset(), emit=emit))
        self.active_sessions += 1
        try:
            async for ids in _until_done(committed, decoding):
                yield coordinator_pb2.GenerateResponse(
                    delta=coordinator_pb2.TokenDelta(ids=ids, text=text.push(ids)))
            try:
                stats = decoding.result()
            except RingError as error:
                raise GenerateError(error.code, error.message) from error
            seconds = time.perf_counter() - started
            yield coordinator_pb2.GenerateResponse(summary=coordinator_pb2.GenerationSummary(
                session_id=session_id, prompt_ids=prepared.prompt_ids, output_ids=stats.output_ids,
                text=self.tokenizer.decode(stats.output_ids, skip_special_tokens=True) if self.tokenizer else "",
                finish_reason=_FINISH[stats.finish], tokens=len(stats.output_ids), seconds=seconds,
                tokens_per_second=len(stats.output_ids) / seconds if seconds else 0.0,
                traversals=stats.traversals, chunks_sent=stats.traversals,
                tokens_per_traversal=len(stats.output_ids) / max(stats.traversals, 1),
                ring_seconds=seconds))
            log.info("session %s: %d tokens in %.2f s", session_id, len(stats.output_ids), seconds)
        finally:
            decoding.cancel()
            self.active_sessions -= 1
            await self.ring.end_session(session_id)


async def _until_done(queue: asyncio.Queue, task: asyncio.Task):
    """Yield queued items until `task` finishes, then whatever it queued last."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
            continue
        getter.cancel()
        while not queue.empty():
            yield queue.get_nowait()
        return
