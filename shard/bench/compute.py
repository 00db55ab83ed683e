"""The pipeline's own cost where compute dominates: plain decode over 2 stages on loopback
against one process, on a model with tens of ms per token.

Each node gets the same number of torch threads as the single process (a node stands for
a machine of its own), and the two run in turns, several rounds, so that a noisy machine
shows as spread rather than as a bias; the ratio reported is the median of the rounds."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

from shard.bench.run import Mode, request_for, single_process
from shard.client import generate
from shard.launcher import LocalSwarm
from shard.testing.tiny_models import build_compute_model

PROMPT = [1, 5, 9, 13, 17, 21, 25, 29]
PLAIN = Mode("plain", "none", 0, 1)


def compute_check(scratch: Path, threads: int = 1, rounds: int = 3, max_tokens: int = 48) -> dict:
    model_dir = build_compute_model(scratch / "compute-model")
    results = []
    with LocalSwarm(model_dir, 2, logs_to_files=True, device="cpu", stage_args=[f"--threads={threads}"],
                    coordinator_args=["--threads=1"]) as swarm:
        tls = swarm.client_tls()
        asyncio.run(generate(swarm.coordinator_address, tls, request_for(PROMPT, 4, PLAIN, {}),
                             wait_ready_seconds=300))
        for _ in range(rounds):
            single, expected = single_process(model_dir, [PROMPT], max_tokens, threads=threads)
            summary = asyncio.run(generate(swarm.coordinator_address, tls,
                                           request_for(PROMPT, max_tokens, PLAIN, {}))).summary
            results.append({"single_process_tokens_per_second": single,
                            "pipeline_tokens_per_second": summary.tokens_per_second,
                            "ratio": summary.tokens_per_second / single,
                            "lossless": list(summary.output_ids) == expected[0]})
    return {"model": "random llama, hidden 1024, 8 layers", "stages": 2, "threads_per_node": threads,
            "tokens": max_tokens, "rounds": results,
            "single_process_tokens_per_second": statistics.median(r["single_process_tokens_per_second"]
                                                                  for r in results),
            "pipeline_tokens_per_second": statistics.median(r["pipeline_tokens_per_second"] for r in results),
            "ratio": statistics.median(r["ratio"] for r in results),
            "lossless": all(r["lossless"] for r in results)}
