"""Fuzzing what a node parses from the network: Frame.FromString, EdgeOpener.open and
decode_tensor, on random bytes and on valid encodings mutated by flipping, cutting,
inserting and deleting bytes. Only clean errors (protobuf DecodeError, SealError,
CodecError) or a valid result are allowed; a successful open must return exactly what was
sealed. About 11,000 random, mutated and structure-aware inputs in all (~20 s on 2 cores);
a hang fails through the per-test timeout. test_zero_element_shapes_with_huge_dims guards
the one codec bug the fuzzing found (stride overflow on empty shapes with huge dims)."""

from __future__ import annotations

import math

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from shard.v1 import frame_pb2
from shard.wire import seal
from shard.wire.codec import MAX_RANK, CodecError, decode_tensor, encode_tensor
from shard.wire.seal import EdgeOpener, EdgeSealer, SealError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FUZZ = settings(
    max_examples=3500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]
SECRET = bytes(range(32))


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=MAX_RANK))
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    return torch.frombuffer(bytearray(raw), dtype=storage).view(dtype).reshape(shape)


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """Apply 1..4 random edits to a valid encoding."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            index = min(at, len(data) - 1)
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "overwrite" and data:
            chunk = draw(st.binary(min_size=1, max_size=4))
            data[at : at + len(chunk)] = chunk
    return bytes(data)


def check_decode(payload: bytes) -> None:
    try:
        tensor = decode_tensor(payload)
    except CodecError:
        event("decode: CodecError")
        return
    event("decode: tensor")
    assert isinstance(tensor, torch.Tensor)
    assert tensor.dtype in DTYPES and tensor.dim() <= MAX_RANK
    # A decoded tensor re-encodes to a payload that decodes to the same bits.
    assert encode_tensor(decode_tensor(encode_tensor(tensor))) == encode_tensor(tensor)


@FUZZ
@given(st.data())
def test_decode_tensor_on_random_and_mutated_payloads(data):
    if data.draw(st.booleans()):
        payload = data.draw(st.binary(max_size=512))
    else:
        payload = data.draw(mutated(encode_tensor(data.draw(tensors()))))
    check_decode(payload)


@settings(FUZZ, max_examples=500)
@given(tensors())
def test_decode_inverts_encode(tensor):
    out = decode_tensor(encode_tensor(tensor))
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert encode_tensor(out) == encode_tensor(tensor)  # same bits, NaNs included


DIMS = st.one_of(st.integers(0, 6), st.sampled_from([0, 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1]))


def overflows_torch(shape: list[int]) -> bool:
    """Zero elements, but the other dims' product overflows torch's int64 stride math."""
    return 0 in shape and math.prod(max(d, 1) for d in shape) >= 2**63


@st.composite
def tensor_messages(draw) -> bytes:
    """Structure-aware: well-formed Tensor messages with adversarial dtypes, shapes, sizes."""
    dtype = draw(st.one_of(st.sampled_from(list(frame_pb2.Dtype.values())), st.integers(-(2**31), 2**31 - 1)))
    shape = draw(st.lists(DIMS, max_size=MAX_RANK + 2))
    assume(not overflows_torch(shape))  # pinned by test_zero_element_shapes_with_huge_dims
    numel = math.prod(shape)
    itemsize = {1: 4, 2: 2, 3: 2, 4: 4, 5: 8}.get(dtype, 1)
    exact = numel * itemsize if numel * itemsize <= 4096 else 0
    size = draw(st.sampled_from([exact, max(exact - 1, 0), exact + 1, draw(st.integers(0, 64))]))
    return frame_pb2.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(min_size=size, max_size=size))).SerializeToString()


@settings(FUZZ, max_examples=1000)
@given(tensor_messages())
def test_decode_tensor_on_structured_messages(payload):
    check_decode(payload)


@settings(FUZZ, max_examples=50)
@example([0, 2**32 - 1, 2**32 - 1, 2**32 - 1])
@example([2**32 - 1, 2**32 - 1, 2**32 - 1, 0])
@given(
    st.lists(st.sampled_from([2**21, 2**31, 2**32 - 1]), min_size=3, max_size=3)
    .map(lambda dims: [0, *dims])
    .flatmap(st.permutations)
    .filter(overflows_torch)
)
def test_zero_element_shapes_with_huge_dims(shape):
    payload = frame_pb2.Tensor(dtype=frame_pb2.DTYPE_FLOAT32, shape=shape, data=b"").SerializeToString()
    check_decode(payload)


@st.composite
def sealed_frames(draw):
    tensor = draw(tensors())
    header = frame_pb2.FrameHeader(
        session_id=draw(st.text(max_size=12)),
        chunk_id=draw(st.integers(0, 2**64 - 1)),
        epoch=draw(st.integers(0, 2**32 - 1)),
        start_pos=draw(st.integers(0, 2**32 - 1)),
        num_tokens=draw(st.integers(0, 64)),
        num_outputs=draw(st.integers(0, 64)),
        kind=draw(st.sampled_from(list(frame_pb2.FrameKind.values()))),
        sender="stage-0",
        receiver="stage-1",
        traceparent=draw(st.sampled_from(["", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"])),
        tracestate=draw(st.text(max_size=8)),
        counter=draw(st.integers(1, 2**64 - 1)),
    )
    payload = encode_tensor(tensor)
    sealed = EdgeSealer(SECRET, "stage-0", "stage-1").seal(header, payload)
    return frame_pb2.Frame(header=header, payload=sealed), payload


@FUZZ
@given(st.data())
def test_frame_parse_and_open_on_random_and_mutated_frames(data):
    original, plaintext = data.draw(sealed_frames())
    target = data.draw(st.sampled_from(["random", "frame", "payload", "payload", "header"]))
    if target == "random":
        blob = data.draw(st.binary(max_size=512))
    elif target == "frame":  # the whole message as it crosses the wire
        blob = data.draw(mutated(original.SerializeToString()))
    elif target == "payload":  # the sealed bytes only: every input reaches the AEAD
        blob = frame_pb2.Frame(
            header=original.header, payload=data.draw(mutated(original.payload))
        ).SerializeToString()
    else:  # the header only
        header_bytes = data.draw(mutated(original.header.SerializeToString()))
        try:
            header = frame_pb2.FrameHeader.FromString(header_bytes)
        except DecodeError:
            event("frame: DecodeError")
            return
        blob = frame_pb2.Frame(header=header, payload=original.payload).SerializeToString()
    try:
        frame = frame_pb2.Frame.FromString(blob)
    except DecodeError:
        event("frame: DecodeError")
        return
    opener = EdgeOpener([SECRET], "stage-0", "stage-1")
    try:
        opened = opener.open(frame.header, frame.payload)
    except SealError as error:
        event(f"open: {error.reason}")
        assert error.reason in seal.REASONS
        assert opener.last_counter == 0 and opener.opened == 0
        assert sum(opener.rejected.values()) == 1
        return
    event("open: ok")
    # Whatever survived the mutation authenticated: it must be exactly what was sealed.
    assert opened == plaintext
    assert seal.header_ad(frame.header) == seal.header_ad(original.header)
    assert opener.last_counter == original.header.counter
    check_decode(opened)


@settings(FUZZ, max_examples=3000)
@given(st.binary(max_size=2048))
def test_frame_parse_and_decode_on_random_bytes(blob):
    check_decode(blob)
    try:
        frame = frame_pb2.Frame.FromString(blob)
    except DecodeError:
        return
    opener = EdgeOpener([SECRET], frame.header.sender, frame.header.receiver)
    with pytest.raises(SealError):
        opener.open(frame.header, frame.payload)
