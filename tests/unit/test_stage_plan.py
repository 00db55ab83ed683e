"""How a stage reads its place in the ring from a plan."""

from shard.node.stage import assignment_from_plan
from shard.v1 import registry_pb2


def plan(coordinator: tuple[str, str] | None) -> registry_pb2.Plan:
    made = registry_pb2.Plan(version=7)
    made.stages.add(node_id="stage-0", address="10.0.0.1:1", layer_start=0, layer_end=1)
    made.stages.add(node_id="stage-1", address="10.0.0.2:1", layer_start=1, layer_end=2)
    if coordinator:
        made.coordinator_id, made.coordinator_address = coordinator
    return made


def test_the_ends_of_the_ring_face_the_coordinator():
    head = assignment_from_plan(plan(("coordinator", "10.0.0.9:1")), "stage-0")
    tail = assignment_from_plan(plan(("coordinator", "10.0.0.9:1")), "stage-1")
    assert (head.upstream_id, head.downstream_id, head.downstream_address) == ("coordinator", "stage-1", "10.0.0.2:1")
    assert (tail.upstream_id, tail.downstream_id, tail.downstream_address) == ("stage-0", "coordinator", "10.0.0.9:1")
    assert assignment_from_plan(plan(None), "stage-9") is None


def test_a_plan_without_the_coordinator_keeps_the_one_the_stage_knows():
    """A restarted registry adopts the ring before the coordinator rejoins: the tail must
    not start returning results to nobody, nor the head refuse the coordinator's frames."""
    known = {node: assignment_from_plan(plan(("coordinator", "10.0.0.9:1")), node) for node in ("stage-0", "stage-1")}
    head = assignment_from_plan(plan(None), "stage-0", known["stage-0"])
    tail = assignment_from_plan(plan(None), "stage-1", known["stage-1"])
    assert head.upstream_id == "coordinator"
    assert (tail.downstream_id, tail.downstream_address) == ("coordinator", "10.0.0.9:1")
    # Before any coordinator ever joined there is none to keep.
    assert assignment_from_plan(plan(None), "stage-1").downstream_address == ""


def test_a_lost_coordinator_is_forgotten_and_a_new_incarnation_named():
    known = assignment_from_plan(plan(("coordinator", "10.0.0.9:1")), "stage-1")
    lost = plan(None)
    lost.coordinator_lost = True
    forgotten = assignment_from_plan(lost, "stage-1", known)
    assert (forgotten.downstream_id, forgotten.coordinator_incarnation) == ("", "")
    restarted = plan(("coordinator", "10.0.0.9:2"))
    restarted.coordinator_incarnation = "new"
    assert assignment_from_plan(restarted, "stage-1", known).coordinator_incarnation == "new"
