"""The services as separate OS processes, driven through the `shard` command: what an
operator sees, mistakes included."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard.local import LocalSwarm

from support.reference import reference_greedy

pytestmark = pytest.mark.slow


def shard(*argv: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shard", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_up_runs_a_whole_swarm_and_shuts_it_down(tinystories_dir):
    done = shard("up", "--verbose", "--model", str(tinystories_dir), "--stages", "3", "--draft", "ngram",
                 "--draft", str(tinystories_dir), "--draft-device", "cpu", "--draft-dtype", "float32",
                 "--device", "cpu", "--spec-k", "4", "--in-flight", "3", "--prompt", "Once upon a time",
                 "--max-tokens", "40", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["output_ids"] == reference_greedy(tinystories_dir, result["prompt_ids"], 40)
    assert (result["spec_k"], result["in_flight"]) == (4, 3) and result["chunks_sent"] >= result["traversals"]
    assert result["text"].startswith(", a little girl named Lily")
    assert "loading layers" in done.stderr  # each stage says what it loads (--verbose: on the terminal)


def test_generate_against_separate_processes(tinystories_dir, tmp_path):
    with LocalSwarm(tinystories_dir, 2, workdir=tmp_path, logs_to_files=True) as swarm:
        done = shard("generate", "--coordinator", swarm.coordinator_address, "--certs", str(swarm.certs),
                     "--prompt-ids", "1,415,1022,264,727", "--max-tokens", "32", "--json",
                     "--receipt", str(tmp_path / "receipt.json"))
        assert done.returncode == 0, done.stderr
        greedy = json.loads(done.stdout)
        assert greedy["output_ids"] == reference_greedy(tinystories_dir, [1, 415, 1022, 264, 727], 32)
        verified = shard("receipt", "verify", str(tmp_path / "receipt.json"), "--ca", str(swarm.certs / "ca.pem"))
        assert verified.returncode == 0 and "VALID" in verified.stdout, verified.stderr
        sampled = [json.loads(shard(
            "generate", "--coordinator", swarm.coordinator_address, "--certs", str(swarm.certs), "--prompt-ids",
            "1,415,1022,264,727", "--max-tokens", "32", "--temperature", "0.9", "--top-p", "0.95", "--top-k", "50",
            "--seed", "5", "--json").stdout) for _ in range(2)]
        assert sampled[0]["output_ids"] == sampled[1]["output_ids"] and sampled[0]["seed"] == "5"
        stop = greedy["text"][10:15]
        stopped = json.loads(shard("generate", "--coordinator", swarm.coordinator_address, "--certs", str(swarm.certs),
                                   "--prompt-ids", "1,415,1022,264,727", "--max-tokens", "32", "--stop", stop,
                                   "--json").stdout)
        assert stopped["finish_reason"] == "FINISH_REASON_STOP"
        assert stopped["text"] == greedy["text"][:greedy["text"].index(stop)]
        refused = shard("generate", "--coordinator", swarm.coordinator_address, "--certs", str(swarm.certs),
                        "--prompt", "", "--max-tokens", "8")
        assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
        pids = {name: p.pid for name, p in swarm.processes.items()}
        assert len(set(pids.values())) == 4  # registry, two stages, coordinator: four processes
    codes = {name: p.returncode for name, p in swarm.processes.items()}
    assert codes == {name: 0 for name in codes}, codes  # every node shut down cleanly on SIGTERM


COMMANDS = ["certs", "registry", "stage", "coordinator", "generate", "bench", "up", "receipt"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command):
    done = shard(command, "--help", timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: shard {command}"), done.stderr
    if command in ("registry", "stage", "coordinator"):  # every flag names its variable
        usage, _, options = done.stdout.partition("options:")
        flags = set(re.findall(r"\[(--[a-z-]+)", usage)) - {"--help"}
        assert {"--model", "--registry", "--health-listen"} & flags
        for flag in flags:
            assert f"[env SHARD_{flag[2:].upper().replace('-', '_')}]" in " ".join(options.split()), flag


def test_parsing_and_help_import_neither_torch_nor_transformers():
    done = subprocess.run([sys.executable, "-c", "import sys; from shard.cli import parser; p = parser(); "
                           "p.parse_args(['stage', '--model', 'm']); "
                           "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tinystories_dir) -> dict[str, Path]:
    """Certificates of one deployment, one whose ca.pem is another deployment's, and model
    folders an operator could get wrong."""
    root = tmp_path_factory.mktemp("mistakes")
    certs, other = root / "certs", root / "other"
    assert shard("certs", "local", str(certs), "--stages", "1").returncode == 0
    assert shard("certs", "init", str(other)).returncode == 0
    foreign = root / "foreign"
    shutil.copytree(certs, foreign)
    shutil.copy(other / "ca.pem", foreign / "ca.pem")
    (root / "empty").mkdir()
    (root / "config-only").mkdir()
    shutil.copy(tinystories_dir / "config.json", root / "config-only" / "config.json")
    return {"root": root, "certs": certs, "foreign": foreign, "model": tinystories_dir}


# (command line, environment, what the one line must say); {name} is a path of `deployment`.
MISTAKES = {
    "missing model folder": (["stage", "--model", "{root}/nowhere", "--registry", "127.0.0.1:1", "--certs", "{certs}"],
                             {}, "--model {root}/nowhere: no such folder"),
    "no config.json": (["registry", "--model", "{root}/empty", "--certs", "{certs}"], {}, "no config.json"),
    "no weights": (["coordinator", "--model", "{root}/config-only", "--registry", "127.0.0.1:1", "--certs",
                    "{certs}"], {}, "no *.safetensors weights"),
    "no model at all": (["stage", "--registry", "127.0.0.1:1", "--certs", "{certs}"], {}, "give --model DIR"),
    "no certificates": (["stage", "--model", "{model}", "--registry", "127.0.0.1:1"], {},
                        "give --certs DIR (or --insecure for plaintext)"),
    "missing certs folder": (["stage", "--model", "{model}", "--registry", "127.0.0.1:1", "--certs", "{root}/gone"],
                             {}, "--certs {root}/gone: no such folder"),
    "missing certificate": (["stage", "--model", "{model}", "--registry", "127.0.0.1:1", "--certs", "{certs}",
                             "--node-id", "stage-9"], {}, "{certs}/stage-9.pem is missing"),
    "another CA": (["stage", "--model", "{model}", "--registry", "127.0.0.1:1", "--certs", "{foreign}"], {},
                   "{foreign}/stage-0.pem was not issued by a CA in {foreign}/ca.pem"),
    "bad size": (["stage", "--model", "{model}", "--registry", "127.0.0.1:1", "--insecure", "--memory-budget",
                  "12q"], {}, "not a size: '12q'"),
    "bad chunk sizes": (["stage", "--model", "{model}", "--registry", "127.0.0.1:1", "--insecure", "--chunk-sizes",
                         "5,x"], {}, "--chunk-sizes must be positive integers separated by commas, not '5,x'"),
    "bad port": (["registry", "--model", "{model}", "--insecure", "--listen", "0.0.0.0:99999"], {},
                 "--listen '0.0.0.0:99999' is not HOST:PORT"),
    "negative KV reservation": (["registry", "--model", "{model}", "--insecure", "--kv-reserve-positions", "-1"], {},
                                "--kv-reserve-positions must be 0 or more"),
    "bad variable": (["stage", "--model", "{model}", "--registry", "127.0.0.1:1", "--insecure"],
                     {"SHARD_MAX_SESSIONS": "many"}, "SHARD_MAX_SESSIONS"),
    "unknown draft": (["coordinator", "--model", "{model}", "--registry", "127.0.0.1:1", "--insecure", "--draft",
                       "{root}/nowhere"], {}, "--draft '{root}/nowhere' is neither 'ngram' nor a model folder"),
    "oracle without a probability": (["coordinator", "--model", "{model}", "--registry", "127.0.0.1:1",
                                      "--insecure", "--draft", "oracle:often"], {},
                                     "oracle:P needs a probability P in [0, 1]"),
    "bad draft dtype": (["coordinator", "--model", "{model}", "--registry", "127.0.0.1:1", "--insecure"],
                        {"SHARD_DRAFT_DTYPE": "int8"}, "--draft-dtype must be one of auto, float32"),
    "client without coordinator": (["generate", "--insecure"], {}, "give --coordinator HOST:PORT"),
    "client without its certificate": (["generate", "--coordinator", "127.0.0.1:1", "--certs", "{root}/empty"], {},
                                       "{root}/empty: no client certificate: expected ca.pem, client.pem"),
    "HTTP API open without keys": (["coordinator", "--model", "{model}", "--registry", "127.0.0.1:1", "--insecure",
                                    "--http-listen", "0.0.0.0:8000"], {}, "give --api-key-file FILE"),
    "certs over an existing CA": (["certs", "init", "{certs}"], {}, "CA already exists"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_an_operator_mistake_is_one_line_and_a_failure(deployment, mistake):
    argv, env, expected = MISTAKES[mistake]
    done = shard(*(arg.format(**deployment) for arg in argv), env=env, timeout=60)
    command = argv[0]
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [done.stderr.splitlines()[0]], done.stderr  # one line
    assert done.stderr.startswith(f"shard {command}: ") and expected.format(**deployment) in done.stderr, done.stderr


def test_an_unreachable_registry_is_retried_said_once_and_given_up(deployment):
    done = shard("--log-level", "WARNING", "stage", "--model", str(deployment["model"]), "--insecure",
                 "--registry", "127.0.0.1:1", "--join-timeout", "2", "--device", "cpu", "--speed", "1", "--quiet",
                 timeout=120)
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1] == "shard stage: registry 127.0.0.1:1 unreachable (connection refused); gave up after 2 s"
    retries = [line for line in lines if "unreachable (connection refused); retrying" in line]
    assert len(retries) == 1, done.stderr  # each failure in words, once


def test_up_says_when_the_model_does_not_fit(tinystories_dir):
    done = shard("up", "--model", str(tinystories_dir), "--memory-budget", "1MiB", "--max-tokens", "4")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("shard up: the model does not fit the stages: the model needs "), done.stderr


def test_up_shows_the_prompt_the_text_and_one_summary_line(tinystories_dir):
    done = shard("up", "--model", str(tinystories_dir), "--stages", "2", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("Once upon a time, a little girl")
    summary = [line for line in done.stderr.splitlines() if line]
    assert len(summary) == 1 and summary[0].startswith("[8 tokens in "), done.stderr
    logs = Path(summary[0].rpartition("logs in ")[2].rstrip("]"))
    node_logs = "".join(path.read_text() for path in logs.glob("*.log"))
    assert "loading layers" in node_logs  # the nodes' logs went to the file it named
    for text in (done.stdout, done.stderr, node_logs):
        assert "Warning" not in text and "WARNING" not in text and " W " not in text
    shutil.rmtree(logs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stage_configured_only_by_environment_joins(tinystories_dir, tmp_path):
    registry_file, stage_file = tmp_path / "registry.address", tmp_path / "stage.address"
    health = f"127.0.0.1:{free_port()}"
    registry = subprocess.Popen([sys.executable, "-m", "shard", "registry"], stderr=subprocess.DEVNULL, env={
        **os.environ, "SHARD_MODEL": str(tinystories_dir), "SHARD_INSECURE": "1", "SHARD_LISTEN": "127.0.0.1:0",
        "SHARD_ADDRESS_FILE": str(registry_file)})
    stage = None
    try:
        registry_address = wait_for(registry_file, registry)
        stage = subprocess.Popen([sys.executable, "-m", "shard", "stage"], stderr=subprocess.DEVNULL, env={
            **os.environ, "SHARD_MODEL": str(tinystories_dir), "SHARD_INSECURE": "true",
            "SHARD_NODE_ID": "stage-env", "SHARD_REGISTRY": registry_address, "SHARD_LISTEN": "127.0.0.1:0",
            "SHARD_ADDRESS_FILE": str(stage_file), "SHARD_DEVICE": "cpu", "SHARD_QUIET": "1",
            "SHARD_HEALTH_LISTEN": health, "SHARD_THREADS": "1"})
        wait_for(stage_file, stage)  # written once it has joined
        # The registry planned the whole model onto it: its block is loaded and it serves.
        deadline = time.monotonic() + 60
        while (status := health_status(health)) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
    finally:
        for process in (stage, registry):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)


def wait_for(address_file: Path, process: subprocess.Popen, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while not address_file.exists():
        assert process.poll() is None, f"exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{address_file} not written within {seconds} s"
        time.sleep(0.1)
    return address_file.read_text().strip()


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError:
            return -1
