"""Which node holds which layers: pure functions over half-open ranges [start, end).

The model is a row of units: the embedding, decoder layers 0..L-1, then the head (final
norm + lm_head). Stage 0 always holds the embedding and the last stage the head, since the
coordinator sends token ids in and the tail sends argmax ids back. Cutting the row of
units (rather than of layers) lets a ring have more stages than layers: a stage may hold
only the head, which for a large vocabulary weighs as much as several layers.

place sizes blocks to the nodes' speeds within their memory and picks spares; order_ring orders the stages by
measured RTTs and best_coordinator says where the coordinator should run.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass


# How a plan's problem begins when no placement fits the stages that joined (the registry
# prefixes a PlacementError with it): nodes and `shard up` tell it from waiting.
NO_FIT = "the model does not fit the stages"


class PlacementError(ValueError):
    """The model cannot be placed on the nodes offered."""


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each piece of the model, from the checkpoint headers. With `kv_positions`,
    each layer also needs room for that many positions of KV cache (`layer_kv_bytes` per
    position): a stage is then placed only where a session of that length fits beside
    its weights."""

    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    kv_positions: int = 0
    layer_kv_bytes: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def layer_needs(self) -> tuple[int, ...]:
        """Each layer's weights, and its reserved KV."""
        if not self.kv_positions:
            return self.layer_bytes
        return tuple(w + self.kv_positions * kv for w, kv in zip(self.layer_bytes, self.layer_kv_bytes, strict=True))

    @property
    def what(self) -> str:
        """What the byte counts below are of, in words."""
        return f"the model with KV for {self.kv_positions} positions" if self.kv_positions else "the model"

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_needs) + self.embed_bytes + self.head_bytes

    def block_bytes(self, start: int, end: int, *, first: bool, last: bool) -> int:
        return (
            sum(self.layer_needs[start:end])
            + (self.embed_bytes if first else 0)
            + (self.head_bytes if last else 0)
        )


def _unit_cuts_to_layer_blocks(cuts: list[int], num_layers: int) -> list[tuple[int, int]]:
    # Unit u is layer u-1 (unit 0 is the embedding, unit L+1 the head).
    blocks, start_unit = [], 0
    for end_unit in cuts:
        start = min(max(start_unit - 1, 0), num_layers)
        end = min(max(end_unit - 1, 0), num_layers)
        blocks.append((start, end))
        start_unit = end_unit
    return blocks


# ---- heterogeneous placement ---------------------------------------------------------


@dataclass(frozen=True)
class NodeOffer:
    """What a stage node offers: memory for weights and a relative speed (2.0 = twice as
    fast at the same work), plus whether it may see the user's tokens."""

    node_id: str
    memory_bytes: int
    speed: float = 1.0
    trusted: bool = False

    def __post_init__(self):
        if self.memory_bytes <= 0:
            raise PlacementError(f"{self.node_id} needs a positive memory budget")
        if not (0 < self.speed < math.inf):
            raise PlacementError(f"{self.node_id} needs a positive, finite speed, not {self.speed}")


@dataclass(frozen=True)
class StagePlan:
    node_id: str
    start: int  # decoder layers [start, end)
    end: int
    first: bool  # holds the embedding
    last: bool  # holds the final norm and lm_head
    block_bytes: int


@dataclass(frozen=True)
class Placement:
    stages: tuple[StagePlan, ...]  # in ring order
    spares: tuple[str, ...]  # offered but unused, best first
    # The objective: the largest block bytes / speed, i.e. the slowest stage's time in
    # units where a node of speed 1.0 works through one byte per unit of time.
    bottleneck: float

    def summary(self) -> str:
        parts = []
        for stage in self.stages:
            units = "+".join(["embed"] * stage.first + [f"[{stage.start},{stage.end})"]
                             + ["head"] * stage.last)
            parts.append(f"{stage.node_id} {units} {stage.block_bytes} B")
        spares = f"; spares {', '.join(self.spares)}" if self.spares else ""
        return f"{' | '.join(parts)}; bottleneck {self.bottleneck:.4g}{spares}"


def place(sizes: ModelSizes, nodes: list[NodeOffer], *, stages: int | None = None,
          pin_trusted_ends: bool = False) -> Placement:
    """Contiguous blocks for `stages` of the `nodes` (None: all), which come in ring order.

    Minimises the slowest stage's time, max(block bytes / speed), subject to every block
    fitting its node's memory; among equally slow splits, the one whose memory use is most
    even (least sum of squared fill fractions), then the latest cuts. Bytes stand in for
    work: decoding small batches is bound by reading weights, so a block's time follows
    its bytes (the embedding is overcounted: a lookup reads only a few rows).

    The `stages` best nodes (speed, then memory, then id) are used in their given ring
    order; the rest are spares. With `pin_trusted_ends` the first and last stages, which
    see token ids and produce them, go to trusted nodes: the best trusted nodes are always
    among those used, and the first and last trusted of them move to the ends.
    """
    if not nodes:
        raise PlacementError("no stage has joined")
    if len({node.node_id for node in nodes}) != len(nodes):
        raise PlacementError("node ids must be unique")
    count = len(nodes) if stages is None else stages
    if not 1 <= count <= len(nodes):
        raise PlacementError(f"asked for {count} stages but {len(nodes)} nodes are offered")
    units = [sizes.embed_bytes, *sizes.layer_needs, sizes.head_bytes]
    if count > len(units):
        raise PlacementError(
            f"{count} stages but the model has only {len(units)} units "
            f"(embedding, {sizes.num_layers} layers, head) to share"
        )

    ranked = sorted(nodes, key=lambda n: (-n.speed, -n.memory_bytes, n.node_id))
    chosen = ranked[:count]
    if pin_trusted_ends:
        needed = min(2, count)
        trusted = [n for n in ranked if n.trusted][:needed]
        if len(trusted) < needed:
            raise PlacementError(
                f"pinning the ends needs {needed} trusted nodes but {len(trusted)} "
                f"{'is' if len(trusted) == 1 else 'are'} offered"
            )
        chosen = trusted + [n for n in ranked if n not in trusted][: count - needed]
    used = [n for n in nodes if n in chosen]
    if pin_trusted_ends:
        used = _trusted_at_ends(used)
    spares = tuple(n.node_id for n in ranked if n not in chosen)

    offered = sum(n.memory_bytes for n in used)
    if sizes.total_bytes > offered:
        raise PlacementError(
            f"{sizes.what} needs {sizes.total_bytes} bytes but the {count} stages used offer "
            f"{offered}: {sizes.total_bytes - offered} bytes short"
        )

    prefix = list(itertools.accumulate(units, initial=0))

    def fits(s: int, i: int, j: int) -> bool:
        return prefix[j] - prefix[i] <= used[s].memory_bytes

    def time(s: int, i: int, j: int) -> float:
        return (prefix[j] - prefix[i]) / used[s].speed

    bottleneck, _ = _best_split(prefix, count,
                                lambda s, i, j: time(s, i, j) if fits(s, i, j) else None, max)
    if bottleneck == math.inf:
        raise PlacementError(_closest_misfit(sizes, prefix, used))
    # Among the splits as fast as the best, fill memory most evenly.
    _, cuts = _best_split(
        prefix, count,
        lambda s, i, j: ((prefix[j] - prefix[i]) / used[s].memory_bytes) ** 2
        if fits(s, i, j) and time(s, i, j) <= bottleneck else None,
        operator.add,
    )
    blocks = _unit_cuts_to_layer_blocks(cuts, sizes.num_layers)
    plans = [
        StagePlan(node.node_id, start, end, first=index == 0, last=index == count - 1,
                  block_bytes=sizes.block_bytes(start, end, first=index == 0, last=index == count - 1))
        for index, (node, (start, end)) in enumerate(zip(used, blocks))
    ]
    return Placement(tuple(plans), spares, bottleneck)


def _trusted_at_ends(used: list[NodeOffer]) -> list[NodeOffer]:
    # Callers guarantee enough trusted nodes; everyone else keeps their relative order.
    if len(used) == 1:
        return used
    head = next(n for n in used if n.trusted)
    tail = next(n for n in reversed(used) if n.trusted and n is not head)
    return [head, *(n for n in used if n is not head and n is not tail), tail]


def _best_split(prefix: list[int], count: int, cost: Callable[[int, int, int], float | None],
                combine: Callable[[float, float], float]) -> tuple[float, list[int]]:
    """Cut units [0, U) into `count` nonempty contiguous blocks minimising the `combine`
    (max or add) of cost(stage, start_unit, end_unit); cost None forbids a block and must
    also forbid every larger block with the same end. Returns (value, end unit of each
    block); value is inf when no split is allowed. DP over (stage, end unit): O(S*U^2)."""
    total_units = len(prefix) - 1
    best = [[math.inf] * (total_units + 1) for _ in range(count)]
    choice = [[0] * (total_units + 1) for _ in range(count)]
    for s in range(count):
        # Every later stage needs at least one unit.
        for j in range(s + 1, total_units - (count - 1 - s) + 1):
            if s == 0:
                value = cost(0, 0, j)
                best[0][j] = math.inf if value is None else value
                continue
            for i in range(j - 1, s - 1, -1):  # this block grows as i falls
                value = cost(s, i, j)
                if value is None:
                    break
                if best[s - 1][i] < math.inf:
                    total = combine(best[s - 1][i], value)
                    if total < best[s][j]:
                        best[s][j], choice[s][j] = total, i
    cuts = [total_units]
    for s in range(count - 1, 0, -1):
        cuts.append(choice[s][cuts[-1]])
    return best[count - 1][total_units], cuts[::-1]


def _closest_misfit(sizes: ModelSizes, prefix: list[int], used: list[NodeOffer]) -> str:
    """Why no contiguous split fits: the split whose worst overflow is least, and the
    stages it overflows."""
    _, cuts = _best_split(
        prefix, len(used), lambda s, i, j: max(0, prefix[j] - prefix[i] - used[s].memory_bytes), max)
    problems = []
    blocks = _unit_cuts_to_layer_blocks(cuts, sizes.num_layers)
    for index, (node, (start, end)) in enumerate(zip(used, blocks)):
        need = sizes.block_bytes(start, end, first=index == 0, last=index == len(used) - 1)
        if need > node.memory_bytes:
            problems.append(f"stage {index} ({node.node_id}) would need {need} bytes for layers "
                            f"[{start}, {end}){' and their KV' if sizes.kv_positions else ''} but offers "
                            f"{node.memory_bytes}: "
                            f"{need - node.memory_bytes} bytes short")
    return "no contiguous split fits; the closest: " + "; ".join(problems)


# ---- ring order ------------------------------------------------------------------------

EXACT_RING_UP_TO = 10  # Held-Karp is O(2^n n^2): instant at 10 stages, slow past ~15


@dataclass(frozen=True)
class RingOrder:
    """coordinator -> order[0] -> ... -> order[-1] -> coordinator."""

    coordinator_id: str
    order: tuple[str, ...]
    total_rtt: float  # sum of the measured RTTs of the ring's links
    unmeasured: tuple[tuple[str, str], ...]  # links with no RTT either way, not in total_rtt
    exact: bool  # proven shortest (Held-Karp), not a heuristic's answer


def order_ring(rtt: Mapping[tuple[str, str], float], stage_ids: list[str], coordinator_id: str,
               *, exact_up_to: int = EXACT_RING_UP_TO) -> RingOrder:
    """The ring order of `stage_ids` with the least total RTT, counting both links that
    touch the coordinator. rtt[(a, b)] and rtt[(b, a)] measure the same link (averaged
    when both are known); a link measured in neither direction may be used only when
    every ring needs such links, and rings with fewer of them always win. A stage id
    equal to coordinator_id shares its machine: that link costs nothing. Exact up to
    `exact_up_to` stages, a local search beyond (see _heuristic_tour)."""
    if not stage_ids:
        raise PlacementError("no stages to order")
    if len(set(stage_ids)) != len(stage_ids):
        raise PlacementError("stage ids must be unique")
    ids = [coordinator_id, *stage_ids]  # position 0 is the coordinator
    cost, measured = _link_costs(rtt, ids)
    exact = len(stage_ids) <= exact_up_to
    tour = _held_karp(cost) if exact else _heuristic_tour(cost)
    links = list(zip(tour, tour[1:] + [0]))
    return RingOrder(
        coordinator_id=coordinator_id,
        order=tuple(ids[p] for p in tour[1:]),
        total_rtt=sum(cost[p][q] for p, q in links if measured[p][q]),
        unmeasured=tuple((ids[p], ids[q]) for p, q in links if not measured[p][q]),
        exact=exact,
    )


def ring_rtt(rtt: Mapping[tuple[str, str], float], order: list[str], coordinator_id: str) -> float:
    """The total measured RTT of the given ring order (links measured in neither
    direction count the same penalty as in order_ring)."""
    ids = [coordinator_id, *order]
    cost, _ = _link_costs(rtt, ids)
    return sum(cost[p][(p + 1) % len(ids)] for p in range(len(ids)))


def best_coordinator(rtt: Mapping[tuple[str, str], float], candidate_ids: list[str],
                     stage_ids: list[str], *, exact_up_to: int = EXACT_RING_UP_TO) -> RingOrder:
    """The shortest ring over all places the coordinator could run (e.g. any stage's
    machine); ties go to the earlier candidate."""
    if not candidate_ids:
        raise PlacementError("no place to run the coordinator")
    rings = [order_ring(rtt, stage_ids, c, exact_up_to=exact_up_to) for c in candidate_ids]
    return min(rings, key=lambda ring: (len(ring.unmeasured), ring.total_rtt))


def _link_costs(rtt: Mapping[tuple[str, str], float],
                ids: list[str]) -> tuple[list[list[float]], list[list[bool]]]:
    """Symmetric link costs between positions of `ids`, and which were measured. An
    unmeasured link costs more than any ring of measured links can, so the fewest are used."""
    samples: dict[frozenset, list[float]] = {}
    for (a, b), value in rtt.items():
        if a != b and a in ids and b in ids:
            samples.setdefault(frozenset((a, b)), []).append(value)
    link = {pair: sum(values) / len(values) for pair, values in samples.items()}
    penalty = 1.0 + 2 * sum(link.values())
    size = len(ids)
    cost = [[0.0] * size for _ in range(size)]
    measured = [[True] * size for _ in range(size)]
    for p, q in itertools.permutations(range(size), 2):
        if ids[p] != ids[q]:
            pair = frozenset((ids[p], ids[q]))
            measured[p][q] = pair in link
            cost[p][q] = link.get(pair, penalty)
    return cost, measured


def _held_karp(cost: list[list[float]]) -> list[int]:
    """Shortest tour from position 0 through every other position and back."""
    n = len(cost) - 1
    full = (1 << n) - 1
    # best[mask][j]: shortest path from 0 through the stages in mask, ending at stage j.
    best = [[math.inf] * n for _ in range(full + 1)]
    parent = [[-1] * n for _ in range(full + 1)]
    for j in range(n):
        best[1 << j][j] = cost[0][j + 1]
    for mask in range(1, full + 1):
        for j in range(n):
            here = best[mask][j]
            if here == math.inf:
                continue
            for k in range(n):
                if not mask & (1 << k):
                    nxt, value = mask | (1 << k), here + cost[j + 1][k + 1]
                    if value < best[nxt][k]:
                        best[nxt][k], parent[nxt][k] = value, j
    last = min(range(n), key=lambda j: best[full][j] + cost[j + 1][0])
    path, mask = [], full
    while last != -1:
        path.append(last + 1)
        mask, last = mask ^ (1 << last), parent[mask][last]
    return [0, *path[::-1]]


def _heuristic_tour(cost: list[list[float]]) -> list[int]:
    """Nearest-neighbour tours, one starting from each stage, each polished by 2-opt and
    Or-opt moves until neither helps; the shortest wins. Several starts matter when RTTs
    break the triangle inequality, as internet routes do."""
    tolerance = 1e-12 * sum(map(sum, cost))  # ignore gains that are float noise
    tours = []
    for first in range(1, len(cost)):
        tour = _nearest_neighbour(cost, first)
        while _two_opt_move(cost, tour, tolerance) or _or_opt_move(cost, tour, tolerance):
            pass
        tours.append(tour)
    return min(tours, key=lambda tour: sum(cost[p][q] for p, q in zip(tour, tour[1:] + [0])))


def _nearest_neighbour(cost: list[list[float]], first: int) -> list[int]:
    tour, left = [0, first], set(range(1, len(cost))) - {first}
    while left:
        nearest = min(left, key=lambda q: (cost[tour[-1]][q], q))
        tour.append(nearest)
        left.remove(nearest)
    return tour


def _two_opt_move(cost: list[list[float]], tour: list[int], tolerance: float) -> bool:
    """Reverse the first stretch of the tour whose reversal shortens it (links are
    symmetric, so only the two end links change); False if none does."""
    size = len(tour)
    for i in range(1, size - 1):  # position 0, the coordinator, stays first
        for k in range(i + 1, size):
            a, b, c, d = tour[i - 1], tour[i], tour[k], tour[(k + 1) % size]
            if cost[a][c] + cost[b][d] < cost[a][b] + cost[c][d] - tolerance:
                tour[i:k + 1] = tour[i:k + 1][::-1]
                return True
    return False


def _or_opt_move(cost: list[list[float]], tour: list[int], tolerance: float) -> bool:
    """Move the first stretch of 1 to 3 stages that fits better between two other
    neighbours (either way round); False if none does."""
    size = len(tour)
    for length in (1, 2, 3):
        for i in range(1, size - length + 1):
            piece, rest = tour[i:i + length], tour[:i] + tour[i + length:]
            saved = cost[tour[i - 1]][piece[0]] + cost[piece[-1]][tour[(i + length) % size]] \
                - cost[tour[i - 1]][tour[(i + length) % size]]
            for k, x in enumerate(rest):
                y = rest[(k + 1) % len(rest)]
                for way in (piece, piece[::-1]):
                    if cost[x][way[0]] + cost[way[-1]][y] - cost[x][y] < saved - tolerance:
                        tour[:] = rest[:k + 1] + way + rest[k + 1:]
                        return True
    return False
