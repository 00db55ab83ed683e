"""`shard bench gpu --device cpu --quick`: the GPU harness end to end on tiny dummy-weight
models (one process, micro benchmarks, every mode through real stage processes, memory
per node, rounds of concurrent sessions plain and pipelined with a draft), its JSON and its page. Two topologies of the three keep it to minutes: the
harness does the same for each."""

import json
import shlex
import subprocess
import sys

import pytest

from shard.bench.gpu import MICRO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TOPOLOGIES = {"lan": 2, "wan-3": 3}  # name -> stages

# The drafts this run compares, as LABEL=SPEC: the harness's own (the target as its own
# draft, the oracle at P = 1.0 and 0.8 running the draft model).
DRAFTS = ["target={target}", "oracle-1.0=oracle:1.0:{draft}", "oracle-0.8=oracle:0.8:{draft}"]
LABELS = [d.partition("=")[0] for d in DRAFTS]


def test_bench_gpu_on_cpu(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    argv = ["bench", "gpu", "--gpus", "cpu,cpu", "--quick", *(f"--draft={d}" for d in DRAFTS),
            *(f"--topology={t}" for t in TOPOLOGIES), "--sessions=1,3",
            "--session-draft=oracle-1.0", "--draft-batch=3", "--out", str(results), "--docs", str(docs)]
    done = subprocess.run([sys.executable, "-m", "shard", "--log-level", "WARNING", *argv],
                          capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((results / "gpu.json").read_text())
    assert payload["command"] == shlex.join(["shard", *argv])
    assert (payload["device"], payload["dtype"], payload["max_tokens"], payload["prompts"]) == ("cpu", "float32", 16, 1)
    assert payload["gpus"] == ["cpu", "cpu"]

    reference = payload["one_process"]["outputs"]
    assert payload["one_process"]["tokens_per_second"] > 0
    assert len(reference) == 1 and len(reference[0]) == 16 and len(set(reference[0])) > 4

    assert set(payload["micro"]) == set(MICRO)
    for name, entry in MICRO.items():
        want = "skipped: needs CUDA" if entry.cuda_only else "ran"
        assert payload["micro"][name]["status"] == want, name

    assert payload["topologies"] == list(TOPOLOGIES)
    modes = {"plain", *(f"{kind} {label} K=4{w}" for label in LABELS
                        for kind, w in (("sync", ""), ("pipelined", " W=4")))}
    for topology, stages in TOPOLOGIES.items():
        rows = [r for r in payload["rows"] if r["topology"] == topology]
        assert {r["mode"] for r in rows} == modes, topology
        for row in rows:  # float32: every mode gives generate()'s tokens
            assert row["outputs"] == reference and row["lossless"] and row["extra"]["ok"], (topology, row["mode"])
            assert row["extra"]["matched_prefix"] == [16] and row["extra"]["equals_swarm_plain"]
            assert row["tokens_per_second"] > 0 and row["bound_tokens_per_second"] > 0
            if row["draft"] == "oracle-1.0":  # it proposes the swarm's own plain tokens, always accepted
                assert row["acceptance"] == 1.0, (topology, row["mode"])
        nodes = payload["memory"][topology]["nodes"]
        assert nodes[0]["node"] == "coordinator"
        assert sorted(n["node"] for n in nodes[1:]) == [f"stage-{i}" for i in range(stages)]
        layers = [n["layers"] for n in nodes[1:]]  # in pipeline order, whatever order the stages joined in
        assert layers[0][0] == 0 and layers[-1][1] == 6 and all(a[1] == b[0] for a, b in zip(layers, layers[1:]))
        assert all(n["bytes"] > n.get("weight_bytes", 0) for n in nodes)
    rounds = payload["concurrency"]
    assert [(r["topology"], r["mode"], r["sessions"]) for r in rounds] == [
        (t, mode, n) for t in TOPOLOGIES for mode in ("plain", "pipelined oracle-1.0 K=4 W=4") for n in (1, 3)]
    assert payload["draft_args"] == ["--draft-batch=3"]
    for r in rounds:  # three sessions at once, each with the tokens of its prompt alone
        assert r["lossless"] and r["tokens"] == 16 * r["sessions"] and r["aggregate_tokens_per_second"] > 0
        assert len(r["stage_busy"]) == TOPOLOGIES[r["topology"]]
    assert payload["ok"]

    page = (docs / "benchmarks-gpu.md").read_text()
    assert "## Many sessions at once" in page and "### wan-3, plain" in page
    assert "### wan-3, pipelined oracle-1.0 K=4 W=4" in page and "`--draft-batch=3`" in page
    assert f"Command: `{payload['command']}`" in page
    assert all(f"\n### {t}\n" in page for t in payload["topologies"])
    assert "| plain |" in page and "| NO |" not in page
