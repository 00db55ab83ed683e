"""A whole swarm on loopback, one OS process per node, with fresh certificates:
what `shard up` runs and what the process-level tests start."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shard.config import UpConfig
from shard.placement import NO_FIT
from shard.wire.certs import CA_CERT, create_local_deployment
from shard.wire.tls import NodeTLS


class SwarmError(RuntimeError):
    """A local swarm that could not start or serve: said in one line."""


class LocalSwarm:
    def __init__(self, model_dir: str | Path, stages: int, *, workdir: str | Path | None = None,
                 insecure: bool = False, dtype: str = "auto", logs_to_files: bool = False,
                 coordinator_args: list[str] = (), stage_args: list[str] = (), registry_args: list[str] = (),
                 spares: int = 0, addresses: dict[str, tuple[str, str]] | None = None,
                 start_timeout: float = 120.0, device: str | None = None):
        """`addresses` maps node ids to (listen, advertise) when they must not be
        127.0.0.1:<any port> (e.g. behind relays); `device` is the stages' (default: a
        GPU where there is one), or several separated by commas: stage i runs on the
        (i mod n)-th (one stage per GPU)."""
        self.model_dir, self.stages = str(model_dir), stages
        self._owned_tmp = None if workdir else tempfile.TemporaryDirectory(prefix="shard-")
        self.workdir = Path(workdir or self._owned_tmp.name)
        self.insecure, self.dtype, self.device = insecure, dtype, device
        self._logs_to_files, self._start_timeout = logs_to_files, start_timeout
        self._coordinator_args, self._stage_args = list(coordinator_args), list(stage_args)
        self._registry_args, self.spares = list(registry_args), spares
        self._addresses = addresses or {}
        self.processes: dict[str, subprocess.Popen] = {}
        self.registry_address = self.coordinator_address = ""

    @property
    def certs(self) -> Path:
        return self.workdir / "certs"

    def client_tls(self) -> NodeTLS | None:
        return self.node_tls("client")

    def node_tls(self, node_id: str) -> NodeTLS | None:
        """A certificate of this swarm's deployment (node-to-node RPCs refuse the client's)."""
        return None if self.insecure else NodeTLS.load(self.certs, node_id)

    def __enter__(self) -> "LocalSwarm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not self.insecure:
            create_local_deployment(self.certs, self.stages + self.spares)
        self.registry_address = self._spawn("registry", "registry", "--stages", str(self.stages),
                                            *self._registry_args)
        for index in range(self.stages):
            self.start_stage(f"stage-{index}", wait=False)
        self.coordinator_address = self._spawn("coordinator", "coordinator", "--registry", self.registry_address,
                                               *self._coordinator_args)
        for index in range(self.stages):
            self._wait_address(f"stage-{index}")
        # Spares join once the ring is planned, so that they stay spare.
        for index in range(self.stages, self.stages + self.spares):
            self.start_stage(f"stage-{index}")

    def start_stage(self, node_id: str, *, wait: bool = True) -> None:
        flags = (["--quiet"] if self._logs_to_files else []) + (
            [f"--device={stage_device(self.device, int(node_id.rpartition('-')[2]))}"] if self.device else [])
        self._spawn(node_id, "stage", "--registry", self.registry_address, "--dtype", self.dtype,
                    *flags, *self._stage_args, wait=wait)

    def _spawn(self, node_id: str, command: str, *extra: str, wait: bool = True) -> str:
        address_file = self.workdir / f"{node_id}.address"
        address_file.unlink(missing_ok=True)
        listen, advertise = self._addresses.get(node_id, ("127.0.0.1:0", None))
        argv = [sys.executable, "-m", "shard", command, "--model", self.model_dir, "--node-id", node_id,
                "--listen", listen, "--address-file", str(address_file), *extra]
        argv += [f"--advertise={advertise}"] if advertise else []
        argv += ["--insecure"] if self.insecure else ["--certs", str(self.certs)]
        log = open(self.workdir / f"{node_id}.log", "wb") if self._logs_to_files else None
        self.processes[node_id] = subprocess.Popen(argv, stdout=log or sys.stderr, stderr=log or sys.stderr)
        return self._wait_address(node_id) if wait else ""

    def restart_registry(self) -> None:
        """SIGKILL the registry and start a new one on the same port (nodes keep its address)."""
        self._restart("registry", self.registry_address, "--stages", str(self.stages), *self._registry_args)

    def restart_coordinator(self) -> None:
        """SIGKILL the coordinator and start a new incarnation of it under the same id and
        port (clients keep its address)."""
        self._restart("coordinator", self.coordinator_address, "--registry", self.registry_address,
                      *self._coordinator_args)

    def _restart(self, node_id: str, host_port: str, *extra: str) -> None:
        self.kill(node_id)
        self._addresses[node_id] = (host_port, None)
        self._spawn(node_id, node_id, *extra)

    def _wait_address(self, node_id: str) -> str:
        address_file = self.workdir / f"{node_id}.address"
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if address_file.exists():
                return address_file.read_text().strip()
            code = self.processes[node_id].poll()
            if code is not None:
                raise SwarmError(f"{node_id} exited with code {code} before serving{self._log_hint(node_id)}")
            time.sleep(0.05)
        raise SwarmError(f"{node_id} did not start within {self._start_timeout:.0f} s{self._log_hint(node_id)}")

    def _log_hint(self, node_id: str) -> str:
        log = self.workdir / f"{node_id}.log"
        return f"; its log:\n{log.read_text()[-3000:]}" if log.exists() else ""

    def address_of(self, node_id: str) -> str:
        return (self.workdir / f"{node_id}.address").read_text().strip()

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        self.processes[node_id].send_signal(sig)
        self.processes[node_id].wait()

    def stop(self) -> dict[str, int]:
        """SIGTERM every node (coordinator first), then SIGKILL what is left after 15 s."""
        order = ["coordinator", *(n for n in self.processes if n.startswith("stage")), "registry"]
        for node_id in order:
            process = self.processes.get(node_id)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        codes = {}
        for node_id, process in self.processes.items():
            try:
                codes[node_id] = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                codes[node_id] = process.wait()
        if self._owned_tmp is not None:
            self._owned_tmp.cleanup()
        return codes


def stage_device(devices: str, index: int) -> str:
    """The device of stage `index` in a comma-separated list, round robin."""
    choices = devices.split(",")
    return choices[index % len(choices)]


def shared_model_dir() -> Path | None:
    """The real TinyStories model at <repo>/../shared/models/tinystories-656k, if present."""
    path = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinystories-656k"
    return path if (path / "config.json").is_file() else None


def default_model_dir() -> Path:
    """The shared tiny model when present; else a tiny random one built here, offline."""
    shared = shared_model_dir()
    if shared is not None:
        return shared
    from shard.model.synthetic import build_demo_model

    target = Path(tempfile.gettempdir()) / "shard-demo-model"
    print(f"shard up: ../shared/models/tinystories-656k not found; building a tiny random model "
          f"with a character tokenizer in {target} (its text is gibberish)", file=sys.stderr)
    return build_demo_model(target)


def up(config: UpConfig) -> int:
    """A swarm of `config.stages` processes, one generation, then shut down. The terminal
    shows the prompt, the streamed text and one summary line; the nodes log into files
    (named in the summary) unless `config.verbose`."""
    from shard.client import generate
    from shard.generation import build_request, print_generation, write_receipt

    model_dir = config.model or default_model_dir()
    speculation = [f"--draft={draft}" for draft in config.draft]
    speculation += [] if config.spec_k is None else [f"--spec-k={config.spec_k}"]
    speculation += [] if config.in_flight is None else [f"--in-flight={config.in_flight}"]
    speculation += [] if config.draft_device is None else [f"--draft-device={config.draft_device}"]
    speculation += [] if config.draft_dtype is None else [f"--draft-dtype={config.draft_dtype}"]
    budget = [] if config.memory_budget is None else [f"--memory-budget={config.memory_budget}"]
    http = [] if config.http_listen is None else [f"--http-listen={config.http_listen}"]
    workdir = None if config.verbose else tempfile.mkdtemp(prefix="shard-up-")  # kept: it holds the logs
    with LocalSwarm(model_dir, config.stages, workdir=workdir, insecure=config.insecure, dtype=config.dtype,
                    logs_to_files=not config.verbose, coordinator_args=speculation + http, stage_args=budget,
                    device=config.device) as swarm:
        asyncio.run(_wait_ready(swarm))
        on_text = None if config.json else (lambda text: print(text, end="", flush=True))
        if not config.json:
            print(config.prompt, end="", flush=True)
        generation = asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), build_request(config),
                                          on_text=on_text, wait_ready_seconds=300))
        print_generation(generation, config.json, note=f"; logs in {workdir}" if workdir else "")
        if config.receipt is not None:  # the swarm's certificates go with it: keep its CA beside the receipt
            ca = Path(f"{config.receipt}.ca.pem")
            shutil.copyfile(swarm.certs / CA_CERT, ca)
            write_receipt(generation, config, ca)
        if config.http_listen:
            print(f"OpenAI-compatible API on http://{config.http_listen}/v1 (model "
                  f"{Path(model_dir).name!r}); Ctrl-C stops the swarm", file=sys.stderr, flush=True)
            _wait_for_stop()
    return 0


def _wait_for_stop() -> None:
    """Until SIGINT or SIGTERM; then the swarm shuts down as after a generation."""
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        signal.sigwait(stops)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)


async def _wait_ready(swarm: LocalSwarm, timeout: float = 300.0) -> None:
    """Until the coordinator says its ring is ready; a model that does not fit the stages
    fails at once (no stage is coming to help)."""
    from shard.v1 import api_pb2, api_pb2_grpc
    from shard.wire.tls import open_channel

    deadline = time.monotonic() + timeout
    async with open_channel(swarm.coordinator_address, swarm.client_tls()) as channel:
        stub = api_pb2_grpc.InferenceServiceStub(channel)
        while True:
            status = await stub.GetStatus(api_pb2.GetStatusRequest(), timeout=10)
            if status.ready:
                return
            if status.problem.startswith(NO_FIT):
                raise SwarmError(status.problem)  # says it does not fit, and by how much
            if time.monotonic() > deadline:
                raise SwarmError(f"the ring was not ready within {timeout:.0f} s: {status.problem}")
            await asyncio.sleep(0.2)
