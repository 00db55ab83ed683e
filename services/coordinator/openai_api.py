"""OpenAI's request and response shapes, and their translation to and from the
coordinator's plain types. Request bodies are checked by pydantic models; fields OpenAI
defines that Shard does not serve are refused by name rather than silently ignored."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shard.decode.sampling import TokenLogprob
from shard.decode.speculative import Finish
from shard.errors import ShardError
from shard.node.generation import ChatMessage, GenerationRequest, GenerationResult, Sampling

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256  # chat has no limit by default; here at most a quarter of the context


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    """What both endpoints take. Unknown fields are ignored, as OpenAI's own server does
    with e.g. `user` and `metadata`."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sampling, not greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: _StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # Shard's extensions, off OpenAI's fields: speculation and sampling beyond OpenAI's.
    spec_k: int | None = None
    in_flight: int | None = None
    draft: str = ""
    ignore_eos: bool = False
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)

    def _sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                        seed=self.seed, repetition_penalty=self.repetition_penalty,
                        presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)

    def _stop(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def _request(self, max_tokens: int, logprobs: int | None, **prompt) -> GenerationRequest:
        return GenerationRequest(max_tokens=max_tokens, spec_k=self.spec_k, in_flight=self.in_flight,
                                 stop_at_eos=not self.ignore_eos, draft=self.draft, sampling=self._sampling(),
                                 stop=self._stop(), logprobs=logprobs, **prompt)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False
    suffix: None = None

    def generation_request(self, context_length: int) -> GenerationRequest:
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str):
            if len(self.prompt) > 1:
                raise ApiError(400, "one prompt per request", param="prompt")
            prompt = {"prompt": self.prompt[0]}
        elif isinstance(self.prompt, list):
            prompt = {"prompt_ids": tuple(self.prompt)}
        else:
            prompt = {"prompt": self.prompt}
        return self._request(self.max_tokens or DEFAULT_COMPLETION_TOKENS, self.logprobs, **prompt)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def generation_request(self, context_length: int) -> GenerationRequest:
        limit = self.max_completion_tokens or self.max_tokens or min(DEFAULT_CHAT_TOKENS, context_length // 4)
        # OpenAI's chat asks for the chosen tokens' logprobs, and top_logprobs alternatives.
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._request(limit, logprobs, chat=tuple(ChatMessage(m.role, m.text()) for m in self.messages))


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# gRPC status -> (HTTP status, OpenAI error type). UNIMPLEMENTED is a request for what this
# server does not serve (400, as OpenAI answers unsupported parameters; a 5xx would make
# clients retry in vain).
_HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNIMPLEMENTED: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def api_error_of(error: ShardError) -> ApiError:
    status, kind = _HTTP_OF.get(error.code, (500, "server_error"))
    headers = {}
    if error.retry_after_ms is not None:
        headers["retry-after-ms"] = str(error.retry_after_ms)
        headers["retry-after"] = str(max(1, -(-error.retry_after_ms // 1000)))
    code = "unsupported_parameter" if error.code == grpc.StatusCode.UNIMPLEMENTED else error.code.name.lower()
    return ApiError(status, error.message, type=kind, code=code, headers=headers)


def parse(body_class: type[_Body], data: object) -> _Body:
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return body_class.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


_FINISH = {Finish.LENGTH: "length", Finish.EOS: "stop"}


def finish_reason(result: GenerationResult) -> str:
    return _FINISH.get(result.stats.finish, "stop")  # a stop string ends a choice as EOS does


def usage(result: GenerationResult) -> dict:
    prompt, completion = len(result.prompt_ids), len(result.stats.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def shard_summary(result: GenerationResult) -> dict:
    """Shard's own account of a generation, beside OpenAI's fields."""
    stats = result.stats
    return {"session_id": result.session_id, "traversals": stats.traversals,
            "tokens_per_traversal": stats.tokens_per_traversal, "acceptance_rate": stats.acceptance_rate,
            "spec_k": result.spec_k, "in_flight": result.in_flight}


class Reply:
    """One response's identity and the shapes of its bodies and chunks, per endpoint.
    `token_text(id)`: a token as text, for logprobs."""

    def __init__(self, chat: bool, model: str, fingerprint: str, token_text: Callable[[int], str] = str):
        self.chat, self.model, self.fingerprint = chat, model, fingerprint
        self._token_text = token_text
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, object_: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices}

    def whole(self, result: GenerationResult, logprobs: list[TokenLogprob] | None = None) -> dict:
        if self.chat:
            choice = {"message": {"role": "assistant", "content": result.text}}
        else:
            choice = {"text": result.text}
        body = self._envelope(self.object, [{"index": 0, **choice, "logprobs": self.logprobs(logprobs),
                                              "finish_reason": finish_reason(result)}])
        return {**body, "usage": usage(result), "shard": shard_summary(result)}

    def chunk(self, text: str | None = None, *, finish: str | None = None, role: bool = False,
              logprobs: list[TokenLogprob] | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"delta": delta}
        else:
            choice = {"text": text or ""}
        return self._envelope(f"{self.object}.chunk" if self.chat else self.object,
                              [{"index": 0, **choice, "logprobs": self.logprobs(logprobs), "finish_reason": finish}])

    def logprobs(self, chosen: list[TokenLogprob] | None) -> dict | None:
        """The chosen tokens' logprobs in the endpoint's shape (None when not asked for)."""
        if chosen is None:
            return None
        if self.chat:
            return {"content": [{**self._token(c.id, c.logprob),
                                 "top_logprobs": [self._token(i, lp) for i, lp in c.top]} for c in chosen]}
        return {"tokens": [self._token_text(c.id) for c in chosen], "token_logprobs": [c.logprob for c in chosen],
                "top_logprobs": [{self._token_text(i): lp for i, lp in c.top} for c in chosen]}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self._token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def usage_chunk(self, result: GenerationResult) -> dict:
        return {**self._envelope(f"{self.object}.chunk" if self.chat else self.object, []),
                "usage": usage(result), "shard": shard_summary(result)}
