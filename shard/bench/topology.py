"""Named ring topologies: the round-trip time of every edge of the ring, in ring order
coordinator -> stage-0 -> ... -> tail -> coordinator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    name: str
    edge_rtts_ms: tuple[float, ...]  # one per ring edge; empty: loopback, no added delay
    stages_if_lan: int = 2

    @property
    def stages(self) -> int:
        return len(self.edge_rtts_ms) - 1 if self.edge_rtts_ms else self.stages_if_lan

    def inbound_one_way_seconds(self, node_id: str) -> float:
        """The one-way delay of the ring edge that ends at this node."""
        if not self.edge_rtts_ms:
            return 0.0
        index = self.stages if node_id == "coordinator" else int(node_id.removeprefix("stage-"))
        return self.edge_rtts_ms[index] / 2000.0

    @property
    def ring_one_way_seconds(self) -> float:
        return sum(self.edge_rtts_ms) / 2000.0


TOPOLOGIES = {
    "lan": Topology("lan", ()),
    # The public gpt-oss-120B run: coordinator + 3 stages.
    "wan-3": Topology("wan-3", (16, 11, 40, 38)),
    # The public 744B run: coordinator + 6 stages in six states.
    "wan-6": Topology("wan-6", (35, 45, 75, 58, 22, 32, 25)),
}
