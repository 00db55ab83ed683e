"""Receipt building blocks without a swarm: frame chains (what counts, what does not), a
stage's notary (when it attests, when it forgets), and a coordinator without node keys
refusing to promise a receipt."""

import asyncio

import grpc
import pytest

from shard.errors import ShardError
from shard.node.coordinator import CoordinatorNode
from shard.node.generation import GenerationRequest
from shard.node.notary import StageNotary
from shard.v1 import frame_pb2
from shard.wire import certs
from shard.wire.certs import Identity
from shard.wire.chain import Chain, chain_of, header_entry
from shard.wire.codec import encode_ids
from shard.wire.signing import Signer, verify_signed


def header(**fields) -> frame_pb2.FrameHeader:
    base = dict(session_id="s", chunk_id=1, epoch=0, start_pos=5, num_tokens=2, num_outputs=2,
                kind=frame_pb2.FRAME_KIND_FORWARD, receipt=True)
    return frame_pb2.FrameHeader(**{**base, **fields})


def test_an_entry_covers_the_chunk_and_its_payload_not_the_edge():
    payload = encode_ids([7, 8])
    entry = header_entry(header(), payload)
    # The edge's own fields (who, the AEAD counter, the trace) do not change what was handed over ...
    assert header_entry(header(sender="a", receiver="b", counter=9, traceparent="00-x"), payload) == entry
    # ... every field of the chunk and every payload byte does.
    for changed in ({"chunk_id": 2}, {"epoch": 1}, {"start_pos": 6}, {"num_tokens": 3}, {"num_outputs": 1},
                    {"kind": frame_pb2.FRAME_KIND_REPLAY}, {"session_id": "t"}, {"replay_last_stage": 1}):
        assert header_entry(header(**changed), payload) != entry, changed
    assert header_entry(header(), encode_ids([7, 9])) != entry


def test_a_chain_depends_on_order_and_counts_a_resent_frame_once():
    a, b = header_entry(header(chunk_id=1), b"x"), header_entry(header(chunk_id=2), b"y")
    chain = Chain()
    assert chain.add(a, 1) and chain.add(b, 1)
    assert not chain.add(a, 1)  # re-sent on a new stream after a break
    assert (chain.head, chain.count) == (chain_of([a, b]), 2)
    assert chain_of([a, b]) != chain_of([b, a])
    assert chain.summary(str) == {"head": chain_of([a, b]).hex(), "count": 2, "kinds": {"1": 2}}


def test_an_insecure_coordinator_refuses_a_receipt(tinystories_dir):
    node = CoordinatorNode(node_id="coordinator", model_dir=str(tinystories_dir), tls=None, secrets=None)
    with pytest.raises(ShardError) as refused:
        node.check(GenerationRequest(max_tokens=4, prompt_ids=(1, 2), receipt=True))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot sign receipts" in refused.value.message
    node.check(GenerationRequest(max_tokens=4, prompt_ids=(1, 2)))  # without a receipt: served


@pytest.fixture
def stage_signer(tmp_path) -> Signer:
    certs.create_local_deployment(tmp_path, 1)
    return Signer((tmp_path / "stage-0.key").read_bytes(), (tmp_path / "stage-0.pem").read_bytes())


def test_a_stage_attests_once_its_end_passed_then_forgets(stage_signer, tmp_path):
    async def scenario():
        notary = StageNotary("stage-0", stage_signer)
        notary.block = {"layer_start": 0, "layer_end": 1, "first": True, "last": False, "weights_sha256": "0" * 64}
        forward = frame_pb2.Frame(header=header(sender="coordinator"), payload=encode_ids([7, 8]))
        notary.received(forward.header, forward.payload)
        notary.received(header(session_id="unasked", receipt=False), b"")  # no receipt asked: no chains
        notary.sent("stage-1", forward)
        early = asyncio.create_task(notary.attest("s", wait_seconds=5))
        await asyncio.sleep(0.05)
        assert not early.done()  # the END has not passed yet
        end = frame_pb2.Frame(header=header(sender="coordinator", kind=frame_pb2.FRAME_KIND_END, chunk_id=0))
        notary.received(end.header, b"")
        notary.sent("stage-1", end)
        signed = await early
        with pytest.raises(ShardError) as again:
            await notary.attest("s")
        with pytest.raises(ShardError) as unasked:
            await notary.attest("unasked")
        return signed, again.value.code, unasked.value.code

    signed, again, unasked = asyncio.run(scenario())
    statement = signed["statement"]
    assert statement["received"]["coordinator"]["kinds"] == {"FORWARD": 1, "END": 1}
    assert statement["sent"]["stage-1"]["head"] == statement["received"]["coordinator"]["head"]
    assert statement["skipped_chunks"] == []
    verify_signed(signed, claimed=Identity("stage", "stage-0"), ca_pem=(tmp_path / "ca.pem").read_bytes())
    assert again == unasked == grpc.StatusCode.NOT_FOUND


def test_a_stage_without_its_end_or_a_key_does_not_attest(stage_signer):
    async def scenario():
        codes = []
        for signer in (stage_signer, None):
            notary = StageNotary("stage-0", signer)
            notary.received(header(sender="coordinator"), b"")
            with pytest.raises(ShardError) as refused:
                await notary.attest("s", wait_seconds=0.1)
            codes.append(refused.value.code)
            notary.expire(idle_seconds=0.0)  # idle past the stage's idle time: the chains go
            if signer is not None:
                with pytest.raises(ShardError) as gone:
                    await notary.attest("s")
                codes.append(gone.value.code)
        return codes

    assert asyncio.run(scenario()) == [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND,
                                       grpc.StatusCode.FAILED_PRECONDITION]
