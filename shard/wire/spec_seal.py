"""The sampling spec sealed end to end, coordinator -> tail.

A sampled chunk's SamplingSpec (settings, the seed, the drafted tokens and their q) rides
in the frame header, which every stage passes on and which edge sealing only
authenticates: sealed here, a relay or TLS-terminating proxy on the path reads nothing of
it. The key is per message: HKDF-SHA256 of the deployment secret with a random 12-byte
salt and info naming the coordinator, so the nonce may be constant; the tail (whichever
stage it is after a re-plan) opens it with the same secret. The associated data binds it
to the chunk (session, chunk id, epoch, positions), so it cannot be moved to another.

Format: key_id (4) || salt (12) || ciphertext || tag (16)."""

from __future__ import annotations

import secrets as _secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from shard.v1 import frame_pb2
from shard.wire.seal import KEY_ID_BYTES, TAG_BYTES, SealError, _hkdf, _lp, key_id

SALT_BYTES = 12
_NONCE = bytes(12)  # the key is new for every message
_CHUNK = struct.Struct(">QQQQQ")  # chunk_id, epoch, start_pos, num_tokens, num_outputs


def seal_spec(secret: bytes, coordinator: str, header: frame_pb2.FrameHeader, plaintext: bytes) -> bytes:
    salt = _secrets.token_bytes(SALT_BYTES)
    prefix = key_id(secret) + salt
    return prefix + ChaCha20Poly1305(_key(secret, coordinator, salt)).encrypt(_NONCE, plaintext, prefix + _ad(header))


def open_spec(secrets: list[bytes], coordinator: str, header: frame_pb2.FrameHeader, sealed: bytes) -> bytes:
    """The spec's plaintext; SealError ("truncated" or "forged") for anything else."""
    if len(sealed) < KEY_ID_BYTES + SALT_BYTES + TAG_BYTES:
        raise SealError("truncated", f"a sealed sampling spec of {len(sealed)} bytes")
    prefix, salt = sealed[:KEY_ID_BYTES + SALT_BYTES], sealed[KEY_ID_BYTES:KEY_ID_BYTES + SALT_BYTES]
    for secret in (s for s in secrets if key_id(s) == sealed[:KEY_ID_BYTES]):
        try:
            return ChaCha20Poly1305(_key(secret, coordinator, salt)).decrypt(
                _NONCE, sealed[len(prefix):], prefix + _ad(header))
        except InvalidTag:
            continue
    raise SealError("forged", f"the sampling spec did not open as sealed by {coordinator!r} for this chunk")


def _key(secret: bytes, coordinator: str, salt: bytes) -> bytes:
    return _hkdf(secret, info=b"shard/v1 sampling spec " + _lp(coordinator), salt=salt, length=32)


def _ad(header: frame_pb2.FrameHeader) -> bytes:
    h = header
    return _lp(h.session_id) + _CHUNK.pack(h.chunk_id, h.epoch, h.start_pos, h.num_tokens, h.num_outputs)
