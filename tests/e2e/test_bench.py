"""`shard bench wan` on a short configuration (relays, every mode, JSON, table and plot)
and `shard bench seal` with few repetitions, each writing where it is told."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_bench_smoke(tinystories_dir, tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    done = subprocess.run(
        [sys.executable, "-m", "shard", "--log-level", "WARNING", "bench", "wan", "--quick",
         "--model", str(tinystories_dir), "--topology", "wan-3", "--max-tokens", "12", "--prompts", "1",
         "--out", str(results), "--docs", str(docs)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out, doc, plot = results / "wan.json", docs / "benchmarks.md", docs / "benchmarks.png"
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert {r["mode"] for r in rows} >= {"plain", "pipelined target K=4 W=2", "pipelined ngram K=4 W=2"}
    assert all(r["lossless"] for r in rows)
    plain = next(r for r in rows if r["mode"] == "plain")
    # Every traversal crosses the emulated links: 16+11+40+38 ms of round trips is 52.5 ms one way.
    assert plain["traversal_seconds"] >= 0.0525
    assert all(r["bound_tokens_per_second"] > 0 for r in rows)
    assert "| plain |" in doc.read_text() and "![tokens per second](benchmarks.png)" in doc.read_text()
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # A results file from another machine renders the same table here.
    done = subprocess.run([sys.executable, "-m", "shard", "bench", "wan", "--from-json", str(out),
                           "--docs", str(tmp_path / "again"), "--no-plot"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    again = tmp_path / "again" / "benchmarks.md"
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["benchmarks.md"]
    def table(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("|")]

    # The bounds are recomputed from the measured pieces the file keeps: the same table.
    assert table(again.read_text()) == table(doc.read_text())
    assert "rendered with shard bench wan --from-json" in again.read_text() and "![" not in again.read_text()


def test_published_wan_results_still_render(tmp_path):
    """The committed results files are valid input for --from-json: one table of every
    topology they hold."""
    files = sorted(str(path) for path in (ROOT / "bench" / "results").glob("wan-*.json"))
    done = subprocess.run([sys.executable, "-m", "shard", "bench", "wan", "--from-json", *files,
                           "--docs", str(tmp_path), "--no-plot"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "benchmarks.md").read_text()
    for topology in ("lan", "wan-3", "wan-6"):
        assert f"\n### {topology}\n" in text


def test_seal_smoke(tmp_path):
    """The AEAD benchmark runs end to end (few repetitions), reports every piece and writes
    its JSON and Markdown into the folders it is given."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    done = subprocess.run([sys.executable, "-m", "shard", "bench", "seal", "--quick",
                           "--out", str(results), "--docs", str(docs)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((results / "seal_cost.json").read_text())
    assert report["command"] == f"shard bench seal --quick --out {results} --docs {docs}"
    assert f"Raw numbers: `{results / 'seal_cost.json'}`" in (docs / "seal-cost.md").read_text()
    assert {(r["hidden"], r["tokens"]) for r in report["codec"]} == {
        (h, t) for h in report["params"]["hidden"] for t in report["params"]["tokens"]}
    assert set(report["hops"]) == {"plaintext", "mtls"}
    for head in report["headline"].values():
        assert head["sealed_us"] > 0 and head["plain_us"] > 0 and isinstance(head["goal_met"], bool)
    assert [r["segments"] for r in report["split_seal"]] == [1, 2, 4]


def test_concurrency_bench_smoke(tinystories_dir, tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    done = subprocess.run(
        [sys.executable, "-m", "shard", "--log-level", "WARNING", "bench", "concurrency", "--model",
         str(tinystories_dir), "--topology", "lan", "--mode", "plain", "--sessions", "1,3", "--max-tokens", "6",
         "--out", str(results), "--docs", str(docs)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = json.loads((results / "concurrency.json").read_text())["rounds"]
    assert [(r["mode"], r["sessions"], r["tokens"]) for r in rounds] == [("plain", 1, 6), ("plain", 3, 18)]
    for r in rounds:
        assert r["lossless"] and 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"] and r["token_ms_p50"] <= r["token_ms_p99"]
        assert len(r["stage_busy"]) == 2 and all(0 < busy <= 1 for busy in r["stage_busy"])
    assert "| 3 |" in (docs / "benchmarks-concurrency.md").read_text()


def test_concurrency_bench_on_the_compute_model(tmp_path):
    """`--compute-model`: the compute check's random llama, no tokenizer, fixed prompt ids;
    each session's tokens still checked against generate()."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    argv = [sys.executable, "-m", "shard", "--log-level", "WARNING", "bench", "concurrency", "--compute-model",
            "--topology", "lan", "--mode", "plain", "--sessions", "1,2", "--max-tokens", "4",
            "--out", str(results), "--docs", str(docs)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = json.loads((results / "concurrency.json").read_text())["rounds"]
    assert [(r["sessions"], r["tokens"], r["lossless"]) for r in rounds] == [(1, 4, True), (2, 8, True)]
    assert rounds[0]["extra"]["model"].endswith("compute-model")
    both = subprocess.run([*argv[:8], "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert both.returncode != 0 and "give one" in both.stderr and "Traceback" not in both.stderr


def test_sampling_smoke(tinystories_dir, tmp_path):
    """`shard bench sampling`: every mode at each temperature, seeded, in one table."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    done = subprocess.run(
        [sys.executable, "-m", "shard", "--log-level", "WARNING", "bench", "sampling", "--model", str(tinystories_dir),
         "--max-tokens", "8", "--prompts", "1", "--k", "2", "--w", "2", "--out", str(results), "--docs", str(docs)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((results / "sampling.json").read_text())["rows"]
    assert {r["temperature"] for r in rows} == {0.0, 0.7, 1.0} and len(rows) == 3 * 7
    assert all(r["tokens"] == 8 for r in rows)
    greedy_target = next(r for r in rows if r["temperature"] == 0.0 and r["mode"] == "sync target K=2")
    assert greedy_target["acceptance"] == 1.0  # the target as its own draft, greedy: every guess stands
    assert "| pipelined ngram K=2 W=2 |" in (docs / "benchmarks-sampling.md").read_text()
