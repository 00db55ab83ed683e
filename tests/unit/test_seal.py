"""The AEAD payload layer: round trips, every rejection reason, rotation, secret files."""

from __future__ import annotations

import os
import stat

import pytest

from shard.v1 import frame_pb2
from shard.wire import seal
from shard.wire.seal import EdgeOpener, EdgeSealer, SealError

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))


def header(counter: int, sender: str = "A", receiver: str = "B", **fields) -> frame_pb2.FrameHeader:
    base = dict(
        session_id="sess-1",
        chunk_id=7,
        epoch=2,
        start_pos=128,
        num_tokens=9,
        num_outputs=1,
        kind=frame_pb2.FRAME_KIND_FORWARD,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="vendor=1",
    )
    base.update(fields)
    return frame_pb2.FrameHeader(sender=sender, receiver=receiver, counter=counter, **base)


def copy(h: frame_pb2.FrameHeader) -> frame_pb2.FrameHeader:
    out = frame_pb2.FrameHeader()
    out.CopyFrom(h)
    return out


def rejects(opener: EdgeOpener, h, sealed, reason: str) -> None:
    before = opener.last_counter
    with pytest.raises(SealError) as info:
        opener.open(h, sealed)
    assert info.value.reason == reason, info.value
    assert isinstance(info.value, ValueError)
    assert opener.last_counter == before


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 9 * 8192 * 2])
def test_round_trip(size):
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    payload = os.urandom(size)
    for counter in (1, 2, 3):
        h = header(counter)
        sealed = sealer.seal(h, payload)
        assert len(sealed) == size + seal.OVERHEAD_BYTES
        assert len(payload) < 16 or payload not in sealed  # it is encrypted, not just signed
        assert opener.open(h, sealed) == payload
    assert opener.opened == 3 and opener.last_counter == 3 and not opener.rejected


def test_round_trip_through_protobuf_frame():
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    h = header(1)
    frame = frame_pb2.Frame(header=h, payload=sealer.seal(h, b"activations"))
    received = frame_pb2.Frame.FromString(frame.SerializeToString())
    assert opener.open(received.header, received.payload) == b"activations"


def test_counters_may_skip_but_never_repeat():
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    for counter in (1, 5, 6, 1000, 2**64 - 1):
        assert opener.open(header(counter), sealer.seal(header(counter), b"x")) == b"x"


def test_same_plaintext_and_counter_differ_across_sealers():
    """A restarted sender (new sealer) starts at counter 1 again but never reuses a nonce."""
    first, second = EdgeSealer(SECRET, "A", "B"), EdgeSealer(SECRET, "A", "B")
    a, b = first.seal(header(1), bytes(64)), second.seal(header(1), bytes(64))
    assert a[: seal.KEY_ID_BYTES] == b[: seal.KEY_ID_BYTES]
    assert a[seal.PREFIX_BYTES :] != b[seal.PREFIX_BYTES :]


# --- the sealer's own checks -------------------------------------------------------------


def test_sealer_refuses_wrong_edge_and_non_increasing_counters():
    sealer = EdgeSealer(SECRET, "A", "B")
    with pytest.raises(ValueError, match="edge"):
        sealer.seal(header(1, "A", "C"), b"x")
    with pytest.raises(ValueError, match="edge"):
        sealer.seal(header(1, "B", "A"), b"x")
    with pytest.raises(ValueError, match="counter 0"):
        sealer.seal(header(0), b"x")
    sealer.seal(header(5), b"x")
    for counter in (5, 4, 1):
        with pytest.raises(ValueError, match="not above"):
            sealer.seal(header(counter), b"x")
    sealer.seal(header(6), b"x")
    assert sealer.last_counter == 6


def test_short_secrets_are_refused():
    with pytest.raises(ValueError, match="at least 32"):
        EdgeSealer(b"x" * 31, "A", "B")
    with pytest.raises(ValueError, match="at least 32"):
        EdgeOpener([SECRET, b"short"], "A", "B")
    with pytest.raises(ValueError, match="at least one"):
        EdgeOpener([], "A", "B")
    with pytest.raises(TypeError):
        EdgeOpener(SECRET, "A", "B")  # a bare secret, not a list


# --- forged ------------------------------------------------------------------------------

FIELD_TAMPERS = {
    "session_id": "sess-2",
    "chunk_id": 8,
    "epoch": 3,
    "start_pos": 129,
    "num_tokens": 8,
    "num_outputs": 0,
    "kind": frame_pb2.FRAME_KIND_END,
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "tracestate": "",
    "counter": 2,  # above the last accepted: not a replay, so it must fail authentication
}


@pytest.mark.parametrize("field", sorted(FIELD_TAMPERS))
def test_tampered_header_field_is_forged(field):
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    h = header(1)
    sealed = sealer.seal(h, b"payload")
    tampered = copy(h)
    setattr(tampered, field, FIELD_TAMPERS[field])
    rejects(opener, tampered, sealed, "forged")
    assert opener.open(h, sealed) == b"payload"  # the forgery burned nothing


@pytest.mark.parametrize("field", ["chunk_id", "epoch", "start_pos", "num_tokens", "num_outputs", "counter"])
@pytest.mark.parametrize("bit", [0, 7, 31])
def test_bit_flip_in_integer_header_field_is_forged(field, bit):
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    h = header(1)
    sealed = sealer.seal(h, b"payload")
    tampered = copy(h)
    setattr(tampered, field, getattr(h, field) ^ (1 << bit))
    if field == "counter" and tampered.counter == 0:
        rejects(opener, tampered, sealed, "replay")  # counter 0 never opens
    else:
        rejects(opener, tampered, sealed, "forged")


def test_string_fields_are_unambiguous():
    """Moving a character from one string field to its neighbour changes the AD."""
    a = header(1, session_id="ab", traceparent="", tracestate="c")
    b = header(1, session_id="a", traceparent="b", tracestate="c")
    c = header(1, session_id="ab", traceparent="c", tracestate="")
    assert len({seal.header_ad(a), seal.header_ad(b), seal.header_ad(c)}) == 3
    assert seal.edge_info("a", "b -> c") != seal.edge_info("a -> b", "c")
    assert seal.edge_info("A", "B") != seal.edge_info("B", "A")


def test_associated_data_covers_every_header_field():
    """A field added to FrameHeader must be added to header_ad (else it is unauthenticated)."""
    declared = {field.name for field in frame_pb2.FrameHeader.DESCRIPTOR.fields}
    assert set(seal.AD_FIELDS) == declared
    base = header(1)
    for field in declared:
        h = copy(base)
        value = getattr(h, field)
        setattr(h, field, value + "x" if isinstance(value, str) else value + b"x" if isinstance(value, bytes)
                else value + 1)
        assert seal.header_ad(h) != seal.header_ad(base), field


def test_every_bit_flip_in_payload_is_forged():
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    h1, h2 = header(1), header(2)
    opener.open(h1, sealer.seal(h1, b"first"))
    sealed = sealer.seal(h2, b"sixteen byte msg")
    for index in range(len(sealed)):  # key id, stream id, ciphertext and tag
        for bit in range(8):
            mutated = bytearray(sealed)
            mutated[index] ^= 1 << bit
            rejects(opener, h2, bytes(mutated), "forged")
    assert opener.rejected == {"forged": len(sealed) * 8}
    assert opener.open(h2, sealed) == b"sixteen byte msg"


def test_truncation():
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    h = header(1)
    sealed = sealer.seal(h, b"x" * 40)
    for length in range(len(sealed)):
        reason = "truncated" if length < seal.OVERHEAD_BYTES else "forged"
        rejects(opener, h, sealed[:length], reason)
    rejects(opener, h, sealed + b"\x00", "forged")  # extended
    assert opener.rejected["truncated"] == seal.OVERHEAD_BYTES
    assert opener.open(h, sealed) == b"x" * 40


def test_wrong_secret_is_forged():
    opener = EdgeOpener([SECRET], "A", "B")
    h = header(1)
    rejects(opener, h, EdgeSealer(OTHER, "A", "B").seal(h, b"x"), "forged")


def test_forged_frames_do_not_burn_counters():
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    sealed = {c: sealer.seal(header(c), b"%d" % c) for c in (1, 2, 3)}
    assert opener.open(header(1), sealed[1]) == b"1"
    # A forger claims a far-ahead counter, on the sender's stream and on a made-up stream.
    high = header(1000)
    rejects(opener, high, sealed[2], "forged")
    made_up = sealed[2][: seal.KEY_ID_BYTES] + os.urandom(seal.STREAM_ID_BYTES) + sealed[2][seal.PREFIX_BYTES :]
    rejects(opener, header(2), made_up, "forged")
    assert opener.last_counter == 1
    assert opener.open(header(2), sealed[2]) == b"2"
    assert opener.open(header(3), sealed[3]) == b"3"


# --- replay and re-order -----------------------------------------------------------------


def test_replay_is_rejected():
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    h = header(1)
    sealed = sealer.seal(h, b"x")
    assert opener.open(h, sealed) == b"x"
    rejects(opener, h, sealed, "replay")
    rejects(opener, h, sealed, "replay")
    assert opener.rejected == {"replay": 2}


def test_reorder_is_rejected():
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    first, second = sealer.seal(header(1), b"1"), sealer.seal(header(2), b"2")
    assert opener.open(header(2), second) == b"2"
    rejects(opener, header(1), first, "replay")


def test_counter_zero_never_opens():
    opener = EdgeOpener([SECRET], "A", "B")
    sealed = EdgeSealer(SECRET, "A", "B").seal(header(1), b"x")
    rejects(opener, header(0), sealed, "replay")


def test_sender_restart_new_stream_accepted_old_stream_then_replay():
    opener = EdgeOpener([SECRET], "A", "B")
    old = EdgeSealer(SECRET, "A", "B")
    stale = {c: old.seal(header(c), b"old") for c in (1, 2, 3)}
    assert opener.open(header(1), stale[1]) == b"old"
    new = EdgeSealer(SECRET, "A", "B")  # the process restarted: counters start over
    assert opener.open(header(1), new.seal(header(1), b"new")) == b"new"
    rejects(opener, header(2), stale[2], "replay")  # the old stream is retired
    assert opener.open(header(2), new.seal(header(2), b"new")) == b"new"


# --- splices -----------------------------------------------------------------------------


def test_splice_between_edges_is_rejected():
    """A frame sealed for A->B, delivered to C (edge A->C)."""
    sealed = EdgeSealer(SECRET, "A", "B").seal(header(1, "A", "B"), b"x")
    opener_c = EdgeOpener([SECRET], "A", "C")
    rejects(opener_c, header(1, "A", "B"), sealed, "wrong-edge")
    rejects(opener_c, header(1, "A", "C"), sealed, "forged")  # header rewritten to match


def test_swapped_direction_is_rejected():
    """A frame sealed A->B, reflected back to A as if B had sent it."""
    sealed = EdgeSealer(SECRET, "A", "B").seal(header(1, "A", "B"), b"x")
    opener_ba = EdgeOpener([SECRET], "B", "A")
    rejects(opener_ba, header(1, "A", "B"), sealed, "wrong-edge")
    rejects(opener_ba, header(1, "B", "A"), sealed, "forged")


def test_rejections_are_counted_per_reason():
    sealer, opener = EdgeSealer(SECRET, "A", "B"), EdgeOpener([SECRET], "A", "B")
    h = header(1)
    sealed = sealer.seal(h, b"x")
    for bad_header, bad_sealed in [
        (header(1, "A", "C"), sealed),
        (h, sealed[:3]),
        (h, sealed[:-1] + bytes([sealed[-1] ^ 1])),
    ]:
        with pytest.raises(SealError):
            opener.open(bad_header, bad_sealed)
    opener.open(h, sealed)
    with pytest.raises(SealError):
        opener.open(h, sealed)
    assert opener.rejected == {"wrong-edge": 1, "truncated": 1, "forged": 1, "replay": 1}
    assert set(opener.rejected) <= set(seal.REASONS)


# --- rotation ----------------------------------------------------------------------------


def test_rotation():
    old_secret, new_secret = SECRET, OTHER
    during = EdgeOpener([new_secret, old_secret], "A", "B")
    old_sender = EdgeSealer(old_secret, "A", "B")
    assert during.open(header(1), old_sender.seal(header(1), b"old")) == b"old"
    new_sender = EdgeSealer(new_secret, "A", "B")  # the sender rotated (a new sealer)
    assert during.open(header(1), new_sender.seal(header(1), b"new")) == b"new"
    assert during.open(header(2), new_sender.seal(header(2), b"new")) == b"new"
    # Once the old secret is removed, frames sealed with it are rejected.
    after = EdgeOpener([new_secret], "A", "B")
    rejects(after, header(3), old_sender.seal(header(3), b"old"), "forged")
    assert after.open(header(3), new_sender.seal(header(3), b"new")) == b"new"


def test_key_ids_name_secrets():
    assert seal.key_id(SECRET) != seal.key_id(OTHER)
    sealed = EdgeSealer(SECRET, "A", "B").seal(header(1), b"x")
    assert sealed[: seal.KEY_ID_BYTES] == seal.key_id(SECRET)


def test_colliding_key_ids_are_all_tried(monkeypatch):
    monkeypatch.setattr(seal, "key_id", lambda secret: b"\x00\x00\x00\x00")
    opener = EdgeOpener([OTHER, SECRET], "A", "B")
    assert opener.open(header(1), EdgeSealer(SECRET, "A", "B").seal(header(1), b"s")) == b"s"
    third = bytes(range(2, 34))
    rejects(opener, header(2), EdgeSealer(third, "A", "B").seal(header(2), b"t"), "forged")


# --- secret files ------------------------------------------------------------------------


def test_write_secret_mode_and_round_trip(tmp_path):
    path = tmp_path / "edge.secret"
    secret = seal.write_secret(path)
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert seal.load_secret(path) == secret
    assert path.read_text() == secret.hex() + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["edge.secret"]  # no temp file left


def test_write_secret_refuses_to_overwrite(tmp_path):
    path = tmp_path / "edge.secret"
    first = seal.write_secret(path)
    with pytest.raises(FileExistsError):
        seal.write_secret(path)
    assert seal.load_secret(path) == first
    second = seal.write_secret(path, overwrite=True)
    assert second != first and seal.load_secret(path) == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["edge.secret"]


def test_write_secret_mode_ignores_umask(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "s"
        seal.write_secret(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_secret_forms(tmp_path):
    raw = bytes(range(200, 232)) + b"\x00\n "
    (tmp_path / "raw").write_bytes(raw)
    assert seal.load_secret(tmp_path / "raw") == raw  # raw bytes are taken as they are
    (tmp_path / "hex").write_text("  " + SECRET.hex().upper() + "\n\n")
    assert seal.load_secret(tmp_path / "hex") == SECRET
    (tmp_path / "long").write_text(os.urandom(48).hex())
    assert len(seal.load_secret(tmp_path / "long")) == 48
    wrapped = SECRET.hex()
    (tmp_path / "xxd").write_text(wrapped[:60] + "\n" + wrapped[60:] + "\n")  # `xxd -p` wraps lines
    assert seal.load_secret(tmp_path / "xxd") == SECRET


def test_load_secret_warns_about_loose_modes(tmp_path, caplog):
    path = tmp_path / "s"
    secret = seal.write_secret(path)
    with caplog.at_level("WARNING", logger="shard.wire.seal"):
        seal.load_secret(path)
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="shard.wire.seal"):
        seal.load_secret(path)
    assert "0644" in caplog.text and str(path) in caplog.text
    assert secret.hex() not in caplog.text


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "0 bytes"),
        (b"x" * 31, "31 bytes"),
        (bytes(16).hex().encode() + b"\n", "16 bytes"),  # 32 hex digits are 16 bytes
        (b"abc", "odd number"),
        (SECRET.hex().encode()[:-1], "odd number"),
    ],
)
def test_load_secret_refuses_bad_files(tmp_path, content, match):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        seal.load_secret(path)
