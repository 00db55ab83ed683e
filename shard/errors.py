"""The one error type of Shard's nodes: what went wrong, for the user, and the gRPC status
it is answered with. Servicers abort with it; library code raises it."""

from __future__ import annotations

import grpc


class ShardError(Exception):
    """`retry_after_ms`, when set, tells the caller how long to wait before trying again;
    servicers send it as the "retry-after-ms" trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after_ms: int | None = None):
        super().__init__(message)
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_ms is None:
            return ()
        return (("retry-after-ms", str(self.retry_after_ms)),)
