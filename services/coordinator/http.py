"""The OpenAI-compatible HTTP front: a thin translator over CoordinatorNode, as the gRPC
servicer is. Starlette routes, uvicorn serves, inside the coordinator's event loop.

The HTTP front has no client certificates: bearer API keys gate it, and without keys it
only listens on loopback (shard.config checks). A client that goes away cancels its
generation, which ends the session on every stage."""

from __future__ import annotations

import asyncio
import hmac
import json
import tempfile
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import AsyncIterator

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shard.config import ConfigError
from shard.decode.sampling import TokenLogprob
from shard.errors import ShardError
from shard.node.coordinator import CoordinatorNode
from shard.node.generation import GenerationResult, TokenDelta
from shard.services.coordinator.openai_api import (ApiError, ChatBody, CompletionBody, Reply, api_error_of,
                                                   finish_reason, parse)
from shard.telemetry import caller_context
from shard.wire.tls import NodeTLS

BODY_SLACK = 1 << 16  # JSON syntax and fields around the prompt's characters


class OpenAIFront:
    def __init__(self, node: CoordinatorNode, *, model_name: str, api_keys: frozenset[str] | None):
        self.node, self.model_name = node, model_name
        self._keys = [key.encode() for key in api_keys or ()]
        # UTF-8 takes at most 4 bytes a character; escapes (\uXXXX) 6.
        self.max_body_bytes = 6 * node.max_prompt_chars + BODY_SLACK
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # ---- endpoints ----------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return await self._answer(request, self._models)

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, lambda: self._generate(request, CompletionBody, chat=False))

    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, lambda: self._generate(request, ChatBody, chat=True))

    async def _models(self) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "shard"}]})

    async def _generate(self, request: Request, body_class, *, chat: bool) -> Response:
        body = parse(body_class, await self._json(request))
        if body.model != self.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {self.model_name!r}",
                           param="model", code="model_not_found")
        events = self.node.generate(body.generation_request(self.node.context_length),
                                    caller_context(request.headers))
        reply = Reply(chat, self.model_name, self.node.fingerprint, self._token_text)
        # The first event comes after the node's checks, tokenizing and admission: a request
        # they refuse is answered with its HTTP status, not a 200 stream that fails.
        try:
            first = await _until_disconnected(request, anext(events))
        except BaseException:
            await events.aclose()
            raise
        if body.stream:
            return StreamingResponse(_sse(reply, first, events, body.include_usage), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        result, logprobs = await _until_disconnected(request, _last(first, events))
        return JSONResponse(reply.whole(result, logprobs))

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.node.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

    # ---- translation of errors, keys and bodies ------------------------------------

    async def _answer(self, request: Request, handler) -> Response:
        try:
            self._authorize(request)
            return await handler()
        except ShardError as error:
            return _error_response(api_error_of(error))
        except ApiError as error:
            return _error_response(error)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it; the generation is cancelled

    def _authorize(self, request: Request) -> None:
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compared with every key, each in constant time: no timing hint of which nearly matched.
        matches = [hmac.compare_digest(token.strip().encode(), key) for key in self._keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    async def _json(self, request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON: {error}") from None

    async def _not_found(self, request: Request, exc) -> Response:
        return _error_response(ApiError(404, f"no route {request.url.path}; this server has /v1/models, "
                                             f"/v1/completions and /v1/chat/completions", code="not_found"))

    async def _not_allowed(self, request: Request, exc) -> Response:
        return _error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                        code="method_not_allowed"))


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body exceeds {limit} bytes", code="request_too_large")


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _last(first, events: AsyncIterator) -> tuple[GenerationResult, list[TokenLogprob] | None]:
    """The generation's result, and its tokens' logprobs when the deltas carried them."""
    logprobs = None
    async with aclosing(events):
        event = first
        while isinstance(event, TokenDelta):
            if event.logprobs is not None:
                logprobs = (logprobs or []) + event.logprobs
            event = await anext(events)
    return event, logprobs


async def _until_disconnected(request: Request, work):
    """Await `work`, unless the client hangs up first: then cancel it (its session ends on
    every stage) and raise ClientDisconnect. The body was read already, so the only message
    left to receive is the disconnect."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnect()
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(reply: Reply, first, events: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them. Starlette cancels this on a disconnect;
    closing `events` then ends the session on every stage."""
    steps = _Detached(events)
    try:
        if reply.chat:
            yield _event(reply.chunk(role=True))
        event = first
        try:
            while True:
                if isinstance(event, TokenDelta):
                    if event.text or event.logprobs:
                        yield _event(reply.chunk(event.text, logprobs=event.logprobs))
                else:
                    yield _event(reply.chunk(finish=finish_reason(event)))
                    if include_usage:
                        yield _event(reply.usage_chunk(event))
                    break
                event = await steps.next()
        except ShardError as error:  # after the 200: the error travels as an event, as OpenAI's does
            yield _event(api_error_of(error).body())
        yield "data: [DONE]\n\n"
    finally:
        await steps.close()


class _Detached:
    """The node's events, each awaited in a task of its own. Starlette cancels a stream
    through an anyio cancel scope, which cancels every await inside it again and again:
    it would cut short the clean-up that ends the session on the stages. Here the step is
    cancelled once, as the gRPC server does, and its clean-up runs to the end."""

    def __init__(self, events: AsyncIterator):
        self._events, self._step = events, None

    async def next(self):
        self._step = asyncio.ensure_future(anext(self._events))
        return await asyncio.shield(self._step)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._step is not None:
                self._step.cancel()
                await asyncio.gather(self._step, return_exceptions=True)
            await self._events.aclose()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Uvicorn(uvicorn.Server):
    """uvicorn inside the node's event loop: the node's own shutdown stops it, so it
    leaves the process's signals alone."""

    @contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    def __init__(self, app, listen: str, tls: NodeTLS | None):
        host, _, port = listen.rpartition(":")
        self._tls_files = _tls_files(tls) if tls else None
        files = self._tls_files.name if self._tls_files else None
        self._server = _Uvicorn(uvicorn.Config(
            app, host=host.strip("[]"), port=int(port), lifespan="off", log_level="warning", access_log=False,
            timeout_graceful_shutdown=1,
            ssl_certfile=f"{files}/cert.pem" if files else None, ssl_keyfile=f"{files}/key.pem" if files else None))
        self._task: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:  # uvicorn says so only by this flag
            if self._task.done():
                try:
                    self._task.result()
                except SystemExit:  # uvicorn's answer to a port it cannot bind (it logged why)
                    pass
                raise ConfigError(f"--http-listen: cannot listen on {self._server.config.host}:"
                                  f"{self._server.config.port}")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        if self._tls_files is not None:
            self._tls_files.cleanup()


def _tls_files(tls: NodeTLS) -> tempfile.TemporaryDirectory:
    """uvicorn (ssl) reads certificates from files: the node's, written where only this
    process's user can read them, for as long as the front runs."""
    folder = tempfile.TemporaryDirectory(prefix="shard-http-tls-")
    Path(folder.name, "cert.pem").write_bytes(tls.cert_pem)
    key = Path(folder.name, "key.pem")
    key.touch(mode=0o600)
    key.write_bytes(tls.key_pem)
    return folder
