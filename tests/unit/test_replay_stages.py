"""Which stages compute a replay: from the ring a session's KV was whole in to the new one,
only those that replaced lost stages when every block kept its layers, else all."""

import pytest

from shard.node.ring import stages_to_rebuild

RING = (("s0", "a0", 0, 1), ("s1", "a1", 1, 3), ("s2", "a2", 3, 4), ("s3", "a3", 4, 4))


def replaced(ring, index, node_id="spare"):
    stages = list(ring)
    stages[index] = (node_id, f"{node_id}-address", *ring[index][2:])
    return tuple(stages)


@pytest.mark.parametrize("now, expected", [
    (replaced(RING, 1), (1, 1)),                 # a spare took a middle block
    (replaced(RING, 0), (0, 0)),                 # ... the head's
    (replaced(RING, 3), (3, 3)),                 # ... the tail's
    (replaced(replaced(RING, 1), 2, "other"), (1, 2)),
    (replaced(replaced(RING, 0), 3, "other"), (0, 3)),  # two apart: the range between them
    (RING[:2] + (("s2", "a2", 3, 4),), (0, 2)),  # a stage lost and the survivors re-split
    ((("s0", "a0", 0, 2), ("s1", "a1", 2, 3), *RING[2:]), (0, 3)),  # same nodes, moved blocks
    (RING, (0, 3)),                              # nothing moved: who lost the KV is unknown
])
def test_only_the_replaced_stages_replay_when_the_blocks_stayed(now, expected):
    assert stages_to_rebuild(RING, now) == expected


def test_an_unknown_ring_replays_everywhere():
    assert stages_to_rebuild((), replaced(RING, 1)) == (0, 3)
