"""Invariant 6: bad input gets a precise gRPC status and the services keep serving."""

import asyncio

import grpc
import pytest
import torch

from shard.client import generate
from shard.v1 import (
    api_pb2,
    api_pb2_grpc,
    frame_pb2,
    stage_pb2,
    stage_pb2_grpc,
)
from shard.wire.certs import SECRET_FILE, create_deployment
from shard.wire.codec import encode_tensor
from shard.wire.seal import EdgeSealer, load_secret
from shard.wire.spec_seal import seal_spec
from shard.wire.tls import NodeTLS, open_channel

from support.reference import reference_greedy

CONTEXT = 512  # tinystories' max_position_embeddings


@pytest.fixture(scope="module")
def swarm(tinystories_swarm):
    return tinystories_swarm


def status_of(swarm, coroutine) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        swarm.run(coroutine)
    return caught.value.code()


def ask(swarm, request, tls=None):
    return generate(swarm.coordinator.address, tls or swarm.tls(), request)


@pytest.mark.parametrize("request_fields, needle", [
    ({"prompt": ""}, "empty"),
    ({}, "prompt"),
    ({"prompt_ids": api_pb2.TokenIds(ids=[1] * CONTEXT)}, "context"),
    ({"prompt_ids": api_pb2.TokenIds(ids=[1, 99999])}, "prompt_ids"),
    ({"prompt": "Once", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Once", "max_tokens": CONTEXT}, "exceed the context"),
])
def test_bad_generate_requests_are_invalid_argument(swarm, request_fields, needle):
    request = api_pb2.GenerateRequest(**{"max_tokens": 8, **request_fields})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        swarm.run(ask(swarm, request))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in caught.value.details()


def sealed(swarm, frames, sender, receiver):
    """Frames as `sender`'s edge would put them on the wire: addressed, counted, sealed."""
    sealer = EdgeSealer(load_secret(swarm.certs / SECRET_FILE), sender, receiver)
    out = []
    for counter, frame in enumerate(frames, start=1):
        header = frame_pb2.FrameHeader()
        header.CopyFrom(frame.header)
        header.sender, header.receiver, header.counter = sender, receiver, counter
        out.append(frame_pb2.Frame(header=header, payload=sealer.seal(header, frame.payload)))
    return out


async def _traverse(swarm, sender, receiver_index, frames):
    receiver = swarm.stages[receiver_index]
    async with open_channel(receiver.address, swarm.tls(sender)) as channel:
        call = stage_pb2_grpc.StageServiceStub(channel).Traverse(
            iter(sealed(swarm, frames, sender, receiver.node.node_id)))
        return [ack async for ack in call]


def _frame(session="s", start_pos=0, tensor=None, num_tokens=None, payload=None):
    tensor = torch.tensor([1, 2, 3]) if tensor is None else tensor
    header = frame_pb2.FrameHeader(session_id=session, start_pos=start_pos, kind=frame_pb2.FRAME_KIND_FORWARD,
                                   num_tokens=num_tokens or tensor.shape[0], num_outputs=1)
    return frame_pb2.Frame(header=header, payload=encode_tensor(tensor) if payload is None else payload)


@pytest.mark.parametrize("frame", [
    _frame(tensor=torch.randn(3, 128)),                 # hidden states into the first stage
    _frame(tensor=torch.tensor([1, 2, 3]), num_tokens=4),  # header and payload disagree
    _frame(tensor=torch.tensor([1, 2, 5000])),           # ids outside the vocabulary
    _frame(payload=b"\x08\x05\x12\x01"),                 # not a tensor at all
    _frame(tensor=torch.tensor([], dtype=torch.int64), num_tokens=0),
], ids=["hidden-into-first", "count-mismatch", "out-of-vocab", "garbage", "empty"])
def test_malformed_frames_are_invalid_argument(swarm, frame):
    code = status_of(swarm, _traverse(swarm, "coordinator", 0, [frame]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def _replay(first, last, payload=b"", num_tokens=3):
    header = frame_pb2.FrameHeader(session_id="s", kind=frame_pb2.FRAME_KIND_REPLAY, num_tokens=num_tokens,
                                   replay_first_stage=first, replay_last_stage=last)
    return frame_pb2.Frame(header=header, payload=payload)


@pytest.mark.parametrize("frame", [
    _replay(1, 0),                                           # the range runs backwards
    _replay(0, 2, payload=encode_tensor(torch.tensor([1, 2, 3]))),  # past the ring of 2
    _replay(1, 1, payload=encode_tensor(torch.tensor([1, 2, 3]))),  # ids to a stage that only feeds
    _replay(0, 1, payload=encode_tensor(torch.randn(3, 128))),       # hidden states into the head
    _replay(1, 1, num_tokens=0),
], ids=["backwards", "past-the-ring", "payload-to-a-feeder", "hidden-into-first", "empty"])
def test_malformed_replays_are_invalid_argument(swarm, frame):
    code = status_of(swarm, _traverse(swarm, "coordinator", 0, [frame]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_hidden_of_the_wrong_width_is_invalid_argument(swarm):
    frame = _frame(tensor=torch.randn(3, 64))
    code = status_of(swarm, _traverse(swarm, "stage-0", 1, [frame]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def _sampled(swarm, spec: bytes | frame_pb2.SamplingSpec, *, seal: bool = True):
    """A chunk for the tail whose sampling spec the coordinator sealed (unless not `seal`)."""
    frame = _frame(tensor=torch.randn(3, 128))
    frame.header.num_outputs = 3
    spec = spec if isinstance(spec, bytes) else spec.SerializeToString()
    secret = load_secret(swarm.certs / SECRET_FILE)
    frame.header.sampling = seal_spec(secret, "coordinator", frame.header, spec) if seal else spec
    return frame


def _proposal(token, ids, probs):
    return frame_pb2.DraftProposal(token=token, ids=ids, probs=probs)


@pytest.mark.parametrize("spec", [
    b"\xff\xff\xff",
    frame_pb2.SamplingSpec(temperature=5.0),
    frame_pb2.SamplingSpec(temperature=1.0, top_p=0.0),
    frame_pb2.SamplingSpec(temperature=1.0, top_p=1.0, logprobs=500, want_logprobs=True),
    frame_pb2.SamplingSpec(temperature=1.0, top_p=1.0, proposals=[_proposal(7, [5, 6], [0.5, 0.5])]),
    frame_pb2.SamplingSpec(temperature=1.0, top_p=1.0, proposals=[_proposal(5, [5, 99999], [0.5, 0.5])]),
    frame_pb2.SamplingSpec(temperature=1.0, top_p=1.0, proposals=[_proposal(5, [5], [1.0])] * 3),
    frame_pb2.SamplingSpec(temperature=0.0, top_p=1.0, proposals=[_proposal(5, [5], [1.0])]),
], ids=["garbage", "temperature", "top-p", "logprobs", "token-outside-q", "id-outside-vocab", "too-many-proposals",
        "greedy-with-proposals"])
def test_malformed_sampling_specs_are_invalid_argument_at_the_tail(swarm, spec):
    code = status_of(swarm, _traverse(swarm, "stage-0", 1, [_sampled(swarm, spec)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_sampling_spec_not_sealed_by_the_coordinator_is_unauthenticated(swarm):
    spec = frame_pb2.SamplingSpec(temperature=1.0, top_p=1.0)
    code = status_of(swarm, _traverse(swarm, "stage-0", 1, [_sampled(swarm, spec, seal=False)]))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_only_the_upstream_may_push_frames(swarm):
    frame = _frame(tensor=torch.randn(3, 128))
    code = status_of(swarm, _traverse(swarm, "coordinator", 1, [frame]))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_unknown_session_is_not_found_and_never_created(swarm):
    async def end_unknown():
        async with open_channel(swarm.stages[0].address, swarm.tls("coordinator")) as channel:
            await stage_pb2_grpc.StageServiceStub(channel).EndSession(stage_pb2.EndSessionRequest(session_id="nope"))

    assert status_of(swarm, end_unknown()) == grpc.StatusCode.NOT_FOUND
    # A chunk that claims to continue a session the stage never saw is refused, not served.
    swarm.run(_traverse(swarm, "coordinator", 0, [_frame(session="ghost", start_pos=5)]))
    swarm.run(asyncio.sleep(0.3))
    assert all("ghost" not in {s.session_id for s in st.node.info().sessions} for st in swarm.stages)


def test_clients_without_a_valid_certificate_are_refused(swarm, tmp_path):
    request = api_pb2.GenerateRequest(prompt="Once", max_tokens=4)
    client = swarm.tls("client")

    async def without_certificate():
        credentials = grpc.ssl_channel_credentials(root_certificates=client.ca_pem)
        async with grpc.aio.secure_channel(swarm.coordinator.address, credentials) as channel:
            stub = api_pb2_grpc.InferenceServiceStub(channel)
            return [r async for r in stub.Generate(request, timeout=10)]

    assert status_of(swarm, without_certificate()) == grpc.StatusCode.UNAVAILABLE
    create_deployment(tmp_path / "other", [("client", "client")])
    stranger = NodeTLS.load(tmp_path / "other", "client")
    assert status_of(swarm, ask(swarm, request, stranger)) == grpc.StatusCode.UNAVAILABLE
    # A real certificate of the wrong role.
    assert status_of(swarm, ask(swarm, request, swarm.tls("stage-1"))) == grpc.StatusCode.PERMISSION_DENIED


def test_still_serving_exactly_after_all_that(swarm, tinystories_dir):
    prompt_ids = [1, 415, 1022, 264, 727]
    request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=prompt_ids), max_tokens=24)
    generation = swarm.run(ask(swarm, request))
    assert list(generation.summary.output_ids) == reference_greedy(tinystories_dir, prompt_ids, 24)
