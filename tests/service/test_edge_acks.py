"""An edge over real gRPC + mTLS + AEAD with cumulative acks: every frame taken in is
acknowledged (one ack may cover several), and a frame the receiver refuses is the one the
sender drops, even when frames before it were still unacknowledged."""

import asyncio

import pytest
import torch

from shard.v1 import frame_pb2
from shard.wire.certs import SECRET_FILE
from shard.wire.codec import encode_tensor
from shard.wire.edge import Edge
from shard.wire.seal import load_secret


@pytest.fixture(scope="module")
def swarm(tinystories_swarm):
    return tinystories_swarm


def chunk(session: str, start_pos: int, tokens: list[int]) -> frame_pb2.Frame:
    header = frame_pb2.FrameHeader(session_id=session, start_pos=start_pos, num_tokens=len(tokens),
                                   num_outputs=1, kind=frame_pb2.FRAME_KIND_FORWARD)
    return frame_pb2.Frame(header=header, payload=encode_tensor(torch.tensor(tokens)))


async def push_through_edge(swarm, frames: list[frame_pb2.Frame]) -> Edge:
    stage = swarm.stages[0]
    edge = Edge(sender="coordinator", receiver=stage.node.node_id, address=stage.address,
                tls=swarm.tls("coordinator"), secret=load_secret(swarm.certs / SECRET_FILE))
    for frame in frames:
        await edge.send(frame)
    for _ in range(200):  # until every frame is acknowledged or dropped
        if not edge._unacked:
            break
        await asyncio.sleep(0.05)
    return edge


def session_length(stage, session_id: str) -> int | None:
    return next((s.kv_length for s in stage.info().sessions if s.session_id == session_id), None)


def test_a_burst_of_frames_is_acknowledged_in_full(swarm):
    stage = swarm.stages[0].node
    processed = stage.frames_processed
    frames = [chunk("burst", 0, [1, 415, 1022])] + [chunk("burst", 3 + i, [264 + i]) for i in range(7)]
    edge = swarm.run(push_through_edge(swarm, frames))
    try:
        assert not edge._unacked
        assert edge.frames_sent == len(frames) and edge.reconnects == 0
        assert stage.frames_processed == processed + len(frames)
        assert session_length(stage, "burst") == 10
    finally:
        swarm.run(edge.close())


def test_the_refused_frame_is_the_one_dropped(swarm):
    """Two good frames, one out of the vocabulary (refused: INVALID_ARGUMENT), one good:
    the edge drops the refused frame only and sends the last one again on a new stream."""
    stage = swarm.stages[0].node
    processed = stage.frames_processed
    frames = [chunk("kept", 0, [1, 415, 1022]), chunk("kept", 3, [264]),
              chunk("refused", 0, [1, 10**6]), chunk("kept", 4, [727])]
    edge = swarm.run(push_through_edge(swarm, frames))
    try:
        assert not edge._unacked
        assert edge.reconnects == 1
        assert stage.frames_processed == processed + 3
        assert session_length(stage, "kept") == 5
        assert session_length(stage, "refused") is None
    finally:
        swarm.run(edge.close())
