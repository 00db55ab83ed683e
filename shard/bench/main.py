"""Entry point of `shard bench`."""

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


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="target model folder (default: the shared tiny model)")
    parser.add_argument("--topology", action="append", choices=sorted(TOPOLOGIES),
                        help="repeatable (default: lan, wan-3, wan-6)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3, help=f"how many of {len(STORY_PROMPTS)} prompts")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer drafts and settings")
    parser.add_argument("--compute-check", action="store_true",
                        help="also compare plain 2-stage decode with one process on a compute-heavy model")
    parser.add_argument("--compute-threads", type=int, default=1,
                        help="torch threads per node and for the single process in the compute check")
    parser.add_argument("--compute-rounds", type=int, default=9,
                        help="paired rounds (single process, then pipeline) in the compute check")
    parser.add_argument("--out", default="bench/results/wan.json")
    parser.add_argument("--doc", default="docs/benchmarks.md")
    parser.add_argument("--plot", default="docs/benchmarks.png", help="'' for none (no matplotlib needed)")
    parser.add_argument("--from-json", metavar="RESULTS", nargs="+",
                        help="run nothing: write one table and plot of results files (from another machine, "
                             "or several runs of one)")


def main(args) -> int:
    from shard.launcher import default_model_dir

    if args.from_json:
        payload = _merged([json.loads(Path(path).read_text()) for path in args.from_json])
        payload["rows"] = [asdict(row) for row in rebound([Row(**r) for r in payload["rows"]])]
        payload["command"] += "; rendered with " + shlex.join(["shard", "bench", "--from-json", *args.from_json])
        return _report(payload, args)
    model_dir = Path(args.model) if args.model else default_model_dir()
    topologies = [TOPOLOGIES[name] for name in (args.topology or ["lan", "wan-3", "wan-6"])]
    settings = [(4, 2)] if args.quick else [(4, 1), (4, 4), (8, 8)]
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as scratch:
        targets: dict[Path, Target] = {}
        rows = []
        for topology in topologies:
            target_dir = _deep_enough(model_dir, topology.stages, Path(scratch))
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
    write_json(Path(args.out), payload)
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
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(_doc(payload, Path(args.plot) if args.plot else None, Path(args.doc)))
    if args.plot:
        plot(payload, Path(args.plot))
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

        from shard.testing.drafts import truncated_copy

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts_ids = [tokenizer(p)["input_ids"] for p in STORY_PROMPTS[: max(args.prompts, 1)]]
        drafts = {"target": str(model_dir), "ngram": "ngram"}
        if not args.quick:
            truncated = scratch / f"truncated-{model_dir.name}"
            drafts["truncated"] = str(truncated_copy(model_dir, truncated, layers=1))
        ceiling, expected = single_process(model_dir, prompts_ids, args.max_tokens)
        return cls(drafts, prompts_ids, ceiling, expected)


def _deep_enough(model_dir: Path, stages: int, scratch: Path) -> Path:
    """The model itself if it can be cut into `stages` blocks (embedding, layers and head
    are the units), else the 6-layer demo model (random weights, byte tokenizer)."""
    from shard.model.checkpoint import Checkpoint
    from shard.testing.tiny_models import build_demo_model

    if Checkpoint.open(model_dir).num_layers + 2 >= stages:
        return model_dir
    return build_demo_model(scratch / "demo-model")


def _doc(payload: dict, plot_path: Path | None, doc_path: Path) -> str:
    figure = []
    if plot_path:
        relative = Path(*([".."] * (len(doc_path.parent.parts)))) / plot_path if doc_path.parent.parts else plot_path
        figure = [f"![tokens per second]({relative.as_posix()})", ""]
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
        markdown(payload), "", *figure])
