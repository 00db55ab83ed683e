"""`shard bench wan`: every decoding mode over emulated WAN links; writes <out>/wan.json,
<docs>/benchmarks.md and <docs>/benchmarks.png."""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shard.bench.compute import compute_check
from shard.bench.report import markdown, plot
from shard.bench.run import (
    STORY_PROMPTS,
    Row,
    bench_topology,
    machine,
    modes_for,
    rebound,
    single_process,
    write_json,
)
from shard.bench.topology import TOPOLOGIES

RESULTS, DOC, PLOT = "wan.json", "benchmarks.md", "benchmarks.png"


def main(args) -> int:
    from shard.local import default_model_dir

    if args.from_json:
        payload = _merged([json.loads(Path(path).read_text()) for path in args.from_json])
        payload["rows"] = [asdict(row) for row in rebound([Row(**r) for r in payload["rows"]])]
        payload["command"] += "; rendered with " + shlex.join(["shard", "bench", "wan", "--from-json", *args.from_json])
        return _report(payload, args)
    model_dir = Path(args.model) if args.model else default_model_dir()
    topologies = [TOPOLOGIES[name] for name in (args.topology or ["lan", "wan-3", "wan-6"])]
    settings = [(4, 2)] if args.quick else [(4, 1), (4, 4), (8, 8)]
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as scratch:
        targets: dict[Path, Target] = {}
        rows = []
        for topology in topologies:
            target_dir = deep_enough(model_dir, topology.stages, Path(scratch))
            if target_dir not in targets:
                targets[target_dir] = Target.prepare(target_dir, args, Path(scratch))
            target = targets[target_dir]
            print(f"shard bench: {topology.name} ({topology.stages} stages) on {target_dir}", file=sys.stderr)
            topology_rows = bench_topology(topology, target_dir, target.drafts, modes_for(list(target.drafts), settings),
                                           target.prompts_ids, args.max_tokens, target.expected)
            for row in topology_rows:
                label = str(target_dir) if target_dir == model_dir else (
                    f"demo model: random 6-layer llama, byte tokenizer ({model_dir.name} has too few layers "
                    f"for {topology.stages} stages)")
                row.extra.update(model=label, single_process_tokens_per_second=target.ceiling)
            rows += topology_rows
        compute = [compute_check(Path(scratch), threads=args.compute_threads,
                                 rounds=args.compute_rounds)] if args.compute_check else []
    payload = {
        "command": shlex.join(["shard", "bench", *sys.argv[sys.argv.index("bench") + 1:]]),
        "machine": machine(), "max_tokens": args.max_tokens, "prompts": min(max(args.prompts, 1), len(STORY_PROMPTS)),
        "topologies": [t.name for t in topologies], "rows": [asdict(r) for r in rows],
        "compute_check": compute,
    }
    write_json(Path(args.out) / RESULTS, payload)
    return _report(payload, args)


def _merged(payloads: list[dict]) -> dict:
    first = payloads[0]
    if any(p["machine"] != first["machine"] or p["max_tokens"] != first["max_tokens"] for p in payloads):
        raise SystemExit("shard bench: results from different machines or settings do not make one table")
    return {**first, "command": "; ".join(p["command"] for p in payloads),
            "topologies": [t for p in payloads for t in p["topologies"]],
            "rows": [r for p in payloads for r in p["rows"]],
            "compute_check": [c for p in payloads for c in p["compute_check"]]}


def _report(payload: dict, args) -> int:
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / DOC).write_text(_doc(payload, with_plot=not args.no_plot))
    if not args.no_plot:
        plot(payload, docs / PLOT)
    print(markdown(payload))
    lossless = all(r["lossless"] for r in payload["rows"]) and all(c["lossless"] for c in payload["compute_check"])
    return 0 if lossless else 1


@dataclass
class Target:
    """A target model with its prompts, drafts and single-process reference."""

    drafts: dict[str, str]
    prompts_ids: list[list[int]]
    ceiling: float
    expected: list[list[int]]

    @classmethod
    def prepare(cls, model_dir: Path, args, scratch: Path) -> "Target":
        from transformers import AutoTokenizer

        from shard.model.synthetic import truncated_copy

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts_ids = [tokenizer(p)["input_ids"] for p in STORY_PROMPTS[: max(args.prompts, 1)]]
        drafts = {"target": str(model_dir), "ngram": "ngram"}
        if not args.quick:
            truncated = scratch / f"truncated-{model_dir.name}"
            drafts["truncated"] = str(truncated_copy(model_dir, truncated, layers=1))
        ceiling, expected = single_process(model_dir, prompts_ids, args.max_tokens)
        return cls(drafts, prompts_ids, ceiling, expected)


def deep_enough(model_dir: Path, stages: int, scratch: Path) -> Path:
    """The model itself if it can be cut into `stages` blocks (embedding, layers and head
    are the units), else the 6-layer demo model (random weights, byte tokenizer)."""
    from shard.model.checkpoint import Checkpoint
    from shard.model.synthetic import build_demo_model

    if Checkpoint.open(model_dir).num_layers + 2 >= stages:
        return model_dir
    return build_demo_model(scratch / "demo-model")


def _doc(payload: dict, with_plot: bool) -> str:
    figure = [f"![tokens per second]({PLOT})", ""] if with_plot else []
    return "\n".join([
        "# Benchmarks: decoding modes over emulated WAN links", "",
        "Every ring edge goes through a user-space relay that delays each byte by half the edge's",
        "round-trip time in each direction, in order and without a throughput cap. Topologies: `lan`",
        "(loopback), `wan-3` (edge RTTs 16, 11, 40, 38 ms, the public gpt-oss-120B run) and `wan-6`",
        "(35, 45, 75, 58, 22, 32, 25 ms, the public 744B run). Each mode runs on the same swarm and",
        "prompts; `lossless` checks its tokens against single-process `generate()`. The bound is the",
        "analytic throughput from the measured draft time per token, stage time per chunk, per-hop",
        "overhead and traversal time (`shard/bench/bound.py`); efficiency = measured / bound.",
        "Every node is its own process, and the bound assumes each has a core to itself, as",
        "machines far apart do; on fewer cores than nodes the draft, the stages and the relays",
        "take turns and the efficiency drops.", "",
        "GPU runs (`shard bench gpu`): [benchmarks-gpu.md](benchmarks-gpu.md). Many sessions at once",
        "(`shard bench concurrency`): [benchmarks-concurrency.md](benchmarks-concurrency.md). Sampling at",
        "temperatures 0.7 and 1.0 next to greedy (`shard bench sampling`): [benchmarks-sampling.md](benchmarks-sampling.md).", "",
        markdown(payload), "", *figure])
