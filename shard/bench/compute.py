"""The pipeline's own cost where compute dominates: plain decode over 2 stages on loopback
against one process, on a model with tens of ms per token.

Each node gets the same number of torch threads as the single process (a node stands for
a machine of its own), and the two run in turns, several rounds, so that a noisy machine
shows as spread rather than as a bias; the ratio reported is the median of the rounds.
Where the machine has a core to spare, both stages and the single process compute on the
same cores (plain decode runs the stages one after the other, so they never compete):
virtual CPUs of one machine can differ by a quarter in speed, and the ratio is meant to
show the pipeline's cost, not which core the scheduler picked."""

from __future__ import annotations

import asyncio
import os
import statistics
from contextlib import contextmanager
from pathlib import Path

from shard.bench.run import Mode, request_for, single_process
from shard.client import generate
from shard.launcher import LocalSwarm
from shard.testing.tiny_models import build_compute_model

PROMPT = [1, 5, 9, 13, 17, 21, 25, 29]
PLAIN = Mode("plain", "none", 0, 1)


def compute_check(scratch: Path, threads: int = 1, rounds: int = 5, max_tokens: int = 48) -> dict:
    model_dir = build_compute_model(scratch / "compute-model")
    cpus = sorted(os.sched_getaffinity(0))
    # The compute cores, and the rest for the coordinator and this client.
    compute = set(cpus[:threads]) if len(cpus) > threads else None
    results = []
    with LocalSwarm(model_dir, 2, logs_to_files=True, device="cpu", stage_args=[f"--threads={threads}"],
                    coordinator_args=["--threads=1"]) as swarm:
        tls = swarm.client_tls()
        asyncio.run(generate(swarm.coordinator_address, tls, request_for(PROMPT, 4, PLAIN, {}),
                             wait_ready_seconds=300))
        if compute:
            for node_id in ("stage-0", "stage-1"):
                _pin(swarm.processes[node_id].pid, compute)
            _pin(swarm.processes["coordinator"].pid, set(cpus) - compute)
        for _ in range(rounds):
            with _pinned_here(compute):
                single, expected = single_process(model_dir, [PROMPT], max_tokens, threads=threads)
            summary = asyncio.run(generate(swarm.coordinator_address, tls,
                                           request_for(PROMPT, max_tokens, PLAIN, {}))).summary
            results.append({"single_process_tokens_per_second": single,
                            "pipeline_tokens_per_second": summary.tokens_per_second,
                            "ratio": summary.tokens_per_second / single,
                            "lossless": list(summary.output_ids) == expected[0]})
    return {"model": "random llama, hidden 1024, 8 layers", "stages": 2, "threads_per_node": threads,
            "compute_cpus": sorted(compute) if compute else None, "tokens": max_tokens, "rounds": results,
            "single_process_tokens_per_second": statistics.median(r["single_process_tokens_per_second"]
                                                                  for r in results),
            "pipeline_tokens_per_second": statistics.median(r["pipeline_tokens_per_second"] for r in results),
            "ratio": statistics.median(r["ratio"] for r in results),
            "lossless": all(r["lossless"] for r in results)}


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process (threads made later inherit from their maker)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


@contextmanager
def _pinned_here(cpus: set[int] | None):
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    _pin(os.getpid(), cpus)
    try:
        yield
    finally:
        _pin(os.getpid(), before)
