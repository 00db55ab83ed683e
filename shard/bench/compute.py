"""The pipeline's own cost where compute dominates: plain decode over 2 stages on loopback
against one process, on a model with tens of ms per token.

Each node gets the same number of torch threads as the single process (a node stands for
a machine of its own). The two run in turns, many short rounds, and the ratio reported is
the median of the rounds' ratios: a shared machine's speed drifts by tens of percent over
seconds, which a few long rounds turn into bias. Each round also splits the pipeline's time
per token into the stages' compute (as the stages measure it) and the rest, the pipeline's
own overhead: hops, sealing, scheduling. A third contender, the same two blocks in two bare
processes joined by a pipe (`bare_pipeline`), shows what any split into processes costs on
the machine before the first line of Shard's data path."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

from shard.bench.bare_pipeline import BarePipeline
from shard.bench.run import Mode, request_for, single_process, stage_infos
from shard.client import generate
from shard.local import LocalSwarm
from shard.model.synthetic import build_compute_model

PROMPT = [1, 5, 9, 13, 17, 21, 25, 29]
PLAIN = Mode("plain", "none", 0, 1)


def compute_check(scratch: Path, threads: int = 1, rounds: int = 9, max_tokens: int = 32) -> dict:
    model_dir = build_compute_model(scratch / "compute-model")
    bare = BarePipeline(model_dir, 8, threads)
    try:
        results = _rounds(model_dir, bare, threads, rounds, max_tokens)
    finally:
        bare.close()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in results)

    ratios = sorted(r["ratio"] for r in results)
    return {"model": "random llama, hidden 1024, 8 layers", "stages": 2, "threads_per_node": threads,
            "tokens": max_tokens, "rounds": results,
            "single_process_tokens_per_second": median("single_process_tokens_per_second"),
            "pipeline_tokens_per_second": median("pipeline_tokens_per_second"),
            "ratio": median("ratio"),
            "ratio_quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
            "single_process_ms_per_token": median("single_process_ms_per_token"),
            "stage_compute_ms_per_token": median("stage_compute_ms_per_token"),
            "pipeline_overhead_ms_per_token": median("pipeline_overhead_ms_per_token"),
            "bare_processes_ratio": median("bare_processes_ratio"),
            "bare_processes_compute_ms_per_token": median("bare_processes_compute_ms_per_token"),
            "pipeline_vs_bare_processes": median("pipeline_vs_bare_processes"),
            "lossless": all(r["lossless"] for r in results)}


def _rounds(model_dir: Path, bare: BarePipeline, threads: int, rounds: int, max_tokens: int) -> list[dict]:
    """The single process, the bare processes, then the swarm, `rounds` times over."""
    results = []
    with LocalSwarm(model_dir, 2, logs_to_files=True, device="cpu", stage_args=[f"--threads={threads}"],
                    coordinator_args=["--threads=1"]) as swarm:
        tls = swarm.client_tls()
        stages = [swarm.address_of(f"stage-{i}") for i in range(2)]
        asyncio.run(generate(swarm.coordinator_address, tls, request_for(PROMPT, 4, PLAIN, {}),
                             wait_ready_seconds=300))
        for _ in range(rounds):
            single, expected = single_process(model_dir, [PROMPT], max_tokens, threads=threads)
            bare_seconds, bare_compute, bare_tokens = bare.generate(PROMPT, max_tokens)
            before = asyncio.run(stage_infos(stages, tls))
            summary = asyncio.run(generate(swarm.coordinator_address, tls,
                                           request_for(PROMPT, max_tokens, PLAIN, {}))).summary
            after = asyncio.run(stage_infos(stages, tls))
            compute_ms = sum(1000 * (a.compute_seconds - b.compute_seconds) / (a.frames_processed - b.frames_processed)
                             for a, b in zip(after, before))
            results.append({"single_process_tokens_per_second": single,
                            "pipeline_tokens_per_second": summary.tokens_per_second,
                            "ratio": summary.tokens_per_second / single,
                            "single_process_ms_per_token": 1000 / single,
                            "stage_compute_ms_per_token": compute_ms,
                            "pipeline_overhead_ms_per_token": 1000 / summary.tokens_per_second - compute_ms,
                            "bare_processes_tokens_per_second": 1 / bare_seconds,
                            "bare_processes_ratio": 1 / bare_seconds / single,
                            "bare_processes_compute_ms_per_token": 1000 * bare_compute,
                            "pipeline_vs_bare_processes": summary.tokens_per_second * bare_seconds,
                            "lossless": list(summary.output_ids) == expected[0] == bare_tokens})
    return results
