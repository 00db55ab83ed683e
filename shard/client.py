"""A Python client of the coordinator's public Generate API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from shard.v1 import api_pb2, api_pb2_grpc
from shard.wire.tls import NodeTLS, open_channel


@dataclass
class Generation:
    summary: api_pb2.GenerationSummary | None = None
    streamed_ids: list[int] = field(default_factory=list)


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
