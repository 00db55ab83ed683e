"""The registry's bookkeeping without a network: planning from joins, heartbeats and
measured round trips; fail-over plans; adoption of a running ring after a restart."""

import asyncio

import pytest

from shard.node.registry import RegistryState
from shard.placement import ModelSizes
from shard.v1 import registry_pb2

SIZES = ModelSizes(layer_bytes=(100,) * 8, embed_bytes=50, head_bytes=50)


def state(stages=3, **kwargs) -> RegistryState:
    return RegistryState(sizes=SIZES, model_fingerprint="f", min_stages=stages, **kwargs)


def join(registry, node_id, role=registry_pb2.ROLE_STAGE, memory=10_000, speed=1.0, trust="", serving=None):
    registry.join(registry_pb2.NodeCapabilities(
        node_id=node_id, role=role, address=f"{node_id}:1", memory_budget_bytes=memory, speed=speed,
        trust=trust, model_fingerprint="f"), serving)


def ring(registry) -> list[tuple[str, int, int]]:
    return [(s.node_id, s.layer_start, s.layer_end) for s in registry.plan.stages]


def test_the_ring_follows_measured_round_trips():
    registry = state(rtt_wait_seconds=60)
    join(registry, "coordinator", role=registry_pb2.ROLE_COORDINATOR)
    for node in ("a", "b", "c"):
        join(registry, node)
    assert registry.plan.problem == "measuring round trips between members" and not registry.plan.stages
    # a and c sit together, far from b; the coordinator is next to a and b.
    far, near = 0.080, 0.002
    table = {("coordinator", "a"): near, ("coordinator", "b"): near, ("coordinator", "c"): far,
             ("a", "b"): far, ("a", "c"): near, ("b", "c"): near}
    for (x, y), seconds in table.items():
        registry.heartbeat(x, registry_pb2.NODE_STATE_LOADING, 0, {y: seconds})
    assert [node for node, *_ in ring(registry)] in (["a", "c", "b"], ["b", "c", "a"])
    assert registry.plan.ring_rtt_seconds == pytest.approx(4 * near)
    assert {m.node_id for m in registry.plan.members} == {"coordinator", "a", "b", "c"}


def test_heterogeneous_speeds_and_memory():
    registry = state(2, rtt_wait_seconds=0)
    join(registry, "fast", speed=3.0)
    join(registry, "slow", speed=1.0)
    blocks = {node: end - start for node, start, end in ring(registry)}
    assert blocks["fast"] > blocks["slow"] and sum(blocks.values()) == 8


def test_not_enough_memory_names_the_shortfall():
    registry = state(2, rtt_wait_seconds=0)
    join(registry, "a", memory=300)
    join(registry, "b", memory=300)
    assert not registry.plan.stages
    assert "bytes short" in registry.plan.problem and "900" in registry.plan.problem


def test_trusted_nodes_hold_the_ends():
    registry = state(3, rtt_wait_seconds=0, pin_trusted_ends=True)
    join(registry, "a")
    join(registry, "b", trust="trusted")
    join(registry, "c", trust="trusted")
    nodes = [node for node, *_ in ring(registry)]
    assert {nodes[0], nodes[-1]} == {"b", "c"}


def test_a_spare_takes_the_lost_block_and_the_rest_stay():
    registry = state(2, rtt_wait_seconds=0)
    join(registry, "a")
    join(registry, "b")
    join(registry, "spare")
    before = ring(registry)
    registry.leave("b")
    after = ring(registry)
    assert after[0] == before[0] and after[1] == ("spare", *before[1][1:])


def test_survivors_resplit_without_a_spare():
    registry = state(3, rtt_wait_seconds=0)
    for node in ("a", "b", "c"):
        join(registry, node)
    registry.leave("b")
    after = ring(registry)
    assert [node for node, *_ in after] == ["a", "c"]
    assert after[0][1] == 0 and after[-1][2] == 8 and after[0][2] == after[1][1]


def test_a_restarted_registry_adopts_the_running_ring():
    def serving(index, start, end):
        return registry_pb2.ServingBlock(plan_version=7, ring_index=index, ring_size=2,
                                         layer_start=start, layer_end=end, serving=True)

    registry = state(2, rtt_wait_seconds=0)
    # b was the head with more layers; a fresh plan by id would put a first.
    join(registry, "b", serving=serving(0, 0, 6))
    assert not registry.plan.stages  # waits for the rest of the running ring
    join(registry, "a", serving=serving(1, 6, 8))
    assert ring(registry) == [("b", 0, 6), ("a", 6, 8)]
    assert registry.plan.version > 7


def test_the_plan_names_the_coordinator_incarnation_and_says_when_it_is_lost():
    registry = state(2, rtt_wait_seconds=0)
    join(registry, "a")
    join(registry, "b")
    assert not registry.plan.coordinator_lost  # none has joined yet: nothing to drop
    registry.join(registry_pb2.NodeCapabilities(node_id="coordinator", role=registry_pb2.ROLE_COORDINATOR,
                                                address="c:1", model_fingerprint="f", incarnation="one"))
    assert (registry.plan.coordinator_id, registry.plan.coordinator_incarnation) == ("coordinator", "one")
    # Restarted under the same id before its lease ran out: the new incarnation is named.
    registry.join(registry_pb2.NodeCapabilities(node_id="coordinator", role=registry_pb2.ROLE_COORDINATOR,
                                                address="c:2", model_fingerprint="f", incarnation="two"))
    assert registry.plan.coordinator_incarnation == "two" and not registry.plan.coordinator_lost
    registry.nodes["coordinator"].lease_deadline = 0  # its lease ran out
    registry.expire()
    assert (registry.plan.coordinator_id, registry.plan.coordinator_incarnation) == ("", "")
    assert registry.plan.coordinator_lost
    registry.join(registry_pb2.NodeCapabilities(node_id="coordinator", role=registry_pb2.ROLE_COORDINATOR,
                                                address="c:3", model_fingerprint="f", incarnation="three"))
    assert registry.plan.coordinator_incarnation == "three" and not registry.plan.coordinator_lost


def test_a_stage_that_comes_back_grows_the_ring_again():
    registry = state(3, rtt_wait_seconds=0)
    for node in ("a", "b", "c"):
        join(registry, node)
    registry.leave("b")
    assert [node for node, *_ in ring(registry)] == ["a", "c"]
    join(registry, "b")
    after = ring(registry)
    assert [node for node, *_ in after] == ["a", "b", "c"]
    assert after[0][1] == 0 and after[-1][2] == 8 and not registry.plan.ready  # b loads first


def test_a_spare_beyond_the_wanted_ring_stays_spare():
    registry = state(2, rtt_wait_seconds=0)
    join(registry, "a")
    join(registry, "b")
    before = ring(registry)
    join(registry, "spare")
    assert ring(registry) == before


def test_a_stage_restarted_within_its_lease_is_given_its_block_again():
    registry = state(2, rtt_wait_seconds=0)
    join(registry, "a")
    join(registry, "b")
    version = registry.assigned_version
    # b's new process joins at a new address, serving nothing: its block must be reloaded.
    registry.join(registry_pb2.NodeCapabilities(node_id="b", role=registry_pb2.ROLE_STAGE, address="b:2",
                                                memory_budget_bytes=10_000, speed=1.0, model_fingerprint="f"))
    assert registry.assigned_version > version
    assert {s.node_id: s.address for s in registry.plan.stages}["b"] == "b:2"


def probe(alive: bool, calls: list):
    async def answers(member):
        calls.append(member.node_id)
        await asyncio.sleep(0.01)
        return alive

    return answers


def test_a_reported_node_that_answers_the_probe_stays():
    registry = state(2, rtt_wait_seconds=0)
    join(registry, "a")
    join(registry, "b")
    before, calls = ring(registry), []
    assert asyncio.run(registry.report_unreachable("b", probe(True, calls))) is False
    assert ring(registry) == before and "b" in registry.nodes and calls == ["b"]


def test_a_reported_node_that_does_not_answer_is_dropped_at_once():
    registry = state(2, rtt_wait_seconds=0)
    join(registry, "a")
    join(registry, "b")
    join(registry, "spare")
    calls = []

    async def two_reports():
        return await asyncio.gather(registry.report_unreachable("b", probe(False, calls)),
                                    registry.report_unreachable("b", probe(False, calls)))

    assert asyncio.run(two_reports()) == [True, True]
    assert calls == ["b"]  # reports while a probe runs share it
    assert "b" not in registry.nodes and [node for node, *_ in ring(registry)] == ["a", "spare"]
    assert asyncio.run(registry.report_unreachable("b", probe(False, calls))) is True  # already out
    assert calls == ["b"]


def test_a_kv_reservation_is_planned_from_the_checkpoint(tinystories_dir):
    """`shard registry --kv-reserve-positions N`: each layer needs its weights and N
    positions of K and V at the checkpoint's dtype; stages that hold the weights but not
    that much KV beside them get no plan, and the plan says why."""
    from services.registry.main import model_sizes
    from shard.model.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(tinystories_dir)
    per_position = 2 * 4 * 16 * 4  # K and V, 4 KV heads of 16 float32s, per layer
    weights = model_sizes(checkpoint)
    reserved = model_sizes(checkpoint, 100)
    for start, end in ((0, 1), (1, 2)):
        ends = dict(first=start == 0, last=end == 2)
        assert reserved.block_bytes(start, end, **ends) == weights.block_bytes(start, end, **ends) + 100 * per_position
    budget = max(reserved.block_bytes(0, 1, first=True, last=False), reserved.block_bytes(1, 2, first=False, last=True))
    for positions, planned in ((100, True), (200, False)):
        registry = RegistryState(sizes=model_sizes(checkpoint, positions), model_fingerprint="f", min_stages=2,
                                 rtt_wait_seconds=0)
        join(registry, "coordinator", role=registry_pb2.ROLE_COORDINATOR)
        for node in ("a", "b"):
            join(registry, node, memory=budget)
        assert bool(registry.plan.stages) == planned, registry.plan.problem
        if not planned:
            assert "with KV for 200 positions" in registry.plan.problem
