"""Running a check inside every call of a gRPC method, whatever the method's shape: what
Shard's server interceptors share. An aio interceptor sees neither the call's context
(the peer's certificate) nor its request, so it wraps the handler's behaviour instead."""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

import grpc

# (request or request iterator, context) -> what the behaviour gets in its place
Prepare = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def checked(handler: grpc.RpcMethodHandler, prepare_request: Prepare,
            prepare_stream: Prepare) -> grpc.RpcMethodHandler:
    """`handler` whose calls first pass their request (unary) or request iterator
    (streaming) through `prepare_*`, which may abort the call."""
    if handler.unary_unary:
        return handler._replace(unary_unary=_unary_reply(handler.unary_unary, prepare_request))
    if handler.stream_unary:
        return handler._replace(stream_unary=_unary_reply(handler.stream_unary, prepare_stream))
    if handler.unary_stream:
        return handler._replace(unary_stream=_streamed_reply(handler.unary_stream, prepare_request))
    return handler._replace(stream_stream=_streamed_reply(handler.stream_stream, prepare_stream))


def _unary_reply(behaviour, prepare: Prepare):
    async def guarded(request, context):
        return await behaviour(await prepare(request, context), context)

    return guarded


def _streamed_reply(behaviour, prepare: Prepare):
    async def guarded(request, context):
        responses = behaviour(await prepare(request, context), context)
        if inspect.isasyncgen(responses):
            async for response in responses:
                yield response
        else:  # a handler that writes through context.write()
            await responses

    return guarded
