"""The sampling spec sealed coordinator -> tail: it opens only for the same chunk, the same
coordinator and a secret the tail holds; any change to it fails."""

import os

import pytest

from shard.v1 import frame_pb2
from shard.wire.seal import SealError
from shard.wire.spec_seal import open_spec, seal_spec

SECRET, OTHER = os.urandom(32), os.urandom(32)
SPEC = frame_pb2.SamplingSpec(temperature=0.7, seed=5).SerializeToString()


def header(**fields):
    return frame_pb2.FrameHeader(**{**dict(session_id="s", chunk_id=3, epoch=1, start_pos=10, num_tokens=5,
                                           num_outputs=5), **fields})


def test_it_opens_at_the_tail_and_hides_the_spec():
    sealed = seal_spec(SECRET, "coordinator", header(), SPEC)
    assert SPEC not in sealed
    # The tail is whichever stage: only the coordinator and the chunk name the key and the data.
    assert open_spec([OTHER, SECRET], "coordinator", header(sender="stage-1", counter=9), sealed) == SPEC
    assert seal_spec(SECRET, "coordinator", header(), SPEC) != sealed  # a fresh key every time


@pytest.mark.parametrize("change", [
    dict(secrets=[OTHER]), dict(coordinator="other"), dict(header=header(chunk_id=4)),
    dict(header=header(epoch=2)), dict(header=header(start_pos=11)), dict(header=header(session_id="t")),
])
def test_it_does_not_open_anywhere_else(change):
    sealed = seal_spec(SECRET, "coordinator", header(), SPEC)
    with pytest.raises(SealError):
        open_spec(change.get("secrets", [SECRET]), change.get("coordinator", "coordinator"),
                  change.get("header", header()), sealed)


def test_every_bit_flip_fails():
    sealed = seal_spec(SECRET, "coordinator", header(), SPEC)
    for index in range(len(sealed)):
        flipped = bytearray(sealed)
        flipped[index] ^= 1
        with pytest.raises(SealError):
            open_spec([SECRET], "coordinator", header(), bytes(flipped))
    with pytest.raises(SealError, match="truncated"):
        open_spec([SECRET], "coordinator", header(), sealed[:20])
