"""`shard bench`: every decoding mode over the same swarm and prompts, side by side."""

from __future__ import annotations

import asyncio
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shard.bench.bound import Measured, bound_tokens_per_second
from shard.bench.network import emulated_links
from shard.bench.topology import TOPOLOGIES, Topology
from shard.client import generate
from shard.local import LocalSwarm
from shard.v1 import api_pb2, stage_pb2, stage_pb2_grpc
from shard.wire.tls import open_channel

STORY_PROMPTS = ("Once upon a time", "Tom and Lily went to the park. They", "The little dog was sad because")


@dataclass(frozen=True)
class Mode:
    decoding: str   # plain | sync | pipelined
    draft: str      # label of the draft
    k: int
    w: int

    @property
    def label(self) -> str:
        if self.decoding == "plain":
            return "plain"
        return f"{self.decoding} {self.draft} K={self.k}" + (f" W={self.w}" if self.w > 1 else "")


def modes_for(draft_labels: list[str], settings: list[tuple[int, int]]) -> list[Mode]:
    modes = [Mode("plain", "none", 0, 1)]
    for label in draft_labels:
        for k, w in settings:
            modes.append(Mode("sync" if w == 1 else "pipelined", label, k, w))
    return modes


@dataclass
class Row:
    topology: str
    mode: str
    draft: str
    k: int
    w: int
    tokens: int
    seconds: float
    tokens_per_second: float
    acceptance: float
    tokens_per_traversal: float
    chunks_sent: int
    chunks_wasted: int
    chunks_cancelled: int
    pipeline_breaks: int
    generations: int
    traversals: int
    draft_seconds: float
    draft_seconds_per_token: float
    stage_seconds_per_chunk: list[float]
    traversal_seconds: float
    bound_tokens_per_second: float = 0.0
    efficiency: float = 0.0
    lossless: bool | None = True  # None: no reference to compare with
    extra: dict = field(default_factory=dict)
    outputs: list[list[int]] = field(default_factory=list)  # each generation's new tokens


def single_process(model_dir, prompts_ids: list[list[int]], max_tokens: int,
                   threads: int | None = None) -> tuple[float, list[list[int]]]:
    """transformers' own greedy generate() in this process, the no-network ceiling:
    (tokens per second, the outputs), on `threads` torch threads if given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as the swarm runs: max_tokens every time

    def run(ids: list[int]) -> list[int]:
        tensor = torch.tensor([ids])
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_tokens,
                             do_sample=False)
        return out[0, len(ids):].tolist()

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        run(prompts_ids[0])  # warm-up
        began = time.perf_counter()
        outputs = [run(ids) for ids in prompts_ids]
        return sum(map(len, outputs)) / (time.perf_counter() - began), outputs
    finally:
        torch.set_num_threads(default_threads)


async def stage_infos(addresses: list[str], tls) -> list[stage_pb2.InfoResponse]:
    infos = []
    for address in addresses:
        async with open_channel(address, tls) as channel:
            infos.append(await stage_pb2_grpc.StageServiceStub(channel).Info(stage_pb2.InfoRequest()))
    return infos


def request_for(ids: list[int], max_tokens: int, mode: Mode, drafts: dict[str, str]):
    return api_pb2.GenerateRequest(
        prompt_ids=api_pb2.TokenIds(ids=ids), max_tokens=max_tokens, stop_at_eos=False,
        draft=drafts.get(mode.draft, "none"), spec_k=mode.k, in_flight=mode.w)


async def _run_mode(client_address, tls, stage_addresses, stage_tls, mode, drafts, prompts_ids, max_tokens):
    await generate(client_address, tls, request_for(prompts_ids[0], 8, mode, drafts))  # warm-up
    before = await stage_infos(stage_addresses, stage_tls)
    summaries = [(await generate(client_address, tls, request_for(ids, max_tokens, mode, drafts))).summary
                 for ids in prompts_ids]
    after = await stage_infos(stage_addresses, stage_tls)
    stage_seconds = [
        (a.compute_seconds - b.compute_seconds) / max(a.frames_processed - b.frames_processed, 1)
        for a, b in zip(after, before)]
    return summaries, stage_seconds


def bench_topology(topology: Topology, model_dir, drafts: dict[str, str], modes: list[Mode],
                   prompts_ids: list[list[int]], max_tokens: int, expected: list[list[int]] | None, *,
                   device: str = "cpu", dtype: str = "auto", stage_args: list[str] = (),
                   coordinator_args: list[str] = (),
                   inspect: Callable[[LocalSwarm, str, list[str]], None] | None = None) -> list[Row]:
    """All modes over one swarm whose every ring edge goes through an emulated link, its
    stages on `device` in `dtype`; `inspect(swarm, client_address, stage_addresses)` runs
    after the last mode, while the swarm is still up."""
    # A tiny model's ops are too small to split across threads: one thread per node is
    # fastest, and leaves the other core to the other nodes. (On a GPU the host threads
    # only launch kernels.)
    coordinator_args = ["--threads=1", *(f"--draft={spec}" for spec in drafts.values() if spec != "ngram"),
                        *coordinator_args]
    rows = []
    with emulated_links(topology) as addresses, LocalSwarm(
            model_dir, topology.stages, addresses=addresses, logs_to_files=True, device=device, dtype=dtype,
            coordinator_args=coordinator_args, stage_args=["--threads=1", *stage_args],
            start_timeout=600) as swarm:
        tls = swarm.client_tls()
        stage_tls = swarm.node_tls("coordinator")  # a stage's Info is for nodes, not clients
        # The benchmark client talks to the coordinator directly: its link is not a ring edge.
        client_address = addresses.get("coordinator", (swarm.coordinator_address,))[0]
        stage_addresses = [addresses.get(f"stage-{i}", (None,))[0] or swarm.address_of(f"stage-{i}")
                           for i in range(topology.stages)]
        asyncio.run(generate(client_address, tls, request_for(prompts_ids[0], 4, modes[0], drafts),
                             wait_ready_seconds=300))
        for mode in modes:
            summaries, stage_seconds = asyncio.run(_run_mode(
                client_address, tls, stage_addresses, stage_tls, mode, drafts, prompts_ids, max_tokens))
            rows.append(_row(topology, mode, summaries, stage_seconds, expected))
        if inspect is not None:
            inspect(swarm, client_address, stage_addresses)
    _add_bounds(rows, topology)
    return rows


def _row(topology, mode, summaries, stage_seconds, expected) -> Row:
    tokens = sum(s.tokens for s in summaries)
    seconds = sum(s.seconds for s in summaries)
    traversals = sum(s.traversals for s in summaries)
    drafted_weight = sum(s.traversals for s in summaries if s.spec_k)
    acceptance = (sum(s.acceptance_rate * s.traversals for s in summaries) / drafted_weight
                  if drafted_weight else 0.0)
    draft_tokens = sum(s.draft_tokens for s in summaries)
    draft_seconds = sum(s.draft_seconds for s in summaries)
    return Row(
        topology=topology.name, mode=mode.label, draft=mode.draft, k=mode.k, w=mode.w, tokens=tokens,
        seconds=seconds, tokens_per_second=tokens / seconds, acceptance=acceptance,
        tokens_per_traversal=tokens / traversals, chunks_sent=sum(s.chunks_sent for s in summaries),
        chunks_wasted=sum(s.chunks_wasted for s in summaries),
        chunks_cancelled=sum(s.chunks_cancelled for s in summaries),
        pipeline_breaks=sum(s.pipeline_breaks for s in summaries), generations=len(summaries), traversals=traversals,
        draft_seconds=draft_seconds,
        draft_seconds_per_token=draft_seconds / draft_tokens if draft_tokens else 0.0,
        stage_seconds_per_chunk=stage_seconds,
        traversal_seconds=sum(s.ring_seconds for s in summaries) / traversals,
        lossless=None if expected is None else [list(s.output_ids) for s in summaries] == expected,
        outputs=[list(s.output_ids) for s in summaries])


def rebound(rows: list[Row]) -> list[Row]:
    """The bounds again, from the measured pieces a results file keeps (the bound is
    analysis: a better model of the system re-reads old measurements)."""
    for name in dict.fromkeys(r.topology for r in rows):
        _add_bounds([r for r in rows if r.topology == name], TOPOLOGIES[name])
    return rows


def _add_bounds(rows: list[Row], topology: Topology) -> None:
    """Bounds from the measured pieces. The plain row gives the bare traversal time; the
    per-frame overhead is what that time holds beyond link delays and compute."""
    plain = next(r for r in rows if r.k == 0 and r.w == 1)
    hops = topology.stages + 1
    overhead = max(plain.traversal_seconds - topology.ring_one_way_seconds
                   - sum(plain.stage_seconds_per_chunk), 0.0) / hops
    for row in rows:
        # A (K+1)-token chunk's traversal: the 1-token one plus the extra compute.
        extra_compute = sum(row.stage_seconds_per_chunk) - sum(plain.stage_seconds_per_chunk)
        traversal = plain.traversal_seconds + max(extra_compute, 0.0)
        measured = Measured(w=row.w, tokens=row.tokens, generations=row.generations, chunks=row.traversals,
                            pipeline_breaks=row.pipeline_breaks, draft_seconds_per_chunk=row.draft_seconds / row.chunks_sent,
                            stage_seconds=tuple(row.stage_seconds_per_chunk), traversal_seconds=traversal)
        row.bound_tokens_per_second = bound_tokens_per_second(measured, overhead)
        row.efficiency = row.tokens_per_second / row.bound_tokens_per_second
        row.extra["overhead_seconds_per_hop"] = overhead


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)))
