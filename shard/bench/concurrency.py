"""`shard bench concurrency`: many sessions at once on one ring, over emulated links.

For each topology and decoding mode, rounds of 1, 2, 4, 8, 16 concurrent sessions (each
its own client connection) run one generation each; a round reports the aggregate and
per-session tokens per second, time to first token and per-token latency (p50 / p99),
each stage's busy fraction (its compute time over the round's wall time) and how many of
its chunks ran batched with other sessions'. Every session's tokens are checked against
single-process `generate()`. Writes <out>/concurrency.json and <docs>/benchmarks-concurrency.md."""

from __future__ import annotations

import asyncio
import math
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shard.bench.compute import PROMPT as COMPUTE_PROMPT
from shard.bench.network import emulated_links
from shard.bench.run import STORY_PROMPTS, machine, single_process, stage_infos, write_json
from shard.bench.topology import TOPOLOGIES, Topology
from shard.bench.wan import deep_enough
from shard.client import generate
from shard.local import LocalSwarm
from shard.v1 import api_pb2, api_pb2_grpc
from shard.wire.tls import open_channel

RESULTS, DOC = "concurrency.json", "benchmarks-concurrency.md"
# mode -> (draft, K, W): plain decode, and pipelined speculative decoding with the target
# as its own draft (every draft accepted: the ring, not the draft, sets the pace).
MODES = {"plain": ("none", 0, 1), "pipelined": ("target", 4, 4)}


@dataclass
class Round:
    topology: str
    mode: str
    sessions: int
    tokens: int
    seconds: float
    aggregate_tokens_per_second: float
    session_tokens_per_second: float  # mean over the sessions, each over its own time
    ttft_ms_p50: float
    ttft_ms_p99: float
    token_ms_p50: float  # per-token latency: each delta's gap since the last, spread over its tokens
    token_ms_p99: float
    stage_busy: list[float]  # each stage's compute seconds / the round's seconds
    stage_batched: list[float]  # each stage's share of chunks run in a forward with others
    chunks_per_forward: list[float]  # each stage's mean batch size in the round
    lossless: bool
    speedup: float = 1.0  # aggregate / the one-session round's aggregate
    extra: dict = field(default_factory=dict)


@dataclass
class _Session:
    began: float
    deltas: list[tuple[float, int]]  # (arrival, tokens)
    ids: list[int]


async def _stream(address, tls, request) -> _Session:
    began = time.perf_counter()
    session = _Session(began, [], [])
    async with open_channel(address, tls) as channel:
        async for response in api_pb2_grpc.InferenceServiceStub(channel).Generate(request):
            if response.HasField("delta") and response.delta.ids:
                session.deltas.append((time.perf_counter(), len(response.delta.ids)))
                session.ids += response.delta.ids
    return session


def _percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value at or above a fraction q of them."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)] if ordered else 0.0


def decoding_of(mode: str, target: str) -> tuple[str, int, int]:
    """A mode's (draft, K, W), the target's folder for "target"."""
    draft, k, w = MODES[mode]
    return target if draft == "target" else draft, k, w


def _request(ids: list[int], max_tokens: int, decoding: tuple[str, int, int]) -> api_pb2.GenerateRequest:
    draft, k, w = decoding
    return api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=ids), max_tokens=max_tokens, stop_at_eos=False,
                                   draft=draft, spec_k=k, in_flight=w)


async def _round(swarm_addresses, tls, stage_tls, topology: Topology, mode: str, decoding: tuple[str, int, int],
                 sessions: int, prompts: list[list[int]], expected: list[list[int]], max_tokens: int) -> Round:
    client_address, stage_addresses = swarm_addresses
    before = await stage_infos(stage_addresses, stage_tls)
    began = time.perf_counter()
    picks = [i % len(prompts) for i in range(sessions)]
    done = await asyncio.gather(*(_stream(client_address, tls, _request(prompts[p], max_tokens, decoding))
                                  for p in picks))
    seconds = time.perf_counter() - began
    after = await stage_infos(stage_addresses, stage_tls)
    tokens = sum(len(s.ids) for s in done)
    ttft = [1000 * (s.deltas[0][0] - s.began) for s in done if s.deltas]
    per_token = [1000 * (t - prev) / n for s in done for (prev, _), (t, n) in zip(s.deltas, s.deltas[1:])
                 for _ in range(n)]
    frames = [max(a.frames_processed - b.frames_processed, 1) for a, b in zip(after, before)]
    return Round(
        topology=topology.name, mode=mode, sessions=sessions, tokens=tokens, seconds=seconds,
        aggregate_tokens_per_second=tokens / seconds,
        session_tokens_per_second=sum(len(s.ids) / (s.deltas[-1][0] - s.began) for s in done) / sessions,
        ttft_ms_p50=_percentile(ttft, 0.5), ttft_ms_p99=_percentile(ttft, 0.99),
        token_ms_p50=_percentile(per_token, 0.5), token_ms_p99=_percentile(per_token, 0.99),
        stage_busy=[(a.compute_seconds - b.compute_seconds) / seconds for a, b in zip(after, before)],
        stage_batched=[(a.frames_batched - b.frames_batched) / n for a, b, n in zip(after, before, frames)],
        chunks_per_forward=[(a.frames_processed - b.frames_processed) / max(a.forwards - b.forwards, 1)
                            for a, b in zip(after, before)],
        lossless=all(s.ids == expected[p] for s, p in zip(done, picks)))


def rounds_on(swarm: LocalSwarm, client_address: str, stage_addresses: list[str], topology: Topology,
              counts: list[int], prompts: list[list[int]], max_tokens: int, expected: list[list[int]] | None = None,
              *, mode: str = "plain", decoding: tuple[str, int, int] | None = None) -> list[Round]:
    """Rounds of `counts` concurrent sessions of `mode` on a running swarm (or, named `mode`,
    of `decoding`: a draft spec, K and W), each session's tokens checked against `expected`
    (default: each prompt generated alone first)."""
    tls, stage_tls, target = swarm.client_tls(), swarm.node_tls("coordinator"), str(swarm.model_dir)
    decoding = decoding or decoding_of(mode, target)
    if expected is None:
        expected = [asyncio.run(_stream(client_address, tls, _request(p, max_tokens, decoding))).ids
                    for p in prompts]
    rounds = [asyncio.run(_round((client_address, stage_addresses), tls, stage_tls, topology, mode, decoding, n,
                                 prompts, expected, max_tokens)) for n in counts]
    for r in rounds:
        r.speedup = r.aggregate_tokens_per_second / rounds[0].aggregate_tokens_per_second
        r.extra["model"] = target
    print(f"shard bench: {topology.name} {mode}: "
          + ", ".join(f"{r.sessions}: {r.aggregate_tokens_per_second:.1f} tok/s" for r in rounds), file=sys.stderr)
    return rounds


def bench_topology(topology: Topology, model_dir: Path, modes: list[str], counts: list[int],
                   prompts: list[list[int]], expected: list[list[int]], max_tokens: int,
                   stage_args: list[str]) -> list[Round]:
    coordinator_args = ["--threads=1", f"--draft={model_dir}", "--max-concurrent=64"]
    rounds = []
    with emulated_links(topology) as addresses, LocalSwarm(
            model_dir, topology.stages, addresses=addresses, logs_to_files=True, device="cpu",
            coordinator_args=coordinator_args, stage_args=["--threads=1", *stage_args], start_timeout=600) as swarm:
        client_address = addresses.get("coordinator", (swarm.coordinator_address,))[0]
        stage_addresses = [addresses.get(f"stage-{i}", (None,))[0] or swarm.address_of(f"stage-{i}")
                           for i in range(topology.stages)]
        for mode in modes:
            warm_up = _request(prompts[0], 4, decoding_of(mode, str(model_dir)))
            asyncio.run(generate(client_address, swarm.client_tls(), warm_up, wait_ready_seconds=300))
            rounds += rounds_on(swarm, client_address, stage_addresses, topology, counts, prompts, max_tokens,
                                expected, mode=mode)
    return rounds


# Prompts for a model without a tokenizer (the compute model): ids within its vocabulary,
# the compute check's own first.
FIXED_PROMPTS = (COMPUTE_PROMPT, [2, 40, 77, 300, 12], [7, 7, 100, 2000, 31, 64])


def main(args) -> int:
    from transformers import AutoTokenizer

    from shard.local import default_model_dir
    from shard.model.synthetic import build_compute_model

    if args.compute_model and args.model:
        raise SystemExit("--compute-model and --model name two different targets: give one")
    topologies = [TOPOLOGIES[name] for name in (args.topology or ["lan", "wan-3"])]
    counts = sorted({int(n) for n in args.sessions.split(",")})
    modes = args.mode or list(MODES)
    stage_args = [f"--max-batch={args.max_batch}"]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as scratch:
        model_dir = (build_compute_model(Path(scratch) / "compute-model") if args.compute_model
                     else Path(args.model) if args.model else default_model_dir())
        for topology in topologies:
            target = deep_enough(model_dir, topology.stages, Path(scratch))
            if args.compute_model:
                prompts = [list(p) for p in FIXED_PROMPTS]
            else:
                tokenizer = AutoTokenizer.from_pretrained(target)
                prompts = [tokenizer(p)["input_ids"] for p in STORY_PROMPTS]
            _, expected = single_process(target, prompts, args.max_tokens)
            print(f"shard bench concurrency: {topology.name} ({topology.stages} stages) on {target}", file=sys.stderr)
            rounds += bench_topology(topology, target, modes, counts, prompts, expected, args.max_tokens, stage_args)
    payload = {"command": shlex.join(["shard", "bench", *sys.argv[sys.argv.index("bench") + 1:]]),
               "machine": machine(), "max_tokens": args.max_tokens, "max_batch": args.max_batch,
               "rounds": [asdict(r) for r in rounds]}
    write_json(Path(args.out) / RESULTS, payload)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / DOC).write_text(document(payload))
    print(markdown(payload))
    return 0 if all(r.lossless for r in rounds) else 1


def markdown(payload: dict) -> str:
    m = payload["machine"]
    return "\n".join([f"Command: `{payload['command']}`", "",
                      f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; {payload['max_tokens']} new "
                      f"tokens per session; stages batch up to {payload['max_batch']} chunks per forward.", "",
                      *rounds_tables(payload["rounds"])])


def rounds_tables(rounds: list[dict]) -> list[str]:
    """A table per topology and mode of rounds (as dicts)."""
    lines = []
    for topology in dict.fromkeys(r["topology"] for r in rounds):
        for mode in dict.fromkeys(r["mode"] for r in rounds if r["topology"] == topology):
            rows = [r for r in rounds if r["topology"] == topology and r["mode"] == mode]
            lines += [f"### {topology}, {mode}", "", f"Model `{rows[0]['extra']['model']}`.", "",
                      "| sessions | aggregate tok/s | x one | per-session tok/s | TTFT p50 / p99 ms "
                      "| per-token p50 / p99 ms | stage busy | chunks batched | chunks per forward | lossless |",
                      "|---:|---:|---:|---:|---:|---:|---|---|---|:-:|"]
            for r in rows:
                lines.append(
                    f"| {r['sessions']} | {r['aggregate_tokens_per_second']:.1f} | {r['speedup']:.2f}x "
                    f"| {r['session_tokens_per_second']:.1f} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} "
                    f"| {r['token_ms_p50']:.0f} / {r['token_ms_p99']:.0f} "
                    f"| {' '.join(f'{b:.0%}' for b in r['stage_busy'])} "
                    f"| {' '.join(f'{b:.0%}' for b in r['stage_batched'])} "
                    f"| {' '.join(f'{b:.1f}' for b in r['chunks_per_forward'])} "
                    f"| {'yes' if r['lossless'] else 'NO'} |")
            lines.append("")
    return lines


def document(payload: dict) -> str:
    return "\n".join([
        "# Benchmarks: many sessions at once", "",
        "Rounds of 1, 2, 4, 8, 16 concurrent sessions on one ring, every ring edge behind a delaying",
        "relay as in [benchmarks.md](benchmarks.md); each session is its own client connection and",
        "runs one generation. `x one`: the round's aggregate over the one-session round's. Stage busy:",
        "each stage's compute time over the round's wall time (stage order). Chunks batched: each",
        "stage's share of chunks that ran in one forward with other sessions' chunks (continuous",
        "batching, [batching.md](batching.md)); chunks per forward: each stage's mean batch in the",
        "round. Lossless: every session's tokens equal single-process `generate()`.", "",
        markdown(payload)])
