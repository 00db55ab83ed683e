"""Frames arriving at a node: check who sent them and open their sealed payloads.

One EdgeOpener per sender for the life of the process (not per RPC): a frame replayed on
a fresh stream must still be refused."""

from __future__ import annotations

import logging
from collections import Counter

from shard.v1 import frame_pb2
from shard.wire.seal import EdgeOpener, SealError

log = logging.getLogger(__name__)


class InboundError(ValueError):
    """A frame this node must not take; `reason` says why, for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Inbound:
    def __init__(self, node_id: str, secrets: list[bytes] | None):
        """`secrets` newest first; None means unsealed payloads (the explicit insecure mode)."""
        self.node_id, self._secrets = node_id, secrets
        self._openers: dict[str, EdgeOpener] = {}
        self.rejected: Counter[str] = Counter()

    def open(self, frame: frame_pb2.Frame, peer_id: str | None) -> bytes:
        """The plaintext payload of `frame`, sent by the authenticated `peer_id`."""
        header = frame.header
        try:
            if peer_id is not None and header.sender != peer_id:
                raise InboundError("wrong-edge", f"{peer_id} sent a frame claiming to come from {header.sender!r}")
            if header.receiver != self.node_id:
                raise InboundError("wrong-edge", f"frame for {header.receiver!r} reached {self.node_id}")
            if self._secrets is None:
                return frame.payload
            opener = self._openers.get(header.sender)
            if opener is None:
                opener = self._openers[header.sender] = EdgeOpener(self._secrets, header.sender, self.node_id)
            try:
                return opener.open(header, frame.payload)
            except SealError as error:
                raise InboundError(error.reason, str(error)) from None
        except InboundError as error:
            self.rejected[error.reason] += 1
            log.warning("rejected a frame on edge %s -> %s (%s): %s",
                        header.sender, self.node_id, error.reason, error)
            raise
