"""Tensors on the wire: raw bytes with an allow-listed dtype and a shape that must account
for every byte. No pickle, no torch.load: a forged payload can only fail to parse."""

from __future__ import annotations

import math

import torch

from shard.v1 import frame_pb2

MAX_RANK = 4
MAX_ELEMENTS = 64 * 1024 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024

_TO_WIRE = {
    torch.float32: frame_pb2.DTYPE_FLOAT32,
    torch.float16: frame_pb2.DTYPE_FLOAT16,
    torch.bfloat16: frame_pb2.DTYPE_BFLOAT16,
    torch.int32: frame_pb2.DTYPE_INT32,
    torch.int64: frame_pb2.DTYPE_INT64,
}
_FROM_WIRE = {wire: dtype for dtype, wire in _TO_WIRE.items()}


class CodecError(ValueError):
    """A payload that is not a well-formed tensor of the allowed kinds."""


def encode_tensor(tensor: torch.Tensor) -> bytes:
    if tensor.dtype not in _TO_WIRE:
        raise CodecError(f"dtype {tensor.dtype} is not allowed on the wire")
    if tensor.dim() > MAX_RANK:
        raise CodecError(f"rank {tensor.dim()} exceeds {MAX_RANK}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # bfloat16 has no numpy dtype: move the bits as int16.
    raw = flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat
    message = frame_pb2.Tensor(
        dtype=_TO_WIRE[tensor.dtype], shape=list(tensor.shape), data=raw.numpy().tobytes()
    )
    return message.SerializeToString()


def decode_tensor(payload: bytes) -> torch.Tensor:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise CodecError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    message = frame_pb2.Tensor()
    try:
        message.ParseFromString(payload)
    except Exception as error:  # protobuf raises DecodeError and, on some inputs, others
        raise CodecError(f"payload is not a Tensor message: {error}") from None
    dtype = _FROM_WIRE.get(message.dtype)
    if dtype is None:
        raise CodecError(f"dtype {message.dtype} is not allowed on the wire")
    shape = list(message.shape)
    if len(shape) > MAX_RANK:
        raise CodecError(f"rank {len(shape)} exceeds {MAX_RANK}")
    # Bound every dimension, zeros included: [0, 2**21, 2**21] holds nothing but its
    # strides still overflow.
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise CodecError(f"shape {shape} exceeds {MAX_ELEMENTS} elements")
    elements = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(message.data) != elements * itemsize:
        raise CodecError(
            f"shape {shape} of {dtype} needs {elements * itemsize} bytes, got {len(message.data)}"
        )
    if elements == 0:
        return torch.empty(shape, dtype=dtype)
    storage_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    flat = torch.frombuffer(bytearray(message.data), dtype=storage_dtype)
    return flat.view(dtype).reshape(shape)
