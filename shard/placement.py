"""Which node holds which layers: pure functions over half-open ranges [start, end).

The model is a row of units: the embedding, decoder layers 0..L-1, then the head (final
norm + lm_head). Stage 0 always holds the embedding and the last stage the head, since the
coordinator sends token ids in and the tail sends argmax ids back. Cutting the row of
units (rather than of layers) lets a ring have more stages than layers: a stage may hold
only the head, which for a large vocabulary weighs as much as several layers.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    """The model cannot be placed on the nodes offered."""


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each piece of the model, from the checkpoint headers."""

    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes

    def block_bytes(self, start: int, end: int, *, first: bool, last: bool) -> int:
        return (
            sum(self.layer_bytes[start:end])
            + (self.embed_bytes if first else 0)
            + (self.head_bytes if last else 0)
        )


def assign_blocks(sizes: ModelSizes, budgets: list[int]) -> list[tuple[int, int]]:
    """Contiguous layer blocks, one per budget in ring order, sized in proportion to the
    budgets; every layer exactly once. Raises PlacementError naming the shortfall."""
    stages = len(budgets)
    if stages == 0:
        raise PlacementError("no stage has joined")
    if any(budget <= 0 for budget in budgets):
        raise PlacementError("every stage needs a positive memory budget")
    units = [sizes.embed_bytes, *sizes.layer_bytes, sizes.head_bytes]
    if stages > len(units):
        raise PlacementError(
            f"{stages} stages but the model has only {len(units)} units "
            f"(embedding, {sizes.num_layers} layers, head) to share"
        )
    shortfall = sizes.total_bytes - sum(budgets)
    if shortfall > 0:
        raise PlacementError(
            f"the model needs {sizes.total_bytes} bytes but the stages offer {sum(budgets)}: "
            f"{shortfall} bytes short"
        )
    cuts = _proportional_cuts(units, budgets)
    blocks = _unit_cuts_to_layer_blocks(cuts, sizes.num_layers)
    for index, ((start, end), budget) in enumerate(zip(blocks, budgets)):
        need = sizes.block_bytes(start, end, first=index == 0, last=index == stages - 1)
        if need > budget:
            raise PlacementError(
                f"stage {index} would need {need} bytes for layers [{start}, {end}) "
                f"but offers {budget}: {need - budget} bytes short"
            )
    return blocks


def _proportional_cuts(units: list[int], budgets: list[int]) -> list[int]:
    """Unit indices where each stage ends, placing each cut nearest the budget share of
    the cumulative bytes while leaving at least one unit for every stage."""
    total_units, total_bytes, total_budget = len(units), sum(units), sum(budgets)
    prefix = [0]
    for size in units:
        prefix.append(prefix[-1] + size)
    cuts, budget_so_far, previous = [], 0, 0
    for index, budget in enumerate(budgets[:-1]):
        budget_so_far += budget
        target = total_bytes * budget_so_far / total_budget
        lowest = previous + 1
        highest = total_units - (len(budgets) - 1 - index)
        cut = min(range(lowest, highest + 1), key=lambda c: abs(prefix[c] - target))
        cuts.append(cut)
        previous = cut
    cuts.append(total_units)
    return cuts


def _unit_cuts_to_layer_blocks(cuts: list[int], num_layers: int) -> list[tuple[int, int]]:
    # Unit u is layer u-1 (unit 0 is the embedding, unit L+1 the head).
    blocks, start_unit = [], 0
    for end_unit in cuts:
        start = min(max(start_unit - 1, 0), num_layers)
        end = min(max(end_unit - 1, 0), num_layers)
        blocks.append((start, end))
        start_unit = end_unit
    return blocks
