"""Tensors on the wire: raw bytes with an allow-listed dtype and a shape that must account
for every byte. No pickle, no torch.load: a forged payload can only fail to parse."""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

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
_ITEM_SIZES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _TO_WIRE}
_INT_CODES = {torch.int32: "i", torch.int64: "q"}  # array module codes (native byte order, as torch)


class CodecError(ValueError):
    """A payload that is not a well-formed tensor of the allowed kinds."""


def encode_tensor(tensor: torch.Tensor) -> bytes:
    return encode_data(tensor.dtype, list(tensor.shape), tensor_data(tensor))


def tensor_data(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as a Tensor message carries them: raw, row-major."""
    if tensor.dtype not in _TO_WIRE:
        raise CodecError(f"dtype {tensor.dtype} is not allowed on the wire")
    if tensor.dim() > MAX_RANK:
        raise CodecError(f"rank {tensor.dim()} exceeds {MAX_RANK}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # bfloat16 has no numpy dtype: move the bits as int16.
    raw = flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat
    return raw.numpy().tobytes()


def encode_data(dtype: torch.dtype, shape: list[int], data: bytes) -> bytes:
    """A Tensor message of elements already in wire form (from tensor_data)."""
    return frame_pb2.Tensor(dtype=_TO_WIRE[dtype], shape=shape, data=data).SerializeToString()


def encode_ids(ids: list[int]) -> bytes:
    """A 1-D int64 tensor of `ids`, byte for byte what encode_tensor would write, without
    building a torch tensor (the coordinator sends one per chunk)."""
    return frame_pb2.Tensor(dtype=frame_pb2.DTYPE_INT64, shape=[len(ids)],
                            data=array.array("q", ids).tobytes()).SerializeToString()


@dataclass(frozen=True)
class WireTensor:
    """A payload parsed and checked, not yet a torch tensor: its dtype, shape and ids can
    be checked on the event loop at the cost of a protobuf parse, and the tensor built
    where it is used."""

    dtype: torch.dtype
    shape: list[int]
    data: bytes

    def to_torch(self) -> torch.Tensor:
        if not self.data:
            return torch.empty(self.shape, dtype=self.dtype)
        storage_dtype = torch.int16 if self.dtype == torch.bfloat16 else self.dtype
        flat = torch.frombuffer(bytearray(self.data), dtype=storage_dtype)
        return flat.view(self.dtype).reshape(self.shape)

    def ints(self) -> list[int]:
        """The values of an integer tensor, flattened."""
        if self.dtype not in _INT_CODES:
            raise CodecError(f"{self.dtype} is not an integer dtype")
        return array.array(_INT_CODES[self.dtype], self.data).tolist()


def parse_tensor(payload: bytes) -> WireTensor:
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
    needed = math.prod(shape) * _ITEM_SIZES[dtype]
    if len(message.data) != needed:
        raise CodecError(f"shape {shape} of {dtype} needs {needed} bytes, got {len(message.data)}")
    return WireTensor(dtype, shape, message.data)


def decode_tensor(payload: bytes) -> torch.Tensor:
    return parse_tensor(payload).to_torch()
