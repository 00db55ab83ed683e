"""Python clients of the coordinator's public API: `Client` (sync and asyncio, iterator
streaming, certificates from files, a folder or PEM bytes, deadlines, one exception per
kind of failure) and `generate`, the one-call coroutine the tests and `shard up` use."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from shard.v1 import api_pb2, api_pb2_grpc
from shard.wire.certs import CA_CERT
from shard.wire.tls import CHANNEL_OPTIONS, NodeTLS, open_channel


@dataclass
class Generation:
    summary: api_pb2.GenerationSummary | None = None
    streamed_ids: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.summary.text if self.summary else ""


async def generate(
    address: str,
    tls: NodeTLS | None,
    request: api_pb2.GenerateRequest,
    *,
    on_text: Callable[[str], None] | None = None,
    wait_ready_seconds: float = 0.0,
) -> Generation:
    """Run one generation; with `wait_ready_seconds`, retry while the ring is still forming."""
    result = Generation()

    def not_ready_yet(error: BaseException) -> bool:
        # Retry only before anything was streamed: a retry must never repeat text.
        return (isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
                and not result.streamed_ids)

    async with open_channel(address, tls) as channel:
        stub = api_pb2_grpc.InferenceServiceStub(channel)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(not_ready_yet),
            wait=wait_exponential(multiplier=0.1, max=1.0),
            stop=stop_after_delay(wait_ready_seconds),
            reraise=True,
        ):
            with attempt:
                async for response in stub.Generate(request, wait_for_ready=wait_ready_seconds > 0):
                    if response.HasField("delta"):
                        result.streamed_ids.extend(response.delta.ids)
                        if on_text and response.delta.text:
                            on_text(response.delta.text)
                    else:
                        result.summary = response.summary
        return result


# ---- the Client -------------------------------------------------------------------


class ClientError(Exception):
    """A generation the coordinator refused or could not finish: `code` is the gRPC status,
    `retry_after` (seconds) is set when the coordinator said when to try again."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.retry_after = code, message, retry_after


class InvalidRequest(ClientError):
    """The request itself is wrong (or asks for what this coordinator does not serve)."""


class AccessDenied(ClientError):
    """The client's certificate is missing, untrusted or not allowed to call."""


class Overloaded(ClientError):
    """The coordinator's queue is full: try again after `retry_after`."""


class Unavailable(ClientError):
    """The coordinator or its ring cannot serve now (starting, re-planning, unreachable)."""


class DeadlineExceeded(ClientError):
    """The call's deadline passed before the generation finished."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest, grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest, grpc.StatusCode.UNIMPLEMENTED: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: AccessDenied, grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded, grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _client_error(error: grpc.RpcError) -> ClientError:
    retry = dict(error.trailing_metadata() or ()).get("retry-after-ms")
    kind = _ERRORS.get(error.code(), ClientError)
    return kind(error.code(), error.details() or "", int(retry) / 1000 if retry else None)


@dataclass(frozen=True)
class Credentials:
    """What a client trusts and presents: the deployment's CA and a client certificate and
    key, as PEM bytes."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # keep private keys out of logs and tracebacks

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            cert = x509.load_pem_x509_certificate(self.cert_pem)
            x509.load_pem_x509_certificates(self.ca_pem)
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as error:
            raise ValueError(f"not a PEM certificate, CA or unencrypted key: {error}") from None
        if key.public_key() != cert.public_key():
            raise ValueError("the key is not the certificate's")

    @classmethod
    def from_files(cls, *, ca: str | os.PathLike, cert: str | os.PathLike, key: str | os.PathLike) -> Credentials:
        return cls(Path(ca).read_bytes(), Path(cert).read_bytes(), Path(key).read_bytes())

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, node_id: str = "client") -> Credentials:
        """`shard certs`' names (ca.pem, <node_id>.pem, <node_id>.key), else a Kubernetes
        TLS Secret's (ca.crt, tls.crt, tls.key) as mounted."""
        directory = Path(folder)
        for names in ((CA_CERT, f"{node_id}.pem", f"{node_id}.key"), ("ca.crt", "tls.crt", "tls.key")):
            paths = [directory / name for name in names]
            if all(path.is_file() for path in paths):
                return cls(*(path.read_bytes() for path in paths))
        raise FileNotFoundError(errno.ENOENT, f"no client certificate: expected {CA_CERT}, {node_id}.pem and "
                                f"{node_id}.key (shard certs) or ca.crt, tls.crt and tls.key (a Kubernetes "
                                f"TLS Secret)", str(directory))


@dataclass(frozen=True)
class Delta:
    """Tokens the coordinator committed since the last delta and the text they add."""

    ids: list[int]
    text: str


def build_generate_request(prompt: str | None = None, *, chat: Sequence[tuple[str, str] | Mapping] | None = None,
                           prompt_ids: Sequence[int] | None = None, max_tokens: int = 64, **options
                           ) -> api_pb2.GenerateRequest:
    """A GenerateRequest from keyword arguments: exactly one of prompt, chat (role and
    content pairs, or {"role", "content"} mappings) and prompt_ids; `options` are the
    request's other fields (stop_at_eos, draft, spec_k, in_flight, temperature, top_p,
    top_k, min_p, seed, stop, logprobs, ...). None leaves a field unset."""
    request = api_pb2.GenerateRequest()
    if sum(form is not None for form in (prompt, chat, prompt_ids)) != 1:
        raise ValueError("give exactly one of prompt, chat and prompt_ids")
    if prompt is not None:
        request.prompt = prompt
    elif chat is not None:
        for message in chat:
            role, content = (message["role"], message["content"]) if isinstance(message, Mapping) else message
            request.chat.messages.add(role=role, content=content)
    else:
        request.prompt_ids.ids.extend(prompt_ids)
    for name, value in {"max_tokens": max_tokens, **options}.items():
        if value is None:
            continue
        try:
            if name == "stop":
                request.stop.extend([value] if isinstance(value, str) else value)
            else:
                setattr(request, name, value)
        except (AttributeError, ValueError, TypeError) as error:
            raise ValueError(f"{name}={value!r}: {error}") from None
    return request


class _Generated:
    """Collects a stream's events: the deltas so far, then the summary."""

    def __init__(self):
        self.generation = Generation()

    def take(self, response: api_pb2.GenerateResponse) -> Delta | None:
        if response.HasField("delta"):
            self.generation.streamed_ids.extend(response.delta.ids)
            return Delta(list(response.delta.ids), response.delta.text)
        self.generation.summary = response.summary
        return None


class _Streaming:
    """What Stream and AsyncStream share: the call, what it delivered, and cancelling it."""

    def __init__(self, call):
        self._call, self._generated = call, _Generated()

    @property
    def summary(self) -> api_pb2.GenerationSummary | None:
        return self._generated.generation.summary

    def close(self) -> None:
        self._call.cancel()


class Stream(_Streaming):
    """A generation's deltas as they are committed (iterate it); `summary` once it ended.
    Leaving it early (break, close(), or the `with` block) cancels the generation."""

    def __iter__(self) -> Iterator[Delta]:
        try:
            for response in self._call:
                delta = self._generated.take(response)
                if delta is not None:
                    yield delta
        except grpc.RpcError as error:
            raise _client_error(error) from None
        finally:
            self.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncStream(_Streaming):
    """Stream's asyncio twin: `async for delta in stream`."""

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            async for response in self._call:
                delta = self._generated.take(response)
                if delta is not None:
                    yield delta
        except grpc.RpcError as error:
            raise _client_error(error) from None
        finally:
            self.close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class Client:
    """A coordinator's public API, synchronously (generate, stream, status) and with
    asyncio (agenerate, astream, astatus). Over mTLS with `credentials` (a Credentials, or
    a folder for Credentials.from_folder); plaintext only with insecure=True. `timeout` is
    each call's deadline in seconds (None: none), overridable per call.

        with Client("coordinator:50051", credentials="certs/") as client:
            for delta in client.stream("Once upon a time", max_tokens=32):
                print(delta.text, end="")
    """

    def __init__(self, address: str, *, credentials: Credentials | str | os.PathLike | None = None,
                 node_id: str = "client", insecure: bool = False, timeout: float | None = None):
        if credentials is None and not insecure:
            raise ValueError("give credentials (a Credentials or a certificates folder), or insecure=True")
        if credentials is not None and not isinstance(credentials, Credentials):
            credentials = Credentials.from_folder(credentials, node_id)
        self.address, self.timeout = address, timeout
        self._credentials = None if insecure else credentials
        self._channel: grpc.Channel | None = None
        self._aio_channel: grpc.aio.Channel | None = None

    # ---- synchronous --------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **request) -> Generation:
        """Run a generation to its end: its summary (output ids, text, statistics) and the
        ids streamed on the way."""
        stream = self.stream(prompt, timeout=timeout, **request)
        for _ in stream:
            pass
        return stream._generated.generation

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **request) -> Stream:
        """The generation's deltas as they come (see Stream); `request` as for
        build_generate_request."""
        message = build_generate_request(prompt, **request)
        return Stream(self._stub().Generate(message, timeout=self._deadline(timeout)))

    def status(self, *, timeout: float | None = None) -> api_pb2.GetStatusResponse:
        try:
            return self._stub().GetStatus(api_pb2.GetStatusRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise _client_error(error) from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- asyncio ------------------------------------------------------------------

    async def agenerate(self, prompt: str | None = None, *, timeout: float | None = None, **request) -> Generation:
        stream = self.astream(prompt, timeout=timeout, **request)
        async for _ in stream:
            pass
        return stream._generated.generation

    def astream(self, prompt: str | None = None, *, timeout: float | None = None, **request) -> AsyncStream:
        message = build_generate_request(prompt, **request)
        return AsyncStream(self._aio_stub().Generate(message, timeout=self._deadline(timeout)))

    async def astatus(self, *, timeout: float | None = None) -> api_pb2.GetStatusResponse:
        try:
            return await self._aio_stub().GetStatus(api_pb2.GetStatusRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise _client_error(error) from None

    async def aclose(self) -> None:
        self.close()
        if self._aio_channel is not None:
            await self._aio_channel.close()
            self._aio_channel = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ---- channels -----------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _stub(self) -> api_pb2_grpc.InferenceServiceStub:
        if self._channel is None:
            options = list(CHANNEL_OPTIONS)
            self._channel = (grpc.insecure_channel(self.address, options=options) if self._credentials is None else
                             grpc.secure_channel(self.address, self._channel_credentials(), options=options))
        return api_pb2_grpc.InferenceServiceStub(self._channel)

    def _aio_stub(self) -> api_pb2_grpc.InferenceServiceStub:
        if self._aio_channel is None:
            options = list(CHANNEL_OPTIONS)
            self._aio_channel = (
                grpc.aio.insecure_channel(self.address, options=options) if self._credentials is None else
                grpc.aio.secure_channel(self.address, self._channel_credentials(), options=options))
        return api_pb2_grpc.InferenceServiceStub(self._aio_channel)

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        c = self._credentials
        return grpc.ssl_channel_credentials(c.ca_pem, c.key_pem, c.cert_pem)
