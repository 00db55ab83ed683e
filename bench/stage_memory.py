"""A stage process's peak memory is about its block, not the model.

Starts a 4-stage swarm (separate processes) on a ~300 MB random model and reads each
stage's peak resident memory (VmHWM) next to a bare process that imports the same
libraries, so the difference is what the block costs. Writes bench/results/stage_memory.json
and docs/stage-memory.md.

    python -m bench.stage_memory
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from shard.launcher import LocalSwarm
from shard.model.checkpoint import Checkpoint
from shard.testing.tiny_models import build_compute_model

BARE = "import shard.cli, services.stage.main, time; print(open('/proc/self/status').read()); time.sleep(0)"


def peak_bytes(status: str) -> int:
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="shard-memory-") as scratch:
        model_dir = build_compute_model(Path(scratch) / "model")
        checkpoint = Checkpoint.open(model_dir)
        bare = peak_bytes(subprocess.run([sys.executable, "-c", BARE], capture_output=True, text=True,
                                         check=True).stdout)
        with LocalSwarm(model_dir, 4, logs_to_files=True, stage_args=["--threads=1"]) as swarm:
            import asyncio

            from shard.client import generate
            from shard.v1 import coordinator_pb2

            request = coordinator_pb2.GenerateRequest(prompt_ids=coordinator_pb2.TokenIds(ids=[1, 2, 3]), max_tokens=4)
            asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request, wait_ready_seconds=300))
            stages = {name: peak_bytes(Path(f"/proc/{p.pid}/status").read_text())
                      for name, p in swarm.processes.items() if name.startswith("stage")}
    total = checkpoint.total_bytes
    rows = [{"stage": name, "peak_bytes": peak, "above_bare_bytes": peak - bare,
             "fraction_of_model": (peak - bare) / total} for name, peak in sorted(stages.items())]
    payload = {"model_bytes": total, "bare_process_peak_bytes": bare, "stages": rows}
    out = Path("bench/results/stage_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    lines = ["# Stage memory", "", "Command: `python -m bench.stage_memory` (4 stages, separate processes, "
             f"a random llama of {total / 2**20:.0f} MiB of weights).", "",
             f"A bare process importing the same code peaks at {bare / 2**20:.0f} MiB.", "",
             "| stage | peak RSS (MiB) | above the bare process (MiB) | share of the model's weights |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['peak_bytes'] / 2**20:.0f} | {r['above_bare_bytes'] / 2**20:.0f} "
              f"| {r['fraction_of_model']:.2f} |" for r in rows]
    Path("docs/stage-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
