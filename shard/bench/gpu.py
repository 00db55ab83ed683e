"""`shard bench gpu`: on one GPU, in one run, side by side: one-process eager `generate()`
of an 8B-shaped target, the micro benchmarks of MICRO, and end-to-end decoding through
real stage processes over emulated links (`lan`, `wan-3`, `wan-6`) in every mode with
each draft, with each stage process's memory against its block's weights. Writes
<out>/gpu.json and <docs>/benchmarks-gpu.md.

The models are dummy-weight folders (shard.model.dummy): nothing big is written, every
process makes its own tensors on its device, and all see the same weights. `--device cpu`
runs the same harness on tiny shapes (what CI checks). `--shape 70b --gpus cuda:0,...`
runs a target no single GPU holds, one stage per GPU: then nothing runs the whole
target in one process, and every mode is checked against the swarm's plain decode."""

from __future__ import annotations

import asyncio
import gc
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shard.bench.concurrency import rounds_on
from shard.bench.gpu_report import doc
from shard.bench.run import Mode, Row, bench_topology, machine, modes_for, stage_infos, write_json
from shard.bench.topology import TOPOLOGIES
from shard.local import LocalSwarm
from shard.model.causal_lm import load_causal_lm
from shard.model.checkpoint import Checkpoint
from shard.model.synthetic import (LLAMA_1B, LLAMA_8B, LLAMA_70B, LLAMA_405B, TINY_DRAFT, TINY_TARGET,
                                   build_dummy_model)

RESULTS, DOC = "gpu.json", "benchmarks-gpu.md"
# LABEL=SPEC; {target} and {draft} stand for the dummy target and draft folders.
DEFAULT_DRAFTS = ("target={target}", "oracle-1.0=oracle:1.0:{draft}", "oracle-0.8=oracle:0.8:{draft}")
SETTINGS = ((4, 1), (4, 4))  # (K, W): synchronous and pipelined, K+1 = a stage's graphed chunk of 5
LARGER_CHUNKS = (16, 64, 256)  # a stage's chunk sizes above K + 1: prompts
GiB = 2**30
# A target whose weights take more than this share of one device is not run in one process.
ONE_PROCESS_SHARE = 0.8


@dataclass(frozen=True)
class Shapes:
    label: str
    target: dict
    draft: dict
    initializer_range: float


GPU_TARGETS = {"8b": LLAMA_8B, "70b": LLAMA_70B, "405b": LLAMA_405B}
# Large weights, so that greedy decoding of a random tiny model does not repeat one token.
CPU_SHAPES = Shapes("tiny llama target (6 layers), 2-layer tiny llama draft", TINY_TARGET, TINY_DRAFT, 0.5)


def shapes_for(device: torch.device, target: str) -> Shapes:
    if device.type != "cuda":
        return CPU_SHAPES
    return Shapes(f"{target.upper()}-shaped llama target, 1B-shaped llama draft", GPU_TARGETS[target], LLAMA_1B, 0.02)


@dataclass(frozen=True)
class MicroContext:
    """What a micro benchmark is told: where and in what precision to run, and the run's models."""

    device: torch.device
    dtype: torch.dtype
    quick: bool
    target_dir: Path
    draft_dir: Path


@dataclass(frozen=True)
class Micro:
    title: str
    run: Callable[[MicroContext], dict]  # a flat dict of results (numbers, strings, booleans)
    cuda_only: bool = False
    whole_target: bool = False  # loads the whole target in this process


def _stage_chunk(c: MicroContext) -> dict:
    from shard.bench.gpu_stage import stage_chunk_benchmark

    result = stage_chunk_benchmark(device=str(c.device), dtype=c.dtype, repeats=20 if c.quick else 50)
    memory = result.pop("memory")
    return {**result, **{f"memory_{key}": value for key, value in memory.items()}}


def _draft_step(c: MicroContext) -> dict:
    from shard.bench.draft_step import draft_step_bench

    shape = LLAMA_1B if c.device.type == "cuda" else TINY_DRAFT
    result = draft_step_bench(device=str(c.device), dtype=c.dtype, shape=shape, steps=16 if c.quick else 32)
    return {key: value for key, value in result.items() if key != "shape"}


def _draft_batch(c: MicroContext) -> dict:
    from shard.bench.draft_step import draft_batch_bench

    return draft_batch_bench(device=str(c.device), dtype=c.dtype, shape=LLAMA_1B, sessions=DRAFT_BATCH_SESSIONS,
                             steps=16 if c.quick else 32)


def _graphed_decode(c: MicroContext) -> dict:
    """One process decoding the target one token at a time: eager over a dynamic cache, and
    the static step replayed as a CUDA graph (the draft's machinery, on the target)."""
    from shard.bench.draft_step import draft_step_bench

    model = load_causal_lm(c.target_dir, device=c.device, dtype=c.dtype)
    result = draft_step_bench(device=str(c.device), dtype=c.dtype, model=model, steps=16 if c.quick else 32,
                              repeats=3)
    del model
    return {key: value for key, value in result.items() if key != "shape"}


DRAFT_BATCH_SESSIONS = 16
# The micro benchmarks, run in this process before the swarms.
MICRO: dict[str, Micro] = {
    "stage_chunk": Micro("a 16-layer 8B-shaped block's 9-token chunk: eager vs graphed", _stage_chunk,
                         cuda_only=True),
    "draft_step": Micro("a 1B-shaped draft step: eager vs graphed", _draft_step),
    "draft_batch": Micro(f"{DRAFT_BATCH_SESSIONS} sessions' 1B-shaped draft steps: a graphed slot each vs one "
                         "graphed pool", _draft_batch, cuda_only=True),
    "graphed_decode": Micro("one-process decode of the target, eager vs graphed (ms per token)", _graphed_decode,
                            whole_target=True),
}


@dataclass
class Reference:
    """One-process eager greedy `generate()` of the target: its speed, its tokens, and at
    every position the top-1 minus top-2 logit (what a numeric flip there would need)."""

    tokens_per_second: float
    outputs: list[list[int]]
    margins: list[list[float]]
    load_seconds: float


def main(args) -> int:
    devices = args.gpus.split(",") if args.gpus else [args.device]
    device = torch.device(devices[0])  # the draft's, and the one-process reference's
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    shapes = shapes_for(device, args.shape)
    settings = parse_settings(args.setting) if args.setting else list(SETTINGS)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    prompts = prompt_ids(args.prompts or (1 if args.quick else 2), shapes.target["vocab_size"])
    topologies = [TOPOLOGIES[name] for name in (args.topology or ["lan", "wan-3", "wan-6"])]
    counts = parse_counts(args.sessions) if args.sessions else []
    kv_args = [f"--{flag}={value}" for flag, value in (("static-batch", args.static_batch),
                                                       ("session-positions", args.session_positions)) if value]
    kv_args += ["--kv=static"] if args.static_batch else []  # a CPU stage's default is dynamic
    draft_args = [f"--draft-batch={args.draft_batch}"] if args.draft_batch else []
    with tempfile.TemporaryDirectory(prefix="shard-bench-gpu-") as scratch:
        target_dir = build_dummy_model(Path(scratch) / "target", shapes.target, dtype=dtype_name,
                                       initializer_range=shapes.initializer_range)
        draft_dir = build_dummy_model(Path(scratch) / "draft", shapes.draft, dtype=dtype_name,
                                      initializer_range=shapes.initializer_range, seed=1)
        drafts = parse_drafts(args.draft or DEFAULT_DRAFTS, target=target_dir, draft=draft_dir)
        if args.session_draft and args.session_draft not in drafts:
            raise SystemExit(f"--session-draft {args.session_draft}: not a --draft label ({', '.join(drafts)})")
        # The rounds with a draft run its setting with the most chunks in flight.
        k, w = max(settings, key=lambda setting: setting[1])
        session_mode = Mode("sync" if w == 1 else "pipelined", args.session_draft, k, w)
        session_decoding = (drafts[args.session_draft], k, w) if args.session_draft else None
        checkpoint = Checkpoint.open(target_dir)
        whole = fits_one_device(checkpoint.total_bytes, device)
        print(f"shard bench gpu: {shapes.label}, stages on {','.join(devices)} {dtype_name}", file=sys.stderr)
        reference = one_process(target_dir, device, dtype, prompts, max_tokens) if whole else None
        context = MicroContext(device, dtype, args.quick, target_dir, draft_dir)
        micro = {name: run_micro(entry, context, whole_target_fits=whole) for name, entry in MICRO.items()}
        rows, memory, rounds = [], {}, []
        for topology in topologies:
            print(f"shard bench gpu: {topology.name} ({topology.stages} stages)", file=sys.stderr)
            probe = MemoryProbe(device)

            def inspect(swarm, client_address, stage_addresses):
                probe(swarm, client_address, stage_addresses)
                if counts:  # each session's tokens against the same prompt generated alone
                    rounds.extend(rounds_on(swarm, client_address, stage_addresses, topology, counts, prompts,
                                            max_tokens))
                    if session_decoding:
                        rounds.extend(rounds_on(swarm, client_address, stage_addresses, topology, counts, prompts,
                                                max_tokens, mode=session_mode.label, decoding=session_decoding))

            topology_rows = bench_topology(
                topology, target_dir, drafts, modes_for(list(drafts), settings), prompts, max_tokens,
                reference.outputs if reference else None, device=",".join(devices), dtype=dtype_name,
                stage_args=stage_args(devices, topology.stages, checkpoint, spec_k=settings[0][0],
                                      sessions=max(counts, default=0)) + kv_args,
                coordinator_args=coordinator_args(device, dtype_name) + draft_args, inspect=inspect)
            rows += check_rows(topology_rows, reference, exact=dtype == torch.float32)
            memory[topology.name] = {"nodes": probe.rows, "device_used_bytes": probe.device_used_bytes}
        model_bytes = checkpoint.total_bytes
    payload = {
        "command": shlex.join(["shard", "bench", *sys.argv[sys.argv.index("bench") + 1:]]),
        "machine": {**machine(), "device": device_name(device)},
        "device": str(device), "gpus": devices, "dtype": dtype_name, "shapes": shapes.label,
        "target": shapes.target, "draft": shapes.draft, "model_bytes": model_bytes,
        "max_tokens": max_tokens, "prompts": len(prompts), "kv_args": kv_args, "draft_args": draft_args,
        "drafts": {k: _portable(v) for k, v in drafts.items()},
        "one_process": reference and {"tokens_per_second": reference.tokens_per_second,
                                      "load_seconds": reference.load_seconds, "outputs": reference.outputs},
        "micro": micro, "topologies": [t.name for t in topologies],
        "rows": [asdict(r) for r in rows], "memory": memory, "concurrency": [asdict(r) for r in rounds],
        "ok": all(r.extra["ok"] for r in rows) and all(r.lossless for r in rounds),
    }
    write_json(Path(args.out) / RESULTS, payload)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / DOC).write_text(doc(payload))
    print(doc(payload))
    return 0 if payload["ok"] else 1


def prompt_ids(count: int, vocab_size: int) -> list[list[int]]:
    """Fixed prompts of random ids (the dummy models have no tokenizer), 8, 12, 16... long."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (8 + 4 * i,), generator=generator).tolist() for i in range(count)]


def parse_drafts(values, *, target: Path, draft: Path) -> dict[str, str]:
    """LABEL=SPEC (or a bare SPEC, its own label) -> {label: spec}, placeholders filled."""
    drafts = {}
    for value in values:
        label, _, spec = value.partition("=") if "=" in value else (value, "", value)
        drafts[label] = spec.format(target=target, draft=draft)
    return drafts


def _portable(spec: str) -> str:
    """A draft spec without this run's scratch folders, for the results file."""
    return spec.replace(str(Path(tempfile.gettempdir())), "$TMP")


def parse_counts(value: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in value.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise SystemExit(f"--sessions takes counts of at least 1, comma-separated, not {value!r}")
    return counts


def parse_settings(values: list[str]) -> list[tuple[int, int]]:
    """K,W values -> [(K, W)]; one K per run, since the stages graph chunks of K + 1 (a
    verify chunk and a plain step must run one shape for bf16 speculation to equal plain)."""
    try:
        settings = [tuple(int(part) for part in value.split(",")) for value in values]
    except ValueError:
        settings = []
    if not settings or any(len(s) != 2 or s[0] < 1 or s[1] < 1 for s in settings):
        raise SystemExit(f"--setting takes K,W with K and W at least 1, not {values}")
    if len({k for k, _ in settings}) != 1:
        raise SystemExit(f"one K per run (the stages graph chunks of K + 1), not {sorted({k for k, _ in settings})}")
    return settings


def stage_args(devices: list[str], stages: int, checkpoint: Checkpoint, *, spec_k: int,
               sessions: int = 0) -> list[str]:
    """The stage processes share the devices, so speeds measured at start-up (at once, on
    the same chips) say nothing: all report the same, and blocks are cut by bytes. On GPUs
    each is told what it may take (any block's weights fit, plus KV, within its share of
    a GPU) and how many sessions to preallocate (4, or `sessions` for the concurrency
    rounds), instead of each claiming 90% of what is free; its smallest graphed chunk is K + 1."""
    if torch.device(devices[0]).type != "cuda":
        return ["--speed=1"]
    sharing = -(-stages // len(devices))  # stages on the busiest GPU
    share = min(torch.cuda.get_device_properties(torch.device(d)).total_memory for d in devices) * 0.9 // sharing
    chunks = sorted({spec_k + 1, *(size for size in LARGER_CHUNKS if size > spec_k + 1)})
    budget = int(min(checkpoint.total_bytes + 4 * GiB, share))
    return ["--speed=1", f"--max-sessions={max(4, sessions)}", f"--memory-budget={budget}",
            f"--chunk-sizes={','.join(map(str, chunks))}"]


def fits_one_device(model_bytes: int, device: torch.device) -> bool:
    """Whether one process can hold the whole target on `device` (a CPU: always)."""
    if device.type != "cuda":
        return True
    return model_bytes <= ONE_PROCESS_SHARE * torch.cuda.get_device_properties(device).total_memory


def coordinator_args(device: torch.device, dtype: str) -> list[str]:
    """The model drafts where the stages are."""
    if device.type != "cuda":
        return []
    return [f"--draft-device={device}", f"--draft-dtype={dtype}"]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_process(model_dir: Path, device: torch.device, dtype: torch.dtype, prompts: list[list[int]],
                max_tokens: int) -> Reference:
    """Eager `generate()` of the whole model in this process, timed after a warm-up; the
    model is freed before returning, so the swarms have the device to themselves."""
    began = time.perf_counter()
    model = load_causal_lm(model_dir, device=device, dtype=dtype)
    _synchronize(device)
    load_seconds = time.perf_counter() - began
    model.generation_config.eos_token_id = None  # as the swarm runs: max_tokens every time

    def run(ids: list[int]) -> tuple[list[int], list[float]]:
        tensor = torch.tensor([ids], device=device)
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_tokens,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
        top2 = torch.stack(out.scores)[:, 0].float().topk(2, dim=-1).values
        return out.sequences[0, len(ids):].tolist(), (top2[:, 0] - top2[:, 1]).tolist()

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as each node runs (--threads=1), so the ratios compare like with like
    try:
        run(prompts[0])  # warm-up
        began = time.perf_counter()
        results = [run(ids) for ids in prompts]
        seconds = time.perf_counter() - began
    finally:
        torch.set_num_threads(threads)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    outputs = [tokens for tokens, _ in results]
    return Reference(sum(map(len, outputs)) / seconds, outputs, [m for _, m in results], load_seconds)


def run_micro(entry: Micro, context: MicroContext, *, whole_target_fits: bool = True) -> dict:
    if entry.cuda_only and context.device.type != "cuda":
        return {"title": entry.title, "status": "skipped: needs CUDA"}
    if entry.whole_target and not whole_target_fits:
        return {"title": entry.title, "status": "skipped: the target does not fit one device"}
    result = entry.run(context)
    gc.collect()  # what it built goes before the swarms need the device
    if context.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"title": entry.title, "status": "ran", **result}


def check_rows(rows: list[Row], reference: Reference | None, *, exact: bool) -> list[Row]:
    """Each row against the reference and against the same swarm's plain decode. In float32
    every mode must give `generate()`'s tokens; in bfloat16 a verify chunk and a plain step
    run the same graphed shape, so every mode must give the swarm's plain tokens, while
    `generate()` may part at numeric near-ties (their margins are recorded). Without a
    reference (a target no one device holds) every mode must give the swarm's plain tokens."""
    plain = next(r for r in rows if r.k == 0).outputs
    if reference is None:
        for row in rows:
            row.extra.update(equals_swarm_plain=row.outputs == plain, must_equal="swarm plain decode",
                             ok=row.outputs == plain)
        return rows
    for row in rows:
        prefixes = [_matched(out, ref) for out, ref in zip(row.outputs, reference.outputs)]
        row.extra.update(
            matched_prefix=prefixes,
            divergence_margins=[margins[p] if p < len(margins) else None
                                for p, margins in zip(prefixes, reference.margins)],
            equals_swarm_plain=row.outputs == plain,
            must_equal="generate()" if exact else "swarm plain decode",
            ok=row.lossless if exact else row.outputs == plain)
    return rows


def _matched(got: list[int], want: list[int]) -> int:
    return next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))


class MemoryProbe:
    """After a topology's last mode: what each node process holds on the device (GPU: as
    nvidia-smi sees it; CPU: peak resident memory) against its block's weights and KV budget."""

    def __init__(self, device: torch.device):
        self.device, self.rows = device, []
        self.device_used_bytes: int | None = None  # the whole GPU, every process: where pids do not match


    def __call__(self, swarm: LocalSwarm, client_address: str, stage_addresses: list[str]) -> None:
        infos = asyncio.run(stage_infos(stage_addresses, swarm.node_tls("coordinator")))
        on_gpu = gpu_memory_by_pid() if self.device.type == "cuda" else {}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.device_used_bytes = total - free
        # Stages in pipeline order: the registry hands out blocks in the order stages join,
        # which is not the order they were started in.
        in_pipeline_order = sorted(range(len(infos)), key=lambda i: infos[i].layer_start)
        for node_id in ["coordinator", *(f"stage-{i}" for i in in_pipeline_order)]:
            pid = swarm.processes[node_id].pid
            held = on_gpu.get(pid) if self.device.type == "cuda" else _peak_rss(pid)
            row = {"node": node_id, "memory": "gpu" if self.device.type == "cuda" else "peak rss", "bytes": held}
            if node_id != "coordinator":
                info = infos[int(node_id.removeprefix("stage-"))]
                row.update(layers=[info.layer_start, info.layer_end], weight_bytes=info.weight_bytes,
                           kv_budget_bytes=info.kv_budget_bytes,
                           over_weights=held / info.weight_bytes if held else None)
            self.rows.append(row)


def gpu_memory_by_pid() -> dict[int, int]:
    """Device bytes per process as nvidia-smi reports them ({} if it cannot say)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    used = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            used[int(pid)] = int(mib) * 2**20
    return used


def _peak_rss(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

