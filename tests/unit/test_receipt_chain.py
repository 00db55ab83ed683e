"""Receipt building blocks without a swarm: frame chains (what counts, what does not) and
a coordinator without node keys refusing to promise a receipt."""

import grpc
import pytest

from shard.errors import ShardError
from shard.node.coordinator import CoordinatorNode
from shard.node.generation import GenerationRequest
from shard.v1 import frame_pb2
from shard.wire.chain import Chain, chain_of, header_entry
from shard.wire.codec import encode_ids


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
