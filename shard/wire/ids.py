"""How a receipt hashes a sequence of token ids: sha256 over each id as 4 bytes big-endian."""

from __future__ import annotations

import hashlib
import struct


def ids_sha256(ids) -> str:
    return hashlib.sha256(struct.pack(f">{len(ids)}I", *ids)).hexdigest()
