"""The compose stack, end to end, as a user runs it: the image built offline (`make image`),
`docker compose up` with three stages and a spare, text generated from the host through the
published port with the client certificate, token-equal to one process; a stage container
killed mid-generation changes no token (the spare takes its block); `down -v` leaves no
container, network or volume. Needs root and a Docker engine (started here if none runs)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from shard.client import generate
from shard.v1 import api_pb2
from shard.wire.tls import NodeTLS

from support.reference import reference_greedy

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SHARD_IMAGE", "shard:cpu")
PROMPT = [1, 415, 1022, 264, 727]  # greedy TinyStories runs 155 tokens before its eos


def docker(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """A Docker engine: the running one, or one started here and stopped afterwards."""
    if shutil.which("docker") is None or shutil.which("dockerd") is None:
        pytest.fail("no docker/dockerd: run `make docker-tools` (make compose-test does)")
    if docker("info", check=False).returncode == 0:
        yield
        return
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log.open("wb") as out:
        # Its own session and no inherited pipes: nothing of the daemon outlives the test's hold.
        daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    deadline = time.monotonic() + 60
    while docker("info", check=False).returncode != 0:
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            pytest.fail(f"dockerd did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield
    daemon.terminate()
    daemon.wait(timeout=60)


@pytest.fixture(scope="session")
def image(engine):
    """The CPU image, built offline by the Makefile (base, wheelhouse, docker build)."""
    result = subprocess.run(["make", "image", f"IMAGE={IMAGE}"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"make image failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    return IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stack(tinystories_dir, image, tmp_path):
    """The compose stack under a project name of its own; always brought down."""
    project = f"shard-test-{uuid.uuid4().hex[:8]}"
    port, http_port = free_port(), free_port()
    env = {**os.environ, "SHARD_IMAGE": image, "SHARD_PORT": str(port), "SHARD_HTTP_PORT": str(http_port),
           "SHARD_MODEL_DIR": str(tinystories_dir),
           "SHARD_LEASE_SECONDS": "2", "COMPOSE_PROJECT_NAME": project}
    env.pop("COMPOSE_PROFILES", None)  # the file's default: the CPU stages

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return docker("compose", *args, env=env, check=check)

    try:
        # Returns once every service started after its dependencies' conditions held: the
        # spare starts only when the coordinator is healthy, i.e. the ring serves.
        compose("up", "--detach")
        compose("cp", "certs:/certs", str(tmp_path / "certs"))
        compose.http = f"http://localhost:{http_port}/v1"
        compose.api_key = (tmp_path / "certs" / "api-keys").read_text().split()[0]
        yield compose, f"localhost:{port}", NodeTLS.load(tmp_path / "certs", "client"), project
    finally:
        if compose("ps", "--all", check=False).returncode == 0:
            print(compose("logs", "--no-color", check=False).stdout[-20000:])
        compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)


def wait_for_log(compose, service: str, line: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while line not in compose("logs", "--no-color", service).stdout:
        assert time.monotonic() < deadline, f"no {line!r} in {service}'s log after {seconds:.0f} s"
        time.sleep(1)


def request(max_tokens: int = 300) -> api_pb2.GenerateRequest:
    return api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=max_tokens)


async def generate_killing(address: str, tls: NodeTLS, pid: int) -> tuple:
    """A generation during which process `pid` is killed once tokens flow; whether it was
    still running then. SIGKILL to a container's init is what `docker kill` sends, without
    the CLI's seconds of latency under load (a whole generation takes about two)."""
    first_tokens = asyncio.Event()
    task = asyncio.create_task(generate(address, tls, request(), on_text=lambda _: first_tokens.set()))
    await asyncio.wait_for(first_tokens.wait(), timeout=60)
    os.kill(pid, signal.SIGKILL)
    running_at_kill = not task.done()
    return await task, running_at_kill


def http_completion(compose, prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
    body = json.dumps({"model": "model", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0})
    request = urllib.request.Request(f"{compose.http}/completions", data=body.encode(), headers={
        "authorization": f"Bearer {compose.api_key}", "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return answer["choices"][0]["text"], answer["usage"]["completion_tokens"]


def test_compose_stack_generates_survives_a_stage_kill_and_leaves_nothing(stack, tinystories_dir):
    compose, address, tls, project = stack
    expected = reference_greedy(tinystories_dir, PROMPT, 300)

    first = asyncio.run(generate(address, tls, request(), wait_ready_seconds=120))
    assert list(first.summary.output_ids) == expected
    # The OpenAI-compatible API on its published port, with the key the certs job made.
    assert http_completion(compose, PROMPT, 300) == (first.summary.text, len(expected))

    # The spare joined, holds no block: alive, not ready.
    wait_for_log(compose, "registry", "stage-3 joined", seconds=120)
    assert compose("exec", "-T", "stage-3", "shard-healthcheck", "liveness", check=False).returncode == 0
    not_ready = compose("exec", "-T", "stage-3", "shard-healthcheck", check=False)
    assert (not_ready.returncode, not_ready.stderr.strip()) == (1, "not serving: readiness")

    stage_1 = int(docker("inspect", "--format", "{{.State.Pid}}", f"{project}-stage-1-1").stdout)
    generation, running_at_kill = asyncio.run(generate_killing(address, tls, stage_1))
    assert running_at_kill, "the generation ended before the stage was killed"
    assert list(generation.summary.output_ids) == expected
    assert generation.streamed_ids == expected
    assert generation.summary.replays >= 1
    # The spare took the dead stage's block, so it is ready now.
    assert compose("exec", "-T", "stage-3", "shard-healthcheck", check=False).returncode == 0
    health = json.loads(docker("inspect", "--format", "{{json .State.Health.Status}}",
                               f"{project}-coordinator-1").stdout)
    assert health == "healthy"

    compose("down", "--volumes", "--remove-orphans", "--timeout", "10")
    label = f"label=com.docker.compose.project={project}"
    assert docker("ps", "--all", "--quiet", "--filter", label).stdout.strip() == ""
    assert docker("network", "ls", "--quiet", "--filter", label).stdout.strip() == ""
    assert docker("volume", "ls", "--quiet", "--filter", label).stdout.strip() == ""


def test_gpu_profile_reserves_a_gpu_per_stage_in_place_of_the_cpu_stages(engine):
    # A GPU of its own per stage: named, since the engine maps `count: 1` to GPU 0 everywhere.
    env = {**os.environ, "COMPOSE_PROFILES": "gpu", "SHARD_STAGE_3_GPU": "GPU-0a1b"}
    config = json.loads(docker("compose", "config", "--format", "json", env=env).stdout)["services"]
    stages = sorted(name for name in config if "stage" in name)
    assert stages == [f"gpu-stage-{i}" for i in range(4)]
    for name, gpu in zip(stages, ["0", "1", "2", "GPU-0a1b"]):
        service = config[name]
        assert service["deploy"]["resources"]["reservations"]["devices"] == [
            {"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]
        assert service["environment"]["SHARD_DEVICE"] == "cuda"
        node_id = service["environment"]["SHARD_NODE_ID"]
        assert service["networks"]["default"]["aliases"] == [node_id]  # the address its certificate names
    default = json.loads(docker("compose", "config", "--format", "json",
                                env={k: v for k, v in os.environ.items() if k != "COMPOSE_PROFILES"}).stdout)
    assert sorted(name for name in default["services"] if "stage" in name) == [f"stage-{i}" for i in range(4)]
