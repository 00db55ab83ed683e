"""Placement and ring order are pure functions: check them against brute force."""

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shard.placement import (
    ModelSizes,
    NodeOffer,
    PlacementError,
    best_coordinator,
    order_ring,
    place,
)


def blocks(placement):
    return [(s.start, s.end) for s in placement.stages]


def ids(placement):
    return [s.node_id for s in placement.stages]


# ---- place ---------------------------------------------------------------------------------


def test_three_times_the_memory_holds_three_times_the_layers_when_memory_binds():
    sizes = ModelSizes((10,) * 40, 10, 10)  # 420 bytes
    placement = place(sizes, [NodeOffer("a", 110), NodeOffer("b", 330)])
    assert blocks(placement) == [(0, 10), (10, 40)]
    assert [s.block_bytes for s in placement.stages] == [110, 310]


def test_equal_speeds_split_evenly_when_memory_is_ample():
    # Memory beyond the block buys no speed: the even split is the fastest.
    placement = place(ModelSizes((10,) * 40, 10, 10), [NodeOffer("a", 1000), NodeOffer("b", 3000)])
    assert blocks(placement) == [(0, 20), (20, 40)]
    assert placement.bottleneck == 210


def test_twice_as_fast_takes_twice_the_layers():
    sizes = ModelSizes((10,) * 30, 0, 0)
    placement = place(sizes, [NodeOffer("a", 10_000, speed=1.0), NodeOffer("b", 10_000, speed=2.0)])
    assert blocks(placement) == [(0, 10), (10, 30)]
    assert placement.bottleneck == 100


def test_twice_as_fast_takes_only_what_fits():
    sizes = ModelSizes((10,) * 30, 0, 0)
    placement = place(sizes, [NodeOffer("a", 10_000, speed=1.0), NodeOffer("b", 150, speed=2.0)])
    assert blocks(placement) == [(0, 15), (15, 30)]


def test_ties_fill_memory_evenly():
    # Every split of 3 layers of 10 over these has bottleneck 20; only [1]/[2] fills
    # the small and the large node to the same fraction.
    sizes = ModelSizes((10, 10, 10), 0, 0)
    placement = place(sizes, [NodeOffer("small", 10), NodeOffer("large", 20)])
    assert blocks(placement) == [(0, 1), (1, 3)]


def test_not_enough_memory_names_the_shortfall():
    with pytest.raises(PlacementError, match=r"needs 90 bytes .* offer 80: 10 bytes short"):
        place(ModelSizes((10,) * 8, 5, 5), [NodeOffer("a", 40), NodeOffer("b", 40)])


def test_contiguity_impossible_names_the_stage_and_its_shortfall():
    # 150 bytes offered for 90, but the 50-byte layer fits only an end node, and with it
    # the head (or the embedding and two layers) must come along.
    sizes = ModelSizes((10, 10, 50, 10), 5, 5)
    nodes = [NodeOffer("a", 60), NodeOffer("b", 30), NodeOffer("c", 60)]
    with pytest.raises(PlacementError, match=r"stage 2 \(c\) would need 65 bytes for layers \[2, 4\) "
                                             r"but offers 60: 5 bytes short"):
        place(sizes, nodes)


def test_a_kv_reservation_takes_room_beside_each_block():
    # 8 layers of 10 bytes + 1 byte of KV per position each: with 5 positions reserved a
    # layer needs 15, and the fast node, which held 6 layers by weights, now holds only 4.
    nodes = [NodeOffer("fast", 60, speed=3.0), NodeOffer("slow", 200)]
    weights = ModelSizes((10,) * 8, 0, 0)
    reserved = ModelSizes((10,) * 8, 0, 0, kv_positions=5, layer_kv_bytes=(1,) * 8)
    assert blocks(place(weights, nodes)) == [(0, 6), (6, 8)]
    assert blocks(place(reserved, nodes)) == [(0, 4), (4, 8)]
    assert reserved.block_bytes(0, 4, first=True, last=False) == 60
    with pytest.raises(PlacementError, match=r"the model with KV for 5 positions needs 120 bytes .* 20 bytes short"):
        place(reserved, [NodeOffer("a", 50), NodeOffer("b", 50)])
    with pytest.raises(PlacementError, match=r"would need 75 bytes for layers \[3, 8\) and their KV"):
        place(reserved, [NodeOffer("a", 45), NodeOffer("b", 74), NodeOffer("c", 1)])


def test_a_unit_larger_than_its_node():
    sizes = ModelSizes((10,), 10, 200)
    with pytest.raises(PlacementError, match=r"stage 1 \(b\) would need 200 bytes .* 50 bytes short"):
        place(sizes, [NodeOffer("a", 150), NodeOffer("b", 150)])


def test_trusted_nodes_move_to_the_ends():
    nodes = [NodeOffer("a", 100), NodeOffer("b", 100, trusted=True), NodeOffer("c", 100),
             NodeOffer("d", 100, trusted=True), NodeOffer("e", 100)]
    placement = place(ModelSizes((10,) * 10, 5, 5), nodes, pin_trusted_ends=True)
    assert ids(placement) == ["b", "a", "c", "e", "d"]
    assert ids(place(ModelSizes((10,) * 10, 5, 5), nodes)) == ["a", "b", "c", "d", "e"]


def test_trusted_nodes_are_used_even_when_slower():
    nodes = [NodeOffer("fast1", 200, 3.0), NodeOffer("slow1", 200, 1.0, trusted=True),
             NodeOffer("fast2", 200, 3.0), NodeOffer("slow2", 200, 1.0, trusted=True)]
    sizes = ModelSizes((10,) * 10, 5, 5)
    placement = place(sizes, nodes, stages=3, pin_trusted_ends=True)
    assert ids(placement) == ["slow1", "fast1", "slow2"]
    assert placement.spares == ("fast2",)
    single = place(sizes, nodes, stages=1, pin_trusted_ends=True)
    assert ids(single) == ["slow1"]


def test_too_few_trusted_nodes():
    nodes = [NodeOffer("a", 100, trusted=True), NodeOffer("b", 100), NodeOffer("c", 100)]
    with pytest.raises(PlacementError, match="needs 2 trusted nodes but 1 is offered"):
        place(ModelSizes((10,) * 4, 5, 5), nodes, pin_trusted_ends=True)
    with pytest.raises(PlacementError, match="needs 1 trusted nodes but 0 are offered"):
        place(ModelSizes((10,) * 4, 5, 5), nodes[1:], stages=1, pin_trusted_ends=True)


def test_spares_are_the_slowest_and_the_rest_keep_ring_order():
    nodes = [NodeOffer("d", 100, 1.0), NodeOffer("c", 100, 2.0), NodeOffer("b", 200, 1.0),
             NodeOffer("a", 100, 2.0)]
    placement = place(ModelSizes((10,) * 8, 5, 5), nodes, stages=3)
    assert ids(placement) == ["c", "b", "a"]  # speed, then memory, then id; given order kept
    assert placement.spares == ("d",)
    assert "spares d" in placement.summary()


def test_more_stages_than_layers():
    sizes = ModelSizes((10, 10), 30, 30)
    placement = place(sizes, [NodeOffer(n, 100) for n in "abcd"])
    assert blocks(placement) == [(0, 0), (0, 1), (1, 2), (2, 2)]
    assert placement.summary().startswith("a embed+[0,0) 30 B | b [0,1) 10 B")
    with pytest.raises(PlacementError, match="only 4 units"):
        place(sizes, [NodeOffer(n, 100) for n in "abcde"])


def test_offers_are_validated():
    with pytest.raises(PlacementError, match="positive, finite speed"):
        NodeOffer("a", 100, speed=0.0)
    with pytest.raises(PlacementError, match="unique"):
        place(ModelSizes((10,), 5, 5), [NodeOffer("a", 100), NodeOffer("a", 100)])
    with pytest.raises(PlacementError, match="asked for 3 stages"):
        place(ModelSizes((10,), 5, 5), [NodeOffer("a", 100)], stages=3)


def brute_force(sizes, used):
    """Every split of the units into len(used) nonempty contiguous blocks that fits:
    (bottleneck, sum of squared fill fractions) of each."""
    units = [sizes.embed_bytes, *sizes.layer_bytes, sizes.head_bytes]
    results = []
    for inner in itertools.combinations(range(1, len(units)), len(used) - 1):
        cuts = [0, *inner, len(units)]
        block_bytes = [sum(units[a:b]) for a, b in zip(cuts, cuts[1:])]
        if all(b <= n.memory_bytes for b, n in zip(block_bytes, used)):
            results.append((max(b / n.speed for b, n in zip(block_bytes, used)),
                            sum((b / n.memory_bytes) ** 2 for b, n in zip(block_bytes, used))))
    return results


offers = st.builds(NodeOffer, node_id=st.just(""), memory_bytes=st.integers(1, 250),
                   speed=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]), trusted=st.booleans())


@settings(max_examples=300, deadline=None)
@given(layers=st.lists(st.integers(0, 20), max_size=10), embed=st.integers(0, 40),
       head=st.integers(0, 40), raw_nodes=st.lists(offers, min_size=1, max_size=5),
       data=st.data())
def test_placement_is_exact_contiguous_and_fits(layers, embed, head, raw_nodes, data):
    sizes = ModelSizes(tuple(layers), embed, head)
    nodes = [NodeOffer(f"n{i}", n.memory_bytes, n.speed, n.trusted) for i, n in enumerate(raw_nodes)]
    count = data.draw(st.integers(1, len(nodes)))
    pin = data.draw(st.booleans())
    try:
        placement = place(sizes, nodes, stages=count, pin_trusted_ends=pin)
    except PlacementError:
        if not pin and count <= sizes.num_layers + 2:  # then only when no split fits
            best = sorted(nodes, key=lambda n: (-n.speed, -n.memory_bytes, n.node_id))[:count]
            assert brute_force(sizes, [n for n in nodes if n in best]) == []
        return

    stages = placement.stages
    assert len(stages) == count
    assert sorted([s.node_id for s in stages] + list(placement.spares)) == sorted(n.node_id for n in nodes)
    # Contiguous, every layer exactly once, embedding first and head last.
    assert stages[0].start == 0 and stages[-1].end == sizes.num_layers
    assert all(a.end == b.start for a, b in zip(stages, stages[1:]))
    assert all(s.start <= s.end for s in stages)
    assert [s.first for s in stages] == [True] + [False] * (count - 1)
    assert [s.last for s in stages] == [False] * (count - 1) + [True]
    by_id = {n.node_id: n for n in nodes}
    used = [by_id[s.node_id] for s in stages]
    assert all(s.block_bytes <= by_id[s.node_id].memory_bytes for s in stages)
    assert sum(s.block_bytes for s in stages) == sizes.total_bytes
    if pin:
        assert used[0].trusted and used[-1].trusted
    else:  # the used nodes keep their given ring order
        assert used == [n for n in nodes if n in used]
    # Exactly optimal, and the most even fill among the optimal.
    splits = brute_force(sizes, used)
    optimum = min(b for b, _ in splits)
    assert placement.bottleneck == optimum
    fill = sum((s.block_bytes / by_id[s.node_id].memory_bytes) ** 2 for s in stages)
    assert math.isclose(fill, min(f for b, f in splits if b == optimum))


# ---- ring order -----------------------------------------------------------------------------


def random_rtt(rng, names):
    """Asymmetric-ish measurements: each direction is the link's delay with jitter."""
    rtt = {}
    for a, b in itertools.combinations(names, 2):
        base = rng.uniform(1, 100)
        rtt[a, b], rtt[b, a] = base * rng.uniform(0.9, 1.1), base * rng.uniform(0.9, 1.1)
    return rtt


def ring_cost(rtt, coordinator, order):
    ring = [coordinator, *order]
    return sum((rtt[a, b] + rtt[b, a]) / 2 for a, b in zip(ring, ring[1:] + ring[:1]))


def brute_force_ring(rtt, coordinator, stages):
    return min(ring_cost(rtt, coordinator, order) for order in itertools.permutations(stages))


@pytest.mark.parametrize("n", range(2, 8))
def test_ring_order_is_exact(n):
    for seed in range(5):
        rng = random.Random(seed * 100 + n)
        stages = [f"s{i}" for i in range(n)]
        rtt = random_rtt(rng, ["coord", *stages])
        ring = order_ring(rtt, stages, "coord")
        assert ring.exact and ring.unmeasured == ()
        assert sorted(ring.order) == stages
        assert math.isclose(ring.total_rtt, ring_cost(rtt, "coord", ring.order))
        assert math.isclose(ring.total_rtt, brute_force_ring(rtt, "coord", stages))


@pytest.mark.parametrize("n,seed", [(8, 0), (8, 1), (8, 2), (8, 3), (9, 0), (9, 1)])
def test_ring_heuristic_is_close(n, seed):
    rng = random.Random(seed)
    stages = [f"s{i}" for i in range(n)]
    rtt = random_rtt(rng, ["coord", *stages])
    ring = order_ring(rtt, stages, "coord", exact_up_to=0)
    assert not ring.exact and sorted(ring.order) == sorted(stages)
    assert ring.total_rtt <= 1.03 * brute_force_ring(rtt, "coord", stages)


def test_ring_heuristic_beyond_the_exact_limit():
    stages = [f"s{i}" for i in range(14)]
    ring = order_ring(random_rtt(random.Random(7), ["coord", *stages]), stages, "coord")
    assert not ring.exact and sorted(ring.order) == sorted(stages)


def test_ring_avoids_unmeasured_links():
    # Nothing measured between coord and b, or between a and c: b must sit in the middle.
    rtt = {("coord", "a"): 50, ("a", "b"): 50, ("b", "c"): 50, ("c", "coord"): 50,
           ("b", "a"): 50, ("coord", "c"): 50, ("x", "a"): 1}
    ring = order_ring(rtt, ["a", "b", "c"], "coord")
    assert ring.order[1] == "b" and ring.unmeasured == ()
    assert ring.total_rtt == 200


def test_ring_with_nothing_measured():
    ring = order_ring({}, ["a", "b"], "coord")
    assert sorted(ring.order) == ["a", "b"]
    assert ring.total_rtt == 0 and len(ring.unmeasured) == 3


def test_one_direction_is_enough_and_two_are_averaged():
    assert order_ring({("a", "coord"): 5.0}, ["a"], "coord").total_rtt == 10
    assert order_ring({("coord", "a"): 4.0, ("a", "coord"): 6.0}, ["a"], "coord").total_rtt == 10


def test_best_coordinator_sits_with_the_stages():
    # Stages on a line at 0, 1, 2; one candidate far away, one on s1's machine.
    where = {"far": 100, "s0": 0, "s1": 1, "s2": 2}
    rtt = {(a, b): abs(where[a] - where[b]) for a, b in itertools.permutations(where, 2)}
    ring = best_coordinator(rtt, ["far", "s1"], ["s0", "s1", "s2"])
    assert ring.coordinator_id == "s1" and ring.total_rtt == 4
    assert order_ring(rtt, ["s0", "s1", "s2"], "far").total_rtt == 200
