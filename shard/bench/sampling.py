"""`shard bench sampling`: acceptance and tokens per second under speculative sampling
(temperatures 0.7 and 1.0) next to greedy, on one swarm per topology; writes
<out>/sampling.json and <docs>/benchmarks-sampling.md."""

from __future__ import annotations

import asyncio
import shlex
import sys
import tempfile
from pathlib import Path

from shard.bench.network import emulated_links
from shard.bench.run import STORY_PROMPTS, machine, write_json
from shard.bench.topology import TOPOLOGIES
from shard.client import generate
from shard.local import LocalSwarm
from shard.v1 import api_pb2

RESULTS, DOC = "sampling.json", "benchmarks-sampling.md"
TEMPERATURES = (0.0, 0.7, 1.0)


def main(args) -> int:
    from transformers import AutoTokenizer

    from shard.local import default_model_dir
    from shard.model.synthetic import truncated_copy

    model_dir = Path(args.model) if args.model else default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(p)["input_ids"] for p in STORY_PROMPTS[:max(args.prompts, 1)]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as scratch:
        drafts = {"target": str(model_dir), "truncated": str(truncated_copy(model_dir, Path(scratch) / "t", layers=1)),
                  "ngram": "ngram"}
        # (label, draft, K, W)
        modes = [("plain", "none", 0, 1)] + [
            (f"{'sync' if w == 1 else 'pipelined'} {name} K={args.k}" + (f" W={w}" if w > 1 else ""), spec, args.k, w)
            for name, spec in drafts.items() for w in (1, args.w)]
        for name in args.topology or ["lan"]:
            topology = TOPOLOGIES[name]
            print(f"shard bench sampling: {name} ({topology.stages} stages) on {model_dir}", file=sys.stderr)
            with emulated_links(topology) as addresses, LocalSwarm(
                    model_dir, topology.stages, addresses=addresses, logs_to_files=True,
                    coordinator_args=["--threads=1", f"--draft={drafts['target']}", f"--draft={drafts['truncated']}"],
                    stage_args=["--threads=1"], start_timeout=600) as swarm:
                address = addresses.get("coordinator", (swarm.coordinator_address,))[0]
                rows += asyncio.run(_rows(address, swarm.client_tls(), name, modes, prompts, args.max_tokens))
    payload = {"command": shlex.join(["shard", "bench", *sys.argv[sys.argv.index("bench") + 1:]]),
               "machine": machine(), "max_tokens": args.max_tokens, "prompts": len(prompts), "rows": rows}
    write_json(Path(args.out) / RESULTS, payload)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / DOC).write_text(_doc(payload))
    print(markdown(payload))
    return 0


async def _rows(address, tls, topology: str, modes, prompts, max_tokens: int) -> list[dict]:
    def asked(ids, draft, k, w, temperature, seed, tokens):
        request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=ids), max_tokens=tokens,
                                          stop_at_eos=False, draft=draft, spec_k=k, in_flight=w)
        if temperature:
            request.temperature, request.seed = temperature, seed
        return request

    await generate(address, tls, asked(prompts[0], "none", 0, 1, 0.0, 0, 4), wait_ready_seconds=300)
    rows = []
    for temperature in TEMPERATURES:
        for label, draft, k, w in modes:
            await generate(address, tls, asked(prompts[0], draft, k, w, temperature, 0, 8))  # warm-up
            summaries = [(await generate(address, tls, asked(ids, draft, k, w, temperature, seed, max_tokens))).summary
                         for seed, ids in enumerate(prompts)]
            tokens, seconds = sum(s.tokens for s in summaries), sum(s.seconds for s in summaries)
            drafted = [s for s in summaries if s.spec_k]
            rows.append({
                "topology": topology, "temperature": temperature, "mode": label, "k": k, "w": w,
                "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
                "acceptance": (sum(s.acceptance_rate for s in drafted) / len(drafted)) if drafted else 0.0,
                "tokens_per_traversal": tokens / sum(s.traversals for s in summaries),
                "chunks_wasted": sum(s.chunks_wasted for s in summaries)})
            print(f"  T={temperature} {label}: {rows[-1]['tokens_per_second']:.1f} tok/s, "
                  f"acceptance {rows[-1]['acceptance']:.2f}", file=sys.stderr)
    return rows


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [f"Command: `{payload['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (CPU only), torch {m['torch']}; {payload['max_tokens']} "
             f"new tokens x {payload['prompts']} prompts per row (seeds 0, 1, ...).", ""]
    for topology in dict.fromkeys(r["topology"] for r in payload["rows"]):
        rows = [r for r in payload["rows"] if r["topology"] == topology]
        lines += [f"### {topology}", "",
                  "| mode | " + " | ".join(f"T={t:g} tok/s | T={t:g} acceptance | T={t:g} tokens/traversal"
                                            for t in TEMPERATURES) + " |",
                  "|---|" + "---:|" * (3 * len(TEMPERATURES))]
        for mode in dict.fromkeys(r["mode"] for r in rows):
            cells = []
            for t in TEMPERATURES:
                r = next(r for r in rows if r["mode"] == mode and r["temperature"] == t)
                cells += [f"{r['tokens_per_second']:.1f}", f"{r['acceptance']:.2f}" if r["k"] else "-",
                          f"{r['tokens_per_traversal']:.2f}"]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _doc(payload: dict) -> str:
    return "\n".join([
        "# Benchmarks: speculative sampling next to greedy", "",
        "The same swarm, prompts and modes at temperature 0 (greedy: the target's argmax), 0.7 and",
        "1.0 (speculative sampling: the tail accepts a drafted token with probability",
        "min(1, p/q), else draws from max(0, p - q); docs/sampling.md). Drafts: `target` (the",
        "model itself: q = p cut to its 64 most likely tokens), `truncated` (its first layer only,",
        "a draft that disagrees often) and `ngram` (prompt lookup: one-hot q). Acceptance is",
        "per drafted token; under sampling it is the mass p and q share (sum of min(p, q)),",
        "so a draft that matches the target's argmax well still loses some to the tails of p.",
        "A chunk sent ahead (W > 1) checks its first guess against the previous chunk's bonus",
        "draw, which agrees with probability sum of p*q: pipelined rows count those positions too.",
        "The draws are seeded, so the tokens (and tokens per traversal) repeat exactly; tok/s",
        "depends on the machine, and on a small shared machine on whatever else runs there.", "",
        markdown(payload)])
