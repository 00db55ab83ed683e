"""A stage's KV store: bytes accounted against the budget (checked against the tensors a
real block's cache holds), the session cap, idle expiry and the drop of a gone
coordinator's sessions."""

import time

import grpc
import pytest
import torch

from shard.errors import ShardError
from shard.model.block import Block, CacheGapError
from shard.node.kv_store import KVStore
from shard.wire.codec import tensor_data

PROMPT = [1, 415, 1022, 264, 727]


@pytest.fixture(scope="module")
def block(tinystories_dir) -> Block:
    return Block.load(tinystories_dir, 0, 1, first=True, last=False, progress=False)


def store(block: Block, *, positions: int = 100, max_sessions: int = 8, idle_seconds: float = 60.0) -> KVStore:
    return KVStore(block.new_cache, bytes_per_position=block.kv_bytes_per_position,
                   budget_bytes=positions * block.kv_bytes_per_position,
                   max_sessions=max_sessions, idle_seconds=idle_seconds)


def run(kv: KVStore, block: Block, session_id: str, start_pos: int, ids: list[int], incarnation: str = "a"):
    session = kv.reserve(session_id, incarnation, start_pos + len(ids))
    block.forward(session.cache, start_pos, input_ids=torch.tensor(ids), num_outputs=1)
    kv.record(session, block.cache_length(session.cache))


def tensor_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_bytes_follow_the_tensors_the_cache_holds(block):
    kv = store(block)
    run(kv, block, "s", 0, PROMPT)
    run(kv, block, "s", 5, [13, 14])
    session = kv.get("s")
    assert session.positions == 7
    assert kv.bytes_of(session) == kv.total_bytes == tensor_bytes(session.cache) > 0
    run(kv, block, "s", 3, [99])  # a rollback crops the cache: fewer bytes
    assert kv.total_bytes == 4 * block.kv_bytes_per_position == tensor_bytes(session.cache)
    assert kv.pop("s") == 4 * block.kv_bytes_per_position
    assert kv.total_bytes == 0 and len(kv) == 0 and kv.pop("s") is None


def test_a_chunk_past_the_budget_is_refused_and_changes_nothing(block):
    kv = store(block, positions=10)
    run(kv, block, "first", 0, PROMPT)
    with pytest.raises(ShardError) as refused:
        kv.reserve("second", "a", 6)  # 5 + 6 positions > 10
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"budget of {10 * block.kv_bytes_per_position} bytes" in refused.value.message
    with pytest.raises(ShardError):
        kv.reserve("first", "a", 11)  # a session's own growth counts too
    assert [sid for sid, _ in kv.items()] == ["first"] and kv.total_bytes == 5 * block.kv_bytes_per_position
    run(kv, block, "second", 0, PROMPT)  # exactly at the budget
    assert kv.total_bytes == kv.budget_bytes


def test_the_session_cap_stays_an_extra_limit(block):
    kv = store(block, max_sessions=2)
    run(kv, block, "a", 0, [1])
    run(kv, block, "b", 0, [1])
    with pytest.raises(ShardError, match="already holds 2 sessions") as refused:
        kv.reserve("c", "a", 1)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    run(kv, block, "a", 1, [2])  # sessions it holds go on


def test_idle_sessions_expire(block):
    kv = store(block, idle_seconds=0.2)
    run(kv, block, "idle", 0, PROMPT)
    time.sleep(0.3)
    run(kv, block, "busy", 0, PROMPT)
    assert kv.expire_idle() == ["idle"]
    assert [sid for sid, _ in kv.items()] == ["busy"] and kv.total_bytes == 5 * block.kv_bytes_per_position


def test_sessions_of_another_coordinator_incarnation_are_dropped(block):
    kv = store(block)
    run(kv, block, "old-1", 0, PROMPT, incarnation="old")
    run(kv, block, "old-2", 0, PROMPT, incarnation="old")
    run(kv, block, "new", 0, PROMPT, incarnation="new")
    assert sorted(kv.drop_other_incarnations("new")) == ["old-1", "old-2"]
    assert [sid for sid, _ in kv.items()] == ["new"] and kv.total_bytes == 5 * block.kv_bytes_per_position
    assert kv.drop_other_incarnations("") == ["new"]  # no coordinator: every session is void
    assert kv.total_bytes == 0


def test_a_static_store_holds_each_session_whole_from_its_start(block):
    from shard.model.static_block import StaticBlock

    static = StaticBlock(block, capacity=20, chunk_sizes=(4,), pool_size=2)
    session_bytes = StaticBlock.bytes_per_session(block, 20)
    released = []
    kv = KVStore(static.new_cache, bytes_per_position=block.kv_bytes_per_position, budget_bytes=2 * session_bytes,
                 max_sessions=8, idle_seconds=60, session_positions=20, session_bytes=session_bytes,
                 release=lambda cache: (released.append(cache), static.release(cache)))

    def step(session_id, start_pos, ids):
        session = kv.reserve(session_id, "a", start_pos + len(ids))
        static.forward(session.cache, start_pos, input_ids=torch.tensor(ids))
        kv.record(session, static.cache_length(session.cache))
        return session

    a = step("a", 0, PROMPT)
    assert kv.total_bytes == kv.bytes_of(a) == session_bytes == a.cache.nbytes
    step("a", 5, [13, 14])
    step("a", 2, [99])  # a rollback: the cache keeps its size
    assert a.positions == 3 and kv.total_bytes == session_bytes
    with pytest.raises(ShardError, match="exceed the 20 positions") as refused:
        kv.reserve("a", "a", 21)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    step("b", 0, PROMPT)
    with pytest.raises(ShardError, match="over its budget"):
        kv.reserve("c", "a", 1)  # a third whole session does not fit, however short
    assert kv.pop("a") == session_bytes and released == [a.cache]
    assert kv.expire_idle() == [] and kv.total_bytes == session_bytes
    assert step("c", 0, [1]).cache is a.cache  # the freed cache, back from the pool


def test_kept_outputs_follow_the_cache_and_count_against_the_budget(block):
    """A stage keeps what it sent on for a replay: cropped with the cache on a rollback,
    counted in bytes, and a replay past what it holds is a gap."""
    row = block.hidden_size * 4  # float32
    per_position = block.kv_bytes_per_position + row
    kv = KVStore(block.new_cache, bytes_per_position=block.kv_bytes_per_position, budget_bytes=6 * per_position,
                 max_sessions=8, idle_seconds=60.0, output_bytes_per_position=row)

    def run_and_keep(start_pos: int, ids: list[int]) -> torch.Tensor:
        session = kv.reserve("s", "a", start_pos + len(ids))
        output = block.forward(session.cache, start_pos, input_ids=torch.tensor(ids), num_outputs=1)
        kv.keep_outputs(session, start_pos, tensor_data(output))
        kv.record(session, block.cache_length(session.cache))
        return output

    first = run_and_keep(0, PROMPT)
    second = run_and_keep(3, [9, 10])  # a rollback to position 3, then other tokens
    assert kv.total_bytes == 5 * per_position
    kept = torch.frombuffer(bytearray(kv.outputs("s", 0, 5)), dtype=torch.float32).view(5, block.hidden_size)
    assert torch.equal(kept, torch.cat([first[:3], second]))
    assert torch.equal(kept[3:], torch.frombuffer(bytearray(kv.outputs("s", 3, 2)), dtype=torch.float32).view(2, -1))
    with pytest.raises(CacheGapError):
        kv.outputs("s", 0, 6)
    with pytest.raises(CacheGapError):
        kv.outputs("another", 0, 1)
    with pytest.raises(ShardError) as refused:  # the kept outputs count: 7 positions exceed 6
        kv.reserve("s", "a", 7)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
