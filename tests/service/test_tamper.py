"""Invariant 5 over real gRPC: a forged, replayed, re-ordered, spliced or mis-sealed frame
is refused at the edge and never reaches the model."""

import asyncio

import grpc
import pytest
import torch

from shard.client import generate
from shard.v1 import api_pb2, frame_pb2, stage_pb2_grpc
from shard.wire.certs import SECRET_FILE, create_local_deployment
from shard.wire.codec import encode_tensor
from shard.wire.seal import EdgeSealer, load_secret, write_secret
from shard.wire.tls import NodeTLS, open_channel

from support.reference import reference_greedy
from support.swarm import inprocess_swarm

PROMPT = [1, 415, 1022, 264, 727]


@pytest.fixture(scope="module")
def swarm(tinystories_swarm):
    tinystories_swarm.secret = load_secret(tinystories_swarm.certs / SECRET_FILE)
    return tinystories_swarm


def plain_frame(session="t", start_pos=0, tokens=(1, 415, 1022)):
    header = frame_pb2.FrameHeader(session_id=session, start_pos=start_pos, num_tokens=len(tokens),
                                   num_outputs=1, kind=frame_pb2.FRAME_KIND_FORWARD)
    return frame_pb2.Frame(header=header, payload=encode_tensor(torch.tensor(tokens)))


def seal(sealer: EdgeSealer, frame, counter: int, receiver: str | None = None):
    header = frame_pb2.FrameHeader()
    header.CopyFrom(frame.header)
    header.sender, header.receiver, header.counter = sealer.sender, receiver or sealer.receiver, counter
    return frame_pb2.Frame(header=header, payload=sealer.seal(header, frame.payload))


async def push(address, tls, frames) -> tuple[int, grpc.StatusCode]:
    """Send frames on one Traverse stream: (the highest counter acknowledged, final status).
    Acks are cumulative: one names the last of the frames it covers."""
    acked = 0
    async with open_channel(address, tls) as channel:
        call = stage_pb2_grpc.StageServiceStub(channel).Traverse(iter(frames))
        try:
            async for ack in call:
                acked = max(acked, ack.counter)
        except grpc.aio.AioRpcError as error:
            return acked, error.code()
    return acked, grpc.StatusCode.OK


def flip_header(frame, **changes):
    tampered = frame_pb2.Frame()
    tampered.CopyFrom(frame)
    for field, value in changes.items():
        setattr(tampered.header, field, value)
    return tampered


def flip_payload(frame, index=40):
    payload = bytearray(frame.payload)
    payload[index] ^= 0x01
    return frame_pb2.Frame(header=frame.header, payload=bytes(payload))


def truncate(frame, keep=20):
    return frame_pb2.Frame(header=frame.header, payload=frame.payload[:keep])


def other_secret_sealer(tmp_path, receiver):
    return EdgeSealer(write_secret(tmp_path / "other.secret"), "coordinator", receiver)


CASES = {
    # name: (build frames from a sealer coordinator -> stage-0, the counter acknowledged last
    # (the one frame taken in, if any), reason)
    "header-bit-flip": (lambda s, t: [flip_header(seal(s, plain_frame(), 1), start_pos=1)], 0, "forged"),
    "session-swap": (lambda s, t: [flip_header(seal(s, plain_frame(), 1), session_id="u")], 0, "forged"),
    "payload-bit-flip": (lambda s, t: [flip_payload(seal(s, plain_frame(), 1))], 0, "forged"),
    "truncated": (lambda s, t: [truncate(seal(s, plain_frame(), 1))], 0, "truncated"),
    "cut-tag": (lambda s, t: [truncate(seal(s, plain_frame(), 1), keep=-3)], 0, "forged"),
    "replay": (lambda s, t: [seal(s, plain_frame("r"), 1)] * 2, 1, "replay"),
    "re-order": (lambda s, t: [seal(s, plain_frame("o"), 1), seal(s, plain_frame("o2"), 2)][::-1], 2, "replay"),
    "splice-other-receiver": (lambda s, t: [seal(EdgeSealer(s.secret, "coordinator", "stage-1"),
                                                 plain_frame(), 1)], 0, "wrong-edge"),
    "splice-other-sender": (lambda s, t: [seal(EdgeSealer(s.secret, "stage-1", "stage-0"),
                                               plain_frame(), 1)], 0, "wrong-edge"),
    "wrong-secret": (lambda s, t: [seal(other_secret_sealer(t, "stage-0"), plain_frame(), 1)], 0, "forged"),
}


@pytest.mark.parametrize("case", CASES)
def test_tampered_frames_are_refused_before_the_model(swarm, case, tmp_path):
    build, acked_expected, reason = CASES[case]
    taken_expected = 1 if acked_expected else 0
    stage = swarm.stages[0].node
    sealer = EdgeSealer(swarm.secret, "coordinator", "stage-0")
    sealer.secret = swarm.secret
    processed, rejected = stage.frames_processed, stage.inbound.rejected[reason]
    acked, code = swarm.run(push(swarm.stages[0].address, swarm.tls("coordinator"), build(sealer, tmp_path)))
    swarm.run(asyncio.sleep(0.2))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert acked == acked_expected
    assert stage.inbound.rejected[reason] == rejected + 1
    # Only the frame acknowledged before the forgery was computed.
    assert stage.frames_processed == processed + taken_expected


def test_identity_is_checked_before_any_frame(swarm, tmp_path):
    frame = plain_frame()
    sealer = EdgeSealer(swarm.secret, "client", "stage-0")
    address = swarm.stages[0].address
    # A real certificate, but a client may not push frames into a stage.
    assert swarm.run(push(address, swarm.tls("client"), [seal(sealer, frame, 1)]))[1] == \
        grpc.StatusCode.PERMISSION_DENIED
    # The assigned upstream of stage-1 is stage-0, not the coordinator.
    assert swarm.run(push(swarm.stages[1].address, swarm.tls("coordinator"), []))[1] == \
        grpc.StatusCode.PERMISSION_DENIED
    # Another deployment's CA, and no certificate at all: the handshake fails.
    create_local_deployment(tmp_path / "other", 1)
    stranger = NodeTLS.load(tmp_path / "other", "coordinator")
    assert swarm.run(push(address, stranger, [frame]))[1] == grpc.StatusCode.UNAVAILABLE

    async def no_certificate():
        credentials = grpc.ssl_channel_credentials(root_certificates=stranger.ca_pem)
        async with grpc.aio.secure_channel(address, credentials) as channel:
            call = stage_pb2_grpc.StageServiceStub(channel).Traverse(iter([frame]))
            return [a async for a in call]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        swarm.run(no_certificate())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_ring_recovers_its_edge_and_stays_exact(swarm, tinystories_dir):
    """The tamper tests opened their own streams as 'coordinator', retiring the real
    coordinator's stream at stage-0: its next frame is refused, the edge re-opens a fresh
    sealed stream and re-sends, and the answer is still exact."""
    request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=24)
    for _ in range(2):
        generation = swarm.run(generate(swarm.coordinator.address, swarm.tls(), request))
        assert list(generation.summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, 24)
        swarm.run(push(swarm.stages[0].address, swarm.tls("coordinator"),
                       [seal(EdgeSealer(swarm.secret, "coordinator", "stage-0"), plain_frame("x"), 1)]))
    assert swarm.coordinator.node.ring.head_edge.reconnects >= 1


def test_secrets_roll_without_restarting_the_ring(tinystories_dir, tmp_path):
    """A node seals with its first secret and opens with any. Mid-roll the stages seal with
    the new secret and the coordinator still with the old one (accepting both); then the
    coordinator moves to the new one alone."""
    certs = tmp_path / "certs"
    create_local_deployment(certs, 2)
    old, new = certs / SECRET_FILE, tmp_path / "new.secret"
    write_secret(new)
    request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=8)

    async def run(coordinator_secrets):
        async with inprocess_swarm(tinystories_dir, 2, tmp_path, certs=certs, secrets={
                "stage-0": [new, old], "stage-1": [new, old], "coordinator": coordinator_secrets}) as swarm:
            return (await generate(swarm.coordinator.address, swarm.tls(), request)).summary.output_ids

    expected = reference_greedy(tinystories_dir, PROMPT, 8)
    assert list(asyncio.run(run([old, new]))) == expected
    assert list(asyncio.run(run([new]))) == expected
