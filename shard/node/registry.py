"""The registry's state: who has joined, their leases, and the versioned plan.

Pure bookkeeping with an asyncio fan-out to plan watchers; the servicer only parses
requests and maps ShardError to status codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from shard.errors import ShardError
from shard.placement import (
    NO_FIT,
    ModelSizes,
    NodeOffer,
    PlacementError,
    best_coordinator,
    order_ring,
    place,
    ring_rtt,
)
from shard.v1 import registry_pb2

log = logging.getLogger(__name__)


# A ring order other than by node id must save at least this much round trip.
RING_GAIN_SECONDS, RING_GAIN_FRACTION = 0.001, 0.1
TRUSTED = "trusted"  # the trust label that may hold the first and last blocks when pinned


@dataclass
class NodeRecord:
    capabilities: registry_pb2.NodeCapabilities
    lease_deadline: float
    serving: registry_pb2.ServingBlock = field(default_factory=registry_pb2.ServingBlock)
    state: int = registry_pb2.NODE_STATE_LOADING
    plan_version: int = 0


@dataclass
class RegistryState:
    sizes: ModelSizes
    model_fingerprint: str
    min_stages: int
    lease_seconds: float = 5.0
    pin_trusted_ends: bool = False
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    plan: registry_pb2.Plan = field(default_factory=registry_pb2.Plan)
    # The plan version at which the current blocks were assigned: stages that report
    # READY at or after it have loaded their block.
    assigned_version: int = 0
    # Measured round trips between members, (from, to) -> seconds.
    rtt: dict[tuple[str, str], float] = field(default_factory=dict)
    # How long the first plan may wait for members to measure their round trips.
    rtt_wait_seconds: float = 3.0
    _waiting_for_rtts: bool = False
    _rtt_deadline: float | None = None
    _planned_once: bool = False
    # After a restart, nodes that report serving a ring get a few leases to rejoin, so
    # that their ring is adopted whole rather than re-planned.
    _adopt_until: float = field(default_factory=lambda: time.monotonic())
    _watchers: set[asyncio.Queue] = field(default_factory=set)
    # The coordinator's lease ended and none has joined since: its sessions are void.
    _coordinator_lost: bool = False
    # One probe per member reported unreachable, shared by every report that comes in
    # while it runs.
    _probes: dict[str, asyncio.Task] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._adopt_until = time.monotonic() + 3 * self.lease_seconds

    # ---- membership ---------------------------------------------------------------

    def join(self, capabilities: registry_pb2.NodeCapabilities,
             serving: registry_pb2.ServingBlock | None = None) -> None:
        if capabilities.model_fingerprint != self.model_fingerprint:
            raise ShardError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{capabilities.node_id} serves another model (config fingerprint "
                                f"{capabilities.model_fingerprint[:12]}, expected {self.model_fingerprint[:12]})")
        if not capabilities.address:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "address is required")
        if capabilities.role == registry_pb2.ROLE_STAGE and capabilities.memory_budget_bytes == 0:
            raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, "a stage needs a memory budget")
        if capabilities.role == registry_pb2.ROLE_COORDINATOR:
            current = self.plan.coordinator_id
            if current and current != capabilities.node_id and current in self.nodes:
                raise ShardError(grpc.StatusCode.ALREADY_EXISTS,
                                    f"coordinator {current} already drives this ring")
        previous = self.nodes.get(capabilities.node_id)
        if capabilities.role == registry_pb2.ROLE_COORDINATOR:
            self._coordinator_lost = False
        self.nodes[capabilities.node_id] = NodeRecord(
            capabilities, time.monotonic() + self.lease_seconds, serving=serving or registry_pb2.ServingBlock())
        log.info("%s joined as %s at %s", capabilities.node_id,
                 registry_pb2.Role.Name(capabilities.role), capabilities.address)
        if previous is not None and self._lost_its_block(capabilities.node_id, previous):
            # Restarted before its lease ran out: what the plan gives it is gone.
            self._assign()
        elif self._capacity_back():
            log.info("%s brings the ring back towards %d stages: re-placing", capabilities.node_id,
                     self.min_stages)
            self._assign()
        else:
            self._replan_if_needed()

    def heartbeat(self, node_id: str, state: int, plan_version: int,
                  rtts: dict[str, float] | None = None) -> bool:
        record = self.nodes.get(node_id)
        if record is None:
            return False
        record.lease_deadline = time.monotonic() + self.lease_seconds
        record.state, record.plan_version = state, plan_version
        for peer, seconds in (rtts or {}).items():
            self.rtt[node_id, peer] = seconds
        if not self.plan.stages and self._waiting_for_rtts:
            self._assign()
        elif not self.plan.ready and self._all_assigned_ready():
            self._publish(ready=True)
        return True

    def leave(self, node_id: str) -> None:
        record = self.nodes.pop(node_id, None)
        if record is not None:
            log.info("%s left", node_id)
            self._lost(record)

    async def report_unreachable(self, node_id: str,
                                 answers: Callable[[registry_pb2.NodeCapabilities], Awaitable[bool]]) -> bool:
        """A member says `node_id` cannot be reached: probe it with `answers` and drop it
        at once (re-planning) if it does not answer. One reporter cannot evict a live
        node: the probe decides. Returns whether the node is out of the swarm."""
        record = self.nodes.get(node_id)
        if record is None:
            return True
        probe = self._probes.get(node_id)
        if probe is None:
            probe = self._probes[node_id] = asyncio.ensure_future(answers(record.capabilities))
            probe.add_done_callback(lambda _: self._probes.pop(node_id, None))
        alive = await asyncio.shield(probe)
        if alive:
            return False
        if self.nodes.get(node_id) is not record:
            return node_id not in self.nodes  # left, or re-joined as a new process, meanwhile
        log.warning("%s does not answer a probe after a member could not reach it: dropped", node_id)
        del self.nodes[node_id]
        self._replan_if_needed(lost=node_id)
        return True

    def expire(self) -> None:
        now = time.monotonic()
        for node_id in [n for n, r in self.nodes.items() if r.lease_deadline < now]:
            log.warning("%s missed its lease", node_id)
            self._lost(self.nodes.pop(node_id))

    def _lost(self, record: NodeRecord) -> None:
        if record.capabilities.role == registry_pb2.ROLE_COORDINATOR:
            self._coordinator_lost = True
        self._replan_if_needed(lost=record.capabilities.node_id)

    # ---- planning -----------------------------------------------------------------

    def _stages(self) -> list[registry_pb2.NodeCapabilities]:
        # Sorted by node id so that a restarted registry makes the same plan again.
        return sorted((r.capabilities for r in self.nodes.values()
                       if r.capabilities.role == registry_pb2.ROLE_STAGE), key=lambda c: c.node_id)

    def _coordinator(self) -> registry_pb2.NodeCapabilities | None:
        return next((r.capabilities for r in self.nodes.values()
                     if r.capabilities.role == registry_pb2.ROLE_COORDINATOR), None)

    def _lost_its_block(self, node_id: str, previous: NodeRecord) -> bool:
        """Whether a re-joining node that the plan assigns a block no longer serves it
        (a new process, or one at another address)."""
        assigned = next((s for s in self.plan.stages if s.node_id == node_id), None)
        if assigned is None:
            return False
        serving = self.nodes[node_id].serving
        return (previous.capabilities.address != self.nodes[node_id].capabilities.address
                or not serving.serving
                or (serving.layer_start, serving.layer_end) != (assigned.layer_start, assigned.layer_end))

    def _capacity_back(self) -> bool:
        """Whether a ring smaller than --stages (survivors re-split after a loss) could
        grow again: more stages have joined than it uses."""
        return (self._planned_once and 0 < len(self.plan.stages) < self.min_stages
                and len(self._stages()) > len(self.plan.stages))

    def _replan_if_needed(self, lost: str | None = None) -> None:
        assigned = {s.node_id for s in self.plan.stages}
        if lost in assigned:
            if not self._hand_block_to_spare(lost):
                self._assign()
        elif not assigned:
            self._assign()
        else:
            self._publish()  # e.g. the coordinator's address changed, or a spare joined

    def _hand_block_to_spare(self, lost: str) -> bool:
        """Give a lost stage's block to the best spare that fits it: only that spare loads
        weights, every other stage keeps its block and its KV caches."""
        index = next(i for i, s in enumerate(self.plan.stages) if s.node_id == lost)
        block = self.plan.stages[index]
        need = self.sizes.block_bytes(block.layer_start, block.layer_end, first=index == 0,
                                      last=index == len(self.plan.stages) - 1)
        assigned = {s.node_id for s in self.plan.stages}
        spares = [c for c in self._stages() if c.node_id not in assigned and c.memory_budget_bytes >= need]
        if not spares:
            return False
        spare = max(spares, key=lambda c: (c.speed, c.memory_budget_bytes, c.node_id))
        log.warning("spare %s takes %s's layers [%d, %d)", spare.node_id, lost, block.layer_start, block.layer_end)
        block.node_id, block.address = spare.node_id, spare.address
        self._publish(reassigned=True)
        return True

    def _assign(self) -> None:
        stages = self._stages()
        del self.plan.stages[:]
        self.plan.problem = ""
        adopted = self._running_ring()
        if adopted:
            log.info("adopting the running ring of plan v%d", max(r.serving.plan_version for r in adopted))
            self.plan.version = max(self.plan.version, *(r.serving.plan_version for r in adopted))
            for record in adopted:
                c, served = record.capabilities, record.serving
                self.plan.stages.add(node_id=c.node_id, address=c.address,
                                     layer_start=served.layer_start, layer_end=served.layer_end)
        elif not self._planned_once and len(stages) < self.min_stages:
            self.plan.problem = f"waiting for stages: {len(stages)} of {self.min_stages} joined"
        elif not self._planned_once and time.monotonic() < self._adopt_until and self._ring_rejoining():
            self.plan.problem = "waiting for the running ring to rejoin"
        elif not stages:
            self.plan.problem = "no stage left"
        elif not self._planned_once and not self._rtts_measured(stages):
            self.plan.problem = "measuring round trips between members"
        else:
            stages = self._ring_ordered(stages)
            offers = [NodeOffer(c.node_id, c.memory_budget_bytes, c.speed or 1.0, c.trust == TRUSTED)
                      for c in stages]
            try:
                placement = place(self.sizes, offers, stages=min(self.min_stages, len(stages)),
                                  pin_trusted_ends=self.pin_trusted_ends)
            except PlacementError as error:
                self.plan.problem = f"{NO_FIT}: {error}"
            else:
                addresses = {c.node_id: c.address for c in stages}
                for stage in placement.stages:
                    self.plan.stages.add(node_id=stage.node_id, address=addresses[stage.node_id],
                                         layer_start=stage.start, layer_end=stage.end)
        self._planned_once = self._planned_once or bool(self.plan.stages)
        self._publish(reassigned=True)

    def _rtts_measured(self, stages) -> bool:
        """Whether every pair of members has a round trip, or the wait for them is over."""
        members = [c.node_id for c in stages] + ([self._coordinator().node_id] if self._coordinator() else [])
        missing = [(a, b) for a in members for b in members
                   if a < b and (a, b) not in self.rtt and (b, a) not in self.rtt]
        if self._rtt_deadline is None:
            self._rtt_deadline = time.monotonic() + self.rtt_wait_seconds
        self._waiting_for_rtts = bool(missing) and time.monotonic() < self._rtt_deadline
        if missing and not self._waiting_for_rtts:
            log.warning("planning without round trips for %d pairs of members", len(missing))
        return not self._waiting_for_rtts

    def _ring_ordered(self, stages) -> list:
        """Stages in the ring order of least total round trip; node id order unless that
        saves a real amount (loopback round trips are noise, and a stable order is kind)."""
        coordinator = self._coordinator()
        self.plan.coordinator_site, self.plan.ring_rtt_seconds = "", 0.0
        if coordinator is None or not self.rtt:
            return stages
        by_id = {c.node_id: c for c in stages}
        best = order_ring(self.rtt, list(by_id), coordinator.node_id)
        stable = ring_rtt(self.rtt, list(by_id), coordinator.node_id)
        site = best_coordinator(self.rtt, list(by_id), list(by_id))
        order, total = best.order, best.total_rtt
        if stable - best.total_rtt < max(RING_GAIN_SECONDS, RING_GAIN_FRACTION * stable):
            order, total = tuple(by_id), stable
        self.plan.coordinator_site, self.plan.ring_rtt_seconds = site.coordinator_id, total
        log.info("ring order %s (%.2f ms of round trips; best possible %.2f ms%s); the coordinator "
                 "would do best beside %s", " -> ".join(order), total * 1e3, best.total_rtt * 1e3,
                 "" if best.exact else ", heuristic", site.coordinator_id)
        return [by_id[node_id] for node_id in order]

    def _running_ring(self) -> list[NodeRecord] | None:
        """The ring the joined stages report serving, when it is whole (a registry that
        restarted adopts it rather than moving blocks): ring indices 0..n-1 whose blocks
        tile every layer."""
        if self._planned_once:
            return None
        serving = [r for r in self.nodes.values() if r.serving.serving]
        for size in {r.serving.ring_size for r in serving}:
            ring = sorted((r for r in serving if r.serving.ring_size == size), key=lambda r: r.serving.ring_index)
            if [r.serving.ring_index for r in ring] != list(range(size)):
                continue
            bounds = [(r.serving.layer_start, r.serving.layer_end) for r in ring]
            if bounds[0][0] == 0 and bounds[-1][1] == self.sizes.num_layers and all(
                    a[1] == b[0] for a, b in zip(bounds, bounds[1:])):
                return ring
        return None

    def _ring_rejoining(self) -> bool:
        return any(r.serving.serving for r in self.nodes.values())

    def _all_assigned_ready(self) -> bool:
        if not self.plan.stages or not self.plan.coordinator_address:
            return False
        for stage in self.plan.stages:
            record = self.nodes.get(stage.node_id)
            if (record is None or record.state != registry_pb2.NODE_STATE_READY
                    or record.plan_version < self.assigned_version):
                return False
        return True

    def _publish(self, *, reassigned: bool = False, ready: bool = False) -> None:
        self.plan.version += 1
        if reassigned:
            self.assigned_version = self.plan.version
        coordinator = self._coordinator()
        self.plan.coordinator_id = coordinator.node_id if coordinator else ""
        self.plan.coordinator_address = coordinator.address if coordinator else ""
        self.plan.coordinator_incarnation = coordinator.incarnation if coordinator else ""
        self.plan.coordinator_lost = self._coordinator_lost
        self.plan.model_fingerprint = self.model_fingerprint
        del self.plan.members[:]
        for record in sorted(self.nodes.values(), key=lambda r: r.capabilities.node_id):
            c = record.capabilities
            self.plan.members.add(node_id=c.node_id, address=c.address, role=c.role)
        self.plan.num_layers = self.sizes.num_layers
        self.plan.ready = ready or (not reassigned and self._all_assigned_ready())
        if self.plan.problem:
            log.info("plan v%d: %s", self.plan.version, self.plan.problem)
        else:
            log.info("plan v%d%s: %s", self.plan.version, " (ready)" if self.plan.ready else "",
                     ", ".join(f"{s.node_id}[{s.layer_start},{s.layer_end})" for s in self.plan.stages))
        snapshot = registry_pb2.Plan()
        snapshot.CopyFrom(self.plan)
        for queue in self._watchers:
            queue.put_nowait(snapshot)

    # ---- watchers -----------------------------------------------------------------

    def watch(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        if self.plan.version:
            snapshot = registry_pb2.Plan()
            snapshot.CopyFrom(self.plan)
            queue.put_nowait(snapshot)
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue) -> None:
        self._watchers.discard(queue)
