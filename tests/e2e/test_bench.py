"""`shard bench` on a short configuration: relays, every mode, JSON, table and plot."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_smoke(tinystories_dir, tmp_path):
    out, doc, plot = tmp_path / "wan.json", tmp_path / "benchmarks.md", tmp_path / "benchmarks.png"
    done = subprocess.run(
        [sys.executable, "-m", "shard", "--log-level", "WARNING", "bench", "--quick", "--model", str(tinystories_dir),
         "--topology", "wan-3", "--max-tokens", "12", "--prompts", "1",
         "--out", str(out), "--doc", str(doc), "--plot", str(plot)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert {r["mode"] for r in rows} >= {"plain", "pipelined target K=4 W=2", "pipelined ngram K=4 W=2"}
    assert all(r["lossless"] for r in rows)
    plain = next(r for r in rows if r["mode"] == "plain")
    # Every traversal crosses the emulated links: 16+11+40+38 ms of round trips is 52.5 ms one way.
    assert plain["traversal_seconds"] >= 0.0525
    assert all(r["bound_tokens_per_second"] > 0 for r in rows)
    assert "| plain |" in doc.read_text() and plot.read_bytes()[:4] == b"\x89PNG"
    # A results file from another machine renders the same table here.
    again = tmp_path / "again.md"
    done = subprocess.run([sys.executable, "-m", "shard", "bench", "--from-json", str(out), "--doc", str(again),
                           "--plot", ""], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    def table(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("|")]

    # The bounds are recomputed from the measured pieces the file keeps: the same table.
    assert table(again.read_text()) == table(doc.read_text())
    assert "rendered with shard bench --from-json" in again.read_text() and "![" not in again.read_text()


def test_seal_cost_smoke():
    """The AEAD benchmark runs end to end (few repetitions) and reports every piece."""
    done = subprocess.run([sys.executable, "-m", "bench.seal_cost", "--quick", "--no-write"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert {(r["hidden"], r["tokens"]) for r in report["codec"]} == {
        (h, t) for h in report["params"]["hidden"] for t in report["params"]["tokens"]}
    assert set(report["hops"]) == {"plaintext", "mtls"}
    for head in report["headline"].values():
        assert head["sealed_us"] > 0 and head["plain_us"] > 0 and isinstance(head["goal_met"], bool)
    assert [r["segments"] for r in report["split_seal"]] == [1, 2, 4]
