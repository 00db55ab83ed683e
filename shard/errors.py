"""The one error type of Shard's nodes: what went wrong, for the user, and the gRPC status
it is answered with. Servicers abort with it; library code raises it."""

from __future__ import annotations

import grpc


class ShardError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message
