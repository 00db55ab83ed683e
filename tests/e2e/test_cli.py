"""The services as separate OS processes, driven through the `shard` command."""

import json
import subprocess
import sys

import pytest

from shard.local import LocalSwarm

from support.reference import reference_greedy

pytestmark = pytest.mark.slow


def shard(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shard", *argv], capture_output=True, text=True, timeout=timeout)


def test_up_runs_a_whole_swarm_and_shuts_it_down(tinystories_dir):
    done = shard("up", "--model", str(tinystories_dir), "--stages", "3", "--draft", "ngram",
                 "--spec-k", "4", "--in-flight", "3", "--prompt", "Once upon a time", "--max-tokens", "40", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["output_ids"] == reference_greedy(tinystories_dir, result["prompt_ids"], 40)
    assert (result["spec_k"], result["in_flight"]) == (4, 3) and result["chunks_sent"] >= result["traversals"]
    assert result["text"].startswith(", a little girl named Lily")
    assert "loading layers" in done.stderr  # each stage says what it loads


def test_generate_against_separate_processes(tinystories_dir, tmp_path):
    with LocalSwarm(tinystories_dir, 2, workdir=tmp_path, logs_to_files=True) as swarm:
        done = shard("generate", "--coordinator", swarm.coordinator_address, "--certs", str(swarm.certs),
                     "--prompt-ids", "1,415,1022,264,727", "--max-tokens", "32", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["output_ids"] == reference_greedy(tinystories_dir, [1, 415, 1022, 264, 727], 32)
        refused = shard("generate", "--coordinator", swarm.coordinator_address, "--certs", str(swarm.certs),
                        "--prompt", "", "--max-tokens", "8")
        assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
        pids = {name: p.pid for name, p in swarm.processes.items()}
        assert len(set(pids.values())) == 4  # registry, two stages, coordinator: four processes
    codes = {name: p.returncode for name, p in swarm.processes.items()}
    assert codes == {name: 0 for name in codes}, codes  # every node shut down cleanly on SIGTERM
