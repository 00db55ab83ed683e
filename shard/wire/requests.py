"""Malformed and oversized requests answered INVALID_ARGUMENT, on every node's server.

gRPC parses a request before any servicer code runs; a request that does not parse
(garbage bytes, a string field that is not UTF-8) makes its deserializer raise, which
gRPC answers UNKNOWN with an ERROR traceback in the log. This interceptor swaps each
handler's deserializer for one that turns such a request (or one over its method's byte
limit, checked before parsing) into a marker, and the handler's behaviour answers the
marker with INVALID_ARGUMENT and a message saying what was wrong."""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError

# Public requests are small: a GenerateRequest holds at most --max-prompt-chars (default
# 262144) characters of UTF-8 (4 bytes each at most, 1 MiB) or fewer token ids than the
# context (5 bytes each at most). The server's own receive limit (SERVER_OPTIONS) stays
# at 256 MiB for node-to-node activation frames, so a client's 64 MiB "prompt" is refused
# here, by its length, before it is parsed, tokenized or queued.
MAX_REQUEST_BYTES: dict[str, int] = {
    "/shard.v1.InferenceService/Generate": 4 * 1024 * 1024,
    "/shard.v1.InferenceService/GetStatus": 64 * 1024,
}


class _Malformed:
    """Stands in for a request that could not be taken; says why."""

    def __init__(self, reason: str):
        self.reason = reason


class RequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        handler = handler._replace(request_deserializer=_tolerant(
            handler.request_deserializer, method, MAX_REQUEST_BYTES.get(method)))
        if handler.unary_unary:
            return handler._replace(unary_unary=_guard_unary(handler.unary_unary, _one))
        if handler.stream_unary:
            return handler._replace(stream_unary=_guard_unary(handler.stream_unary, _each))
        if handler.unary_stream:
            return handler._replace(unary_stream=_guard_stream(handler.unary_stream, _one))
        return handler._replace(stream_stream=_guard_stream(handler.stream_stream, _each))


def _tolerant(deserializer, method: str, max_bytes: int | None):
    def deserialize(data: bytes):
        if max_bytes is not None and len(data) > max_bytes:
            return _Malformed(f"the request has {len(data)} bytes; {method} takes at most {max_bytes}")
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Malformed(f"the request to {method} does not parse ({error}): not the method's "
                              "protobuf message, or a string field that is not valid UTF-8")

    return deserialize


async def _one(request, context: grpc.aio.ServicerContext):
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
    return request


async def _each(requests, context: grpc.aio.ServicerContext):
    return _checked(requests, context)


async def _checked(requests, context: grpc.aio.ServicerContext):
    async for request in requests:
        yield await _one(request, context)


def _guard_unary(behaviour, check):
    async def guarded(request, context):
        return await behaviour(await check(request, context), context)

    return guarded


def _guard_stream(behaviour, check):
    async def guarded(request, context):
        responses = behaviour(await check(request, context), context)
        if inspect.isasyncgen(responses):
            async for response in responses:
                yield response
        else:  # a handler that writes through context.write()
            await responses

    return guarded
