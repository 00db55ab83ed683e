"""A session on static KV attends, in its decode-size chunks, over the smallest extent of
its stage's cache that holds the positions it said it would reach (FrameHeader's
session_positions): the same tokens as generate(), a chunk past the extent refused with
nothing changed, the extent fixed by the session's first frame (the coordinator's side:
tests/integration/test_static_swarm.py)."""

import grpc
import pytest
import torch
from transformers import AutoConfig

from shard.model.block import Block
from shard.model.checkpoint import Checkpoint
from shard.model.static_block import StaticBlock
from shard.model.static_kv import slot_count
from shard.node.stage_compute import KVLayout
from shard.v1 import frame_pb2

from support.chain import LocalChain
from test_block import N_NEW, bounds_for, model_dir, near_ties, prompt_for, reference_for  # noqa: F401 (a fixture)
from test_stage_batching import frame, run_queued, start_compute

CONTEXT = 512  # the test models' max_position_embeddings: extents 256 and the whole cache


def random_block(max_positions: int) -> Block:
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                  max_position_embeddings=max_positions)
    return Block.random(config, 2, device="cpu", dtype=torch.float32)


def test_extents_grow_fourfold_up_to_the_whole_cache():
    static = StaticBlock(random_block(4096), capacity=4096, chunk_sizes=(9, 64))
    assert static.extents == [256, 1024]
    assert [static.extent_for(p) for p in (0, 1, 256, 257, 1024, 1025, 4096)] == [
        None, 256, 256, 1024, 1024, None, None]
    whole = slot_count(4096)
    assert [static.attention_slots(static.new_cache(positions=p)) for p in (45, 700, 3000, 0)] == [
        256, 1024, whole, whole]
    # A batch holds sessions of every extent: batched decode chunks attend over the whole cache.
    batched = StaticBlock(random_block(4096), capacity=4096, chunk_sizes=(9, 64), pool_size=2, batched=True)
    assert batched.extents == [] and batched.new_cache(positions=45).extent is None
    # A cache no longer than the smallest extent has none short of itself.
    assert StaticBlock(random_block(256), capacity=200, chunk_sizes=(9,)).extents == []


@pytest.mark.parametrize("chunk_sizes", [(3, 6), (5,)])
def test_a_session_within_its_extent_decodes_as_generate(model_dir, chunk_sizes):
    """Plain steps and 5-token verify chunks over a 256-slot extent of a 512-position cache."""
    prompt, ref = prompt_for(model_dir), reference_for(model_dir)
    bounds = bounds_for(Checkpoint.open(model_dir).num_layers, 2)
    chain = LocalChain(model_dir, bounds, static=dict(capacity=CONTEXT, chunk_sizes=chunk_sizes),
                       positions=len(prompt) + N_NEW)
    assert [cache.extent for cache in chain.caches if hasattr(cache, "extent")] == [256, 256]
    got = chain(0, prompt)
    for i in range(0, N_NEW - 1, 5):
        got += chain(len(prompt) + i, ref[i: i + 5], num_outputs=0)[: N_NEW - 1 - i]
    wrong = [len(prompt) - 1 + i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert got == ref, near_ties(model_dir, prompt + ref, wrong)
    plain = LocalChain(model_dir, bounds, static=dict(capacity=CONTEXT, chunk_sizes=chunk_sizes),
                       positions=len(prompt) + N_NEW)
    assert plain.greedy(prompt, N_NEW) == ref


def test_a_chunk_past_its_sessions_extent_is_refused_and_changes_nothing(tiny_model_dirs):
    block = Block.load(tiny_model_dirs["llama"], 0, 2, last=False, progress=False)
    static = StaticBlock(block, capacity=CONTEXT, chunk_sizes=(4, 64))
    cache = static.new_cache(positions=20)
    static.forward(cache, 0, input_ids=torch.arange(250) % 100)
    keys = cache.keys[0].clone()
    with pytest.raises(ValueError, match="exceed the 256 this session attends over"):
        static.forward(cache, 250, input_ids=torch.arange(10))
    assert cache.length == 250 and torch.equal(cache.keys[0], keys)
    unsaid = static.new_cache()  # a session that said nothing may use the whole cache
    static.forward(unsaid, 0, input_ids=torch.arange(260) % 100)
    assert unsaid.length == 260


def test_a_stage_fixes_each_sessions_extent_from_its_first_frame(tiny_model_dirs):
    compute, sent = start_compute(tiny_model_dirs["llama"], kv_layout=KVLayout(
        static=True, session_positions=CONTEXT, graphs=False, compiled=False, chunk_sizes=(4, 16)))

    def declared(session: str, positions: int, start_pos: int, tokens: list[int]):
        header, body = frame(session, start_pos, tokens)
        header.session_positions = positions
        return header, body

    run_queued(compute, [declared("short", 40, 0, [1, 2, 3]), declared("long", 300, 0, [1, 2, 3]),
                         declared("unsaid", 0, 0, [1, 2, 3])])
    slots = {session_id: compute.attention_slots(session) for session_id, session in compute.kv.items()}
    assert slots == {"short": 256, "long": slot_count(CONTEXT), "unsaid": slot_count(CONTEXT)}
    # Later frames cannot move it: the session's positions always run in one shape.
    run_queued(compute, [declared("short", 400, 3, [4]), declared("short", 40, 4, [i % 100 for i in range(250)]),
                         declared("short", 40, 254, [5, 6, 7])])
    assert compute.attention_slots(compute.kv.get("short")) == 256
    refused = sent[-1]
    assert refused.header.kind == frame_pb2.FRAME_KIND_ERROR
    detail = frame_pb2.ErrorDetail.FromString(refused.payload)
    assert detail.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "exceed the 256 this session attends over" in detail.message
    compute.close()
