"""The GPU stage checks in one run, for a machine with a CUDA device:

    python scripts/gpu_stage_check.py [--json OUT.json] [--skip-tests] [--skip-bench]

1. the GPU tests (`pytest -m gpu tests/gpu`): graph replay == eager under random
   rollbacks, float32 graphed stages == one-process generate(), bf16 speculative and
   pipelined == the same swarm's plain decode, the benchmark function on a small block;
2. the stage-chunk benchmark: a 16-layer 8B-shaped block, 9-token chunk, bf16, eager vs
   graphed, in-process, against the weights-over-HBM bound (goal: graphed <= 3 ms).

Prints one PASS/FAIL line per check with its time (GOAL MET/MISSED for speed, which does
not fail the run), then the benchmark's numbers; exits 1 if a check failed. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_MS = 3.0  # issue 11: a 16-layer 8B-shaped block, 9-token chunk, bf16, in-process


def run_tests() -> bool:
    began = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-p", "no:cacheprovider",
               "--durations=0"]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT)
    ok = done.returncode == 0
    print(f"{'PASS' if ok else 'FAIL'} gpu tests (pytest exit {done.returncode}) in {time.perf_counter() - began:.0f} s",
          flush=True)
    return ok


def run_bench() -> tuple[bool, dict]:
    sys.path.insert(0, str(ROOT))
    from shard.bench.gpu_stage import stage_chunk_benchmark

    began = time.perf_counter()
    result = stage_chunk_benchmark(layers=16, chunk=9)
    seconds = time.perf_counter() - began
    identical = result["graph_identical_to_eager"]
    print(f"{'PASS' if identical else 'FAIL'} stage chunk: graph replay bytes == eager static bytes "
          f"({seconds:.0f} s incl. build and capture)")
    graphed = result["static_graphed_ms"]
    print(f"{'GOAL MET' if graphed <= GOAL_MS else 'GOAL MISSED'} stage chunk graphed {graphed:.2f} ms (goal <= {GOAL_MS} ms; "
          f"weights over HBM {result['weights_over_hbm_ms']:.2f} ms; static eager {result['static_eager_ms']:.2f} ms, "
          f"dynamic eager {result['dynamic_eager_ms']:.2f} ms; graph x{result['graph_speedup_over_dynamic_eager']:.1f} "
          f"over today's eager path)")
    memory = result["memory"]
    print(f"INFO peak memory {memory['max_memory_allocated'] / 2**30:.2f} GiB = "
          f"{memory['peak_over_weights_and_kv_allocated']:.3f} x (weights {memory['weight_bytes'] / 2**30:.2f} GiB "
          f"+ KV {memory['kv_allocated_bytes'] / 2**30:.2f} GiB); goal <= 1.2")
    print(json.dumps(result, indent=2), flush=True)
    return identical, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the benchmark's result here")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    import torch
    import transformers

    if not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    print(f"INFO {torch.cuda.get_device_name()}; torch {torch.__version__}; transformers {transformers.__version__}")
    ok = True
    if not args.skip_tests:
        ok &= run_tests()
    if not args.skip_bench:
        identical, result = run_bench()
        ok &= identical
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
