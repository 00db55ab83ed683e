"""`shard bench memory`: a stage process's peak memory is about its block, not the model.

Starts a 4-stage swarm (separate processes; `--stages`) on a ~530 MiB random model
(`--model` for another), generates, and reads each stage's peak resident memory (VmHWM)
and its block's weights (Info). The same is done for a 1-stage swarm, whose one stage
holds the whole model: that stage is the reference, so runtime costs that do not depend
on the block (libraries, thread pools, buffers) cancel out. Writes
<out>/stage_memory.json and <docs>/stage-memory.md.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import tempfile
from pathlib import Path

from shard.client import generate
from shard.local import LocalSwarm
from shard.model.checkpoint import Checkpoint
from shard.model.synthetic import build_compute_model
from shard.v1 import api_pb2, stage_pb2, stage_pb2_grpc
from shard.wire.tls import open_channel

MiB = 2**20
RESULTS, DOC = "stage_memory.json", "stage-memory.md"


def status_bytes(status: str, field: str) -> int:
    line = next(line for line in status.splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


async def _info(swarm: LocalSwarm, node_id: str) -> stage_pb2.InfoResponse:
    async with open_channel(swarm.address_of(node_id), swarm.client_tls()) as channel:
        return await stage_pb2_grpc.StageServiceStub(channel).Info(stage_pb2.InfoRequest())


def measure(model_dir: Path, stages: int) -> list[dict]:
    """Each stage after loading and one generation: block, weights, peak and current RSS."""
    with LocalSwarm(model_dir, stages, logs_to_files=True, device="cpu", stage_args=["--threads=1"]) as swarm:
        request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=[1, 2, 3]), max_tokens=4)
        asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request, wait_ready_seconds=300))
        rows = []
        for index in range(stages):
            node_id = f"stage-{index}"
            info = asyncio.run(_info(swarm, node_id))
            status = Path(f"/proc/{swarm.processes[node_id].pid}/status").read_text()
            rows.append({"stage": node_id, "layers": [info.layer_start, info.layer_end],
                         "weight_bytes": info.weight_bytes, "peak_bytes": status_bytes(status, "VmHWM"),
                         "resident_bytes": status_bytes(status, "VmRSS")})
    return rows


def main(args) -> int:
    with tempfile.TemporaryDirectory(prefix="shard-memory-") as scratch:
        model_dir = Path(args.model) if args.model else build_compute_model(Path(scratch) / "model")
        checkpoint = Checkpoint.open(model_dir)
        total, layers = checkpoint.total_bytes, checkpoint.num_layers
        whole = measure(model_dir, 1)[0]
        split = measure(model_dir, args.stages)
    # What a stage costs beyond its weights, measured on the stage that holds them all.
    runtime = whole["peak_bytes"] - whole["weight_bytes"]
    for row in split:
        row["peak_share_of_whole_model_stage"] = row["peak_bytes"] / whole["peak_bytes"]
        row["peak_above_runtime_share_of_model"] = (row["peak_bytes"] - runtime) / total
    command = shlex.join(["shard", "bench", *sys.argv[sys.argv.index("bench") + 1:]])
    payload = {"command": command, "model_bytes": total, "whole_model_stage": whole, "runtime_bytes": runtime,
               "stages": split}
    out = Path(args.out) / RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    model = f"`{model_dir}`" if args.model else "a random llama"
    lines = [
        "# Stage memory", "",
        f"Command: `{command}` (separate processes, {model} of "
        f"{total / MiB:.0f} MiB of weights, {layers} layers).", "",
        f"Reference: a 1-stage swarm, whose stage holds the whole model ({whole['weight_bytes'] / MiB:.0f} MiB of "
        f"weights), peaks at {whole['peak_bytes'] / MiB:.0f} MiB: {runtime / MiB:.0f} MiB of it is the runtime "
        f"(Python, torch, gRPC, buffers), whatever the block. Below, a {args.stages}-stage split of the same model; "
        "the last column is a stage's peak less that runtime, as a share of the model's weights.", "",
        "| stage | layers | weights (MiB) | weights share | peak RSS (MiB) | peak / whole-model stage "
        "| peak less runtime, share of model |",
        "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['stage']} | [{r['layers'][0]}, {r['layers'][1]}) | {r['weight_bytes'] / MiB:.0f} "
              f"| {r['weight_bytes'] / total:.2f} | {r['peak_bytes'] / MiB:.0f} "
              f"| {r['peak_share_of_whole_model_stage']:.2f} | {r['peak_above_runtime_share_of_model']:.2f} |"
              for r in split]
    doc = Path(args.docs) / DOC
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
