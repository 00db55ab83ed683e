"""AEAD payload layer: each frame's payload is sealed for one direction of one edge.

ChaCha20-Poly1305 and HKDF-SHA256 from ``cryptography``; nothing here is hand-rolled.

Wire format of a sealed payload (``Frame.payload``)::

    key_id (4) || stream_id (12) || ciphertext || tag (16)

* ``key_id`` names the deployment secret the frame was sealed with, so that a receiver
  holding ``[new, old]`` during a rotation picks the right one without trial decryption.
  It is a 4-byte HKDF-SHA256 output (info "shard/v1 key id"): it names a secret and reveals
  nothing about it. Two secrets with the same id (chance 2**-32) are both tried. The key id
  travels in the clear and is also in the associated data.
* ``stream_id`` is drawn at random by each :class:`EdgeSealer` (one per sender
  incarnation). The edge key is ``HKDF-SHA256(ikm=secret, salt=stream_id, info=edge)`` with
  ``edge = "shard/v1 edge " || len(sender) || sender || " -> " || len(receiver) || receiver``
  (lengths as 4-byte big-endian), so the key is per secret, per direction of an edge and per
  sender incarnation. A node that restarts starts its frame counter at 1 again; without a
  fresh stream id it would reuse (key, nonce) pairs, which breaks ChaCha20-Poly1305
  (keystream and Poly1305 key reuse). The stream id costs 12 bytes per frame and one HKDF
  per sender incarnation, never one per frame.
* The nonce is ``4 zero bytes || header.counter`` (8 bytes big-endian): unique per key
  because the sealer refuses a counter that is not strictly greater than the last one.
* The associated data is ``key_id || stream_id || header_ad(header)``, where
  :func:`header_ad` encodes every ``FrameHeader`` field explicitly in a fixed,
  length-prefixed layout (protobuf serialization is not canonical).

The receiving side (:class:`EdgeOpener`) rejects, with a machine-readable reason:

* ``wrong-edge``: the header names another edge (a splice, or the other direction);
* ``truncated``: shorter than the prefix and the 16-byte tag;
* ``replay``: the counter is not above the last one accepted on the sender's stream
  (a replay or a re-order), or the stream is one the sender has since replaced;
* ``forged``: authentication failed (any flipped bit in header or payload, a wrong or
  retired secret, a cut payload).

Only a frame that opens advances the replay window, so forgeries cannot burn counters.
When an authentic frame arrives on a new stream id (the sender restarted, or rotated its
secret) the opener adopts that stream and remembers the old one as retired: frames of a
retired stream are replays. An opener keeps this state in memory only; a receiver that
restarts forgets it (the session layer's ids and epochs fence what is stale). Keep one
opener per upstream edge for the life of the process, across that edge's reconnects: an
opener per RPC would accept a frame replayed on a new stream.

Rotation: give every opener ``[new, old]``, then restart senders (or build new sealers)
with ``new``, then drop ``old``; a frame sealed with a secret an opener no longer holds is
``forged``.

Sealers and openers are not thread-safe; use each from one task or thread.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import secrets as _secrets
import stat
import struct
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shard.v1 import frame_pb2

log = logging.getLogger(__name__)

SECRET_MIN_BYTES = 32
SECRET_BYTES = 32
KEY_ID_BYTES = 4
STREAM_ID_BYTES = 12
PREFIX_BYTES = KEY_ID_BYTES + STREAM_ID_BYTES
TAG_BYTES = 16
OVERHEAD_BYTES = PREFIX_BYTES + TAG_BYTES
RETIRED_STREAMS_KEPT = 1024

REASONS = ("wrong-edge", "replay", "forged", "truncated")

_HEX = re.compile(rb"[0-9a-fA-F]+")
_NONCE_PAD = bytes(4)
_AD_MAGIC = b"shard/v1 frame\x00"


class SealError(ValueError):
    """A frame that did not open; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# ---------------------------------------------------------------------------------------
# The deployment secret


def load_secret(path: str | os.PathLike) -> bytes:
    """Read a deployment secret of at least 32 bytes from a file: hex text (any whitespace,
    line breaks included, is ignored: ``openssl rand -hex 32``, ``xxd -p``) or raw bytes
    (taken exactly as they are). Warns when the file is readable by group or others."""
    path = Path(path)
    data = path.read_bytes()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("secret file %s has mode %04o; it should be readable by its owner only", path, mode)
    text = b"".join(data.split())
    if _HEX.fullmatch(text):
        if len(text) % 2:
            raise ValueError(f"secret file {path}: odd number of hex digits ({len(text)})")
        secret = bytes.fromhex(text.decode("ascii"))
    else:
        secret = data
    if len(secret) < SECRET_MIN_BYTES:
        raise ValueError(
            f"secret file {path} holds {len(secret)} bytes; a deployment secret needs at least "
            f"{SECRET_MIN_BYTES} (raw bytes or hex text; make one with write_secret)"
        )
    return secret


def write_secret(path: str | os.PathLike, *, overwrite: bool = False) -> bytes:
    """Create a new random 32-byte secret at ``path`` as hex text, mode 0600, atomically.

    Refuses to replace an existing file unless ``overwrite``. Returns the secret."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"secret file {path} exists; pass overwrite=True to replace it")
    secret = _secrets.token_bytes(SECRET_BYTES)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret.hex().encode("ascii") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and never clobbers a file that appeared meanwhile
            except FileExistsError:
                raise FileExistsError(
                    f"secret file {path} exists; pass overwrite=True to replace it"
                ) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return secret


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Keys and associated data


def _hkdf(secret: bytes, *, info: bytes, salt: bytes | None, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def key_id(secret: bytes) -> bytes:
    """Public 4-byte name of a secret (reveals nothing about it)."""
    return _hkdf(secret, info=b"shard/v1 key id", salt=None, length=KEY_ID_BYTES)


def edge_info(sender: str, receiver: str) -> bytes:
    """HKDF info for one direction of an edge; length-prefixed so ids cannot collide."""
    s, r = sender.encode("utf-8"), receiver.encode("utf-8")
    return b"shard/v1 edge " + struct.pack(">I", len(s)) + s + b" -> " + struct.pack(">I", len(r)) + r


def edge_key(secret: bytes, sender: str, receiver: str, stream_id: bytes) -> bytes:
    return _hkdf(secret, info=edge_info(sender, receiver), salt=stream_id, length=32)


# Every FrameHeader field, in the order the associated data encodes them. A test checks that
# this covers the message's descriptor: a field added to the proto must be added here.
AD_FIELDS = (
    "session_id", "chunk_id", "epoch", "start_pos", "num_tokens", "num_outputs", "kind",
    "sender", "receiver", "traceparent", "tracestate", "counter", "replay_first_stage", "replay_last_stage",
    "sampling", "receipt", "session_positions",
)

_INTS = struct.Struct(">QQQQQq")  # chunk_id, epoch, start_pos, num_tokens, num_outputs, kind
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_REPLAY = struct.Struct(">II")  # replay_first_stage, replay_last_stage


def _lp(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return _U32.pack(len(raw)) + raw


def header_ad(header: frame_pb2.FrameHeader) -> bytes:
    """Canonical encoding of every header field: fixed order, fixed widths, strings and
    bytes length-prefixed (4-byte big-endian length; strings UTF-8). Independent of
    protobuf's encoder."""
    h = header
    return b"".join((
        _AD_MAGIC,
        _lp(h.session_id),
        _INTS.pack(h.chunk_id, h.epoch, h.start_pos, h.num_tokens, h.num_outputs, int(h.kind)),
        _lp(h.sender),
        _lp(h.receiver),
        _lp(h.traceparent),
        _lp(h.tracestate),
        _U64.pack(h.counter),
        _REPLAY.pack(h.replay_first_stage, h.replay_last_stage),
        _U32.pack(len(h.sampling)) + h.sampling,
        bytes([h.receipt]),
        _U32.pack(h.session_positions),
    ))


def _nonce(counter: int) -> bytes:
    return _NONCE_PAD + _U64.pack(counter)


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"a secret is bytes, not {type(secret).__name__}")
    if len(secret) < SECRET_MIN_BYTES:
        raise ValueError(f"a secret needs at least {SECRET_MIN_BYTES} bytes, got {len(secret)}")
    return bytes(secret)


# ---------------------------------------------------------------------------------------
# Sealing and opening


class EdgeSealer:
    """Seals payloads for frames ``sender -> receiver`` with the newest secret.

    One sealer per outbound edge and per process: it draws a fresh stream id, so its
    counters may start at 1 again without reusing a nonce."""

    def __init__(self, secret: bytes, sender: str, receiver: str):
        secret = _check_secret(secret)
        self.sender, self.receiver = sender, receiver
        self.stream_id = _secrets.token_bytes(STREAM_ID_BYTES)
        self.key_id = key_id(secret)
        self._prefix = self.key_id + self.stream_id
        self._aead = ChaCha20Poly1305(edge_key(secret, sender, receiver, self.stream_id))
        self.last_counter = 0

    def seal(self, header: frame_pb2.FrameHeader, plaintext: bytes) -> bytes:
        if header.sender != self.sender or header.receiver != self.receiver:
            raise ValueError(
                f"header names edge {header.sender!r} -> {header.receiver!r}; "
                f"this sealer is for {self.sender!r} -> {self.receiver!r}"
            )
        counter = header.counter
        if counter <= self.last_counter:
            raise ValueError(
                f"counter {counter} is not above the last one sealed ({self.last_counter}); "
                "a nonce is never reused"
            )
        prefix = self._prefix
        sealed = self._aead.encrypt(_nonce(counter), plaintext, prefix + header_ad(header))
        self.last_counter = counter
        return prefix + sealed


class EdgeOpener:
    """Opens payloads of frames ``sender -> receiver``; ``secrets`` newest first.

    ``rejected`` counts rejections per reason; ``opened`` counts frames that opened."""

    def __init__(self, secrets: list[bytes], sender: str, receiver: str):
        if isinstance(secrets, (bytes, bytearray)):
            raise TypeError("pass a list of secrets, newest first")
        checked = [_check_secret(s) for s in secrets]
        if not checked:
            raise ValueError("an opener needs at least one secret")
        self.sender, self.receiver = sender, receiver
        self._secrets: dict[bytes, list[bytes]] = {}
        for secret in checked:
            self._secrets.setdefault(key_id(secret), []).append(secret)
        self.rejected: collections.Counter[str] = collections.Counter()
        self.opened = 0
        # The sender's current stream: (key_id, stream_id), its cipher, last accepted counter.
        self._stream: bytes | None = None
        self._aead: ChaCha20Poly1305 | None = None
        self.last_counter = 0
        self._retired: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def _reject(self, reason: str, message: str) -> SealError:
        self.rejected[reason] += 1
        return SealError(reason, f"{self.sender} -> {self.receiver}: {message}")

    def open(self, header: frame_pb2.FrameHeader, sealed: bytes) -> bytes:
        if header.sender != self.sender or header.receiver != self.receiver:
            raise self._reject(
                "wrong-edge", f"header names edge {header.sender!r} -> {header.receiver!r}"
            )
        if len(sealed) < OVERHEAD_BYTES:
            raise self._reject("truncated", f"{len(sealed)} bytes is shorter than {OVERHEAD_BYTES}")
        view = memoryview(sealed)
        stream = bytes(view[:PREFIX_BYTES])
        counter = header.counter
        if stream == self._stream:
            if counter <= self.last_counter:
                raise self._reject(
                    "replay", f"counter {counter} is not above the last accepted {self.last_counter}"
                )
            candidates = (self._aead,)
        else:
            if stream in self._retired:
                raise self._reject("replay", "frame of a stream the sender has since replaced")
            if counter == 0:
                raise self._reject("replay", "counter 0 is never sealed")
            secrets = self._secrets.get(stream[:KEY_ID_BYTES])
            if secrets is None:
                raise self._reject("forged", "sealed with a secret this node does not hold")
            stream_id = stream[KEY_ID_BYTES:]
            candidates = tuple(
                ChaCha20Poly1305(edge_key(s, self.sender, self.receiver, stream_id)) for s in secrets
            )
        nonce, ad = _nonce(counter), stream + header_ad(header)
        body = view[PREFIX_BYTES:]
        for aead in candidates:
            try:
                plaintext = aead.decrypt(nonce, body, ad)
            except InvalidTag:
                continue
            break
        else:
            raise self._reject("forged", f"frame {counter} failed authentication")
        if stream != self._stream:
            if self._stream is not None:
                self._retired[self._stream] = None
                while len(self._retired) > RETIRED_STREAMS_KEPT:
                    self._retired.popitem(last=False)
            self._stream, self._aead = stream, aead
        self.last_counter = counter
        self.opened += 1
        return plaintext
