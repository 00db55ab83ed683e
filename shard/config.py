"""One typed configuration per service, validated once at start-up, and from a node's
configuration to its security material.

The `shard` command fills these from flags and `SHARD_*` environment variables (the
variable of `--memory-budget` is SHARD_MEMORY_BUDGET); library code only ever sees these
dataclasses. Torch-free, so that `--help` stays fast."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

DTYPES = ("auto", "float32", "bfloat16", "float16")
_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})")


class ConfigError(ValueError):
    """A configuration an operator can fix: said in one line, with no traceback."""


def env_name(flag: str) -> str:
    """The environment variable of a flag: --memory-budget -> SHARD_MEMORY_BUDGET."""
    return "SHARD_" + flag.lstrip("-").upper().replace("-", "_")


def byte_size(text: str | int) -> int:
    """'24GiB', '512m', '1000000' -> bytes."""
    if isinstance(text, int):
        value = text
    else:
        cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
        scale = _SUFFIXES.get(cleaned[-1:], 1)
        number = cleaned[:-1] if scale != 1 else cleaned
        try:
            value = int(float(number) * scale)
        except ValueError:
            raise ConfigError(f"not a size: {text!r} (e.g. 512MiB, 24GiB)") from None
    if value <= 0:
        raise ConfigError(f"a size must be positive, not {text!r}")
    return value


def check_address(address: str, flag: str, *, any_port: bool = True) -> None:
    """HOST:PORT with a port in 0..65535 (0, any free port, only where `any_port`)."""
    match = _ADDRESS.fullmatch(address)
    port = int(match[2]) if match else -1
    if not match or port > 65535 or (port == 0 and not any_port):
        raise ConfigError(f"{flag} {address!r} is not HOST:PORT")


def check_model_dir(path: Path, flag: str = "--model") -> None:
    """A Hugging Face model folder: a config.json and safetensors weights (or a dummy-weight
    marker, shard.model.dummy, whose tensors are made on demand)."""
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: no such folder")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{flag} {path}: no config.json (not a Hugging Face model folder)")
    if not any(path.glob("*.safetensors")):
        from shard.model.dummy import is_dummy  # torch, but only for a folder without weights

        if not is_dummy(path):
            raise ConfigError(f"{flag} {path}: no *.safetensors weights")


def check_dtype(dtype: str, flag: str = "--dtype") -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"{flag} must be one of {', '.join(DTYPES)}, not {dtype!r}")


def from_values(cls, values: Mapping[str, Any]):
    """A config from a mapping that may hold more (a parsed command line); None means unset."""
    return cls(**{f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None})


@dataclass
class NodeConfig:
    """What every node (registry, stage, coordinator) is configured with."""

    model: Path | None = None  # required: checked below, so that the message names the flag
    node_id: str = "node"
    certs: Path | None = None
    insecure: bool = False
    listen: str = "0.0.0.0:0"
    advertise_host: str = "127.0.0.1"
    advertise: str | None = None
    address_file: Path | None = None
    region: str = ""
    health_listen: str | None = None
    metrics_listen: str | None = None

    def __post_init__(self) -> None:
        from shard.wire.certs import check_node_id

        if self.model is None:
            raise ConfigError("give --model DIR (a Hugging Face model folder)")
        self.model = Path(self.model)
        check_model_dir(self.model)
        try:
            check_node_id(self.node_id)
        except ValueError as error:
            raise ConfigError(f"--node-id: {error}") from None
        check_address(self.listen, "--listen")
        if self.advertise:
            check_address(self.advertise, "--advertise", any_port=False)
        if self.health_listen:
            check_address(self.health_listen, "--health-listen")
        if self.metrics_listen:
            check_address(self.metrics_listen, "--metrics-listen")
        if self.insecure:
            self.certs = None
        elif not self.certs:
            raise ConfigError("give --certs DIR (or --insecure for plaintext)")
        else:
            self.certs = Path(self.certs)
            if not self.certs.is_dir():
                raise ConfigError(f"--certs {self.certs}: no such folder (create one with `shard certs local`)")

    def advertised_address(self, port: int) -> str:
        """Where other nodes dial this one: --advertise, else --advertise-host and the bound port."""
        return self.advertise or f"{self.advertise_host}:{port}"


@dataclass
class RegistryConfig(NodeConfig):
    node_id: str = "registry"
    stages: int = 1
    lease_seconds: float = 5.0
    pin_trusted_ends: bool = False
    kv_reserve_positions: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stages < 1:
            raise ConfigError("--stages must be at least 1")
        if self.lease_seconds <= 0:
            raise ConfigError("--lease-seconds must be positive")
        if self.kv_reserve_positions < 0:
            raise ConfigError("--kv-reserve-positions must be 0 or more")


@dataclass
class JoiningConfig(NodeConfig):
    """A node that joins a registry and carries sealed payloads (stage, coordinator)."""

    registry: str = ""
    registry_id: str = "registry"  # the node id the registry's certificate must name
    secret: list[Path] = field(default_factory=list)
    threads: int | None = None
    join_timeout: float = 60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.registry:
            raise ConfigError("give --registry HOST:PORT")
        check_address(self.registry, "--registry", any_port=False)
        from shard.wire.certs import check_node_id

        try:
            check_node_id(self.registry_id)
        except ValueError as error:
            raise ConfigError(f"--registry-id: {error}") from None
        self.secret = [Path(path) for path in self.secret]
        for path in self.secret:
            if not path.is_file():
                raise ConfigError(f"--secret {path}: no such file")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1")
        if self.join_timeout <= 0:
            raise ConfigError("--join-timeout must be positive")


@dataclass
class StageConfig(JoiningConfig):
    node_id: str = "stage-0"
    device: str = "auto"  # a GPU where there is one
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on a CPU
    memory_budget: int | None = None  # bytes; default: 90% of what is free
    max_sessions: int = 64
    max_batch: int = 16  # waiting chunks of different sessions run as one forward (1: no batching)
    session_idle_seconds: float = 300.0
    kv: str = "auto"  # static on CUDA
    session_positions: int | None = None
    chunk_sizes: str = "5,16,64,256"
    static_batch: int = 0  # static KV: decode chunks of this many sessions as one forward (0: one at a time)
    eager: bool = False
    no_compile: bool = False
    trust: str = ""
    speed: float | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dtype(self.dtype)
        if self.kv not in ("auto", "static", "dynamic"):
            raise ConfigError(f"--kv must be auto, static or dynamic, not {self.kv!r}")
        if self.session_positions is not None and self.session_positions < 1:
            raise ConfigError("--session-positions must be at least 1")
        try:
            sizes = [int(size) for size in str(self.chunk_sizes).split(",")]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise ConfigError(f"--chunk-sizes must be positive integers separated by commas, not {self.chunk_sizes!r}")
        if self.memory_budget is not None:
            self.memory_budget = byte_size(self.memory_budget)
        if self.max_sessions < 1:
            raise ConfigError("--max-sessions must be at least 1")
        if self.max_batch < 1:
            raise ConfigError("--max-batch must be at least 1")
        if self.static_batch < 0:
            raise ConfigError("--static-batch must be at least 0")
        if not self.session_idle_seconds > 0:
            raise ConfigError("--session-idle-seconds must be positive")
        if self.speed is not None and not self.speed > 0:
            raise ConfigError("--speed must be positive")


@dataclass
class CoordinatorConfig(JoiningConfig):
    node_id: str = "coordinator"
    draft: list[str] = field(default_factory=list)
    draft_device: str = "auto"  # a GPU where there is one
    draft_dtype: str = "auto"  # bfloat16 on a GPU, float32 on a CPU
    draft_batch: int | None = None  # sessions per model-draft forward; default 16 for float32 on a CPU, else 1
    draft_no_compile: bool = False  # graph a GPU draft's layers as they are, not compiled first
    spec_k: int | None = None
    in_flight: int | None = None
    max_prompt_chars: int = 262144
    max_concurrent: int = 64
    max_queued: int = 256
    queue_timeout: float = 30.0
    http_listen: str | None = None  # the OpenAI-compatible HTTP front
    api_key_file: Path | None = None
    http_tls: bool = False
    served_model_name: str | None = None  # default: the model folder's name

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_http()
        for flag, value in (("--max-prompt-chars", self.max_prompt_chars), ("--max-concurrent", self.max_concurrent)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1")
        if self.max_queued < 0:
            raise ConfigError("--max-queued must not be negative")
        if not self.queue_timeout > 0:
            raise ConfigError("--queue-timeout must be positive")
        from shard.decode.specs import parse_draft_spec

        for spec in self.draft:
            try:
                parse_draft_spec(spec)
            except ValueError as error:
                raise ConfigError(f"--{error}") from None
        check_dtype(self.draft_dtype, "--draft-dtype")
        if self.draft_batch is not None and self.draft_batch < 1:
            raise ConfigError("--draft-batch must be at least 1")

    def _check_http(self) -> None:
        if self.http_listen is None:
            for flag, value in (("--api-key-file", self.api_key_file), ("--http-tls", self.http_tls)):
                if value:
                    raise ConfigError(f"{flag} needs --http-listen")
            return
        check_address(self.http_listen, "--http-listen")
        if self.api_key_file is not None:
            self.api_key_file = Path(self.api_key_file)
            api_keys(self.api_key_file)  # readable, and not empty
        elif not is_loopback(self.http_listen.rpartition(":")[0]):
            # The HTTP front has no client certificates: keys are its only gate.
            raise ConfigError(f"--http-listen {self.http_listen} is reachable from other machines: give "
                              f"--api-key-file FILE (one key per line), or listen on 127.0.0.1")
        if self.http_tls and self.certs is None:
            raise ConfigError("--http-tls serves this node's certificate from --certs: it cannot go with --insecure")
        if self.served_model_name is None:
            self.served_model_name = self.model.name


def is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def api_keys(path: Path) -> frozenset[str]:
    """The bearer tokens the HTTP front accepts: one a line; blank lines and # comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--api-key-file {path}: {getattr(error, 'strerror', None) or error}") from None
    keys = frozenset(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ConfigError(f"--api-key-file {path}: holds no key")
    return keys


def add_api_key(path: Path) -> str:
    """A new random key appended to the HTTP front's key file (made owner-only if missing)."""
    import os
    import secrets

    key = "sk-shard-" + secrets.token_urlsafe(32)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as file:
        file.write(key + "\n")
    return key


@dataclass
class RequestConfig:
    """One generation, as `shard generate` and `shard up` ask for it."""

    prompt: str = "Once upon a time"
    chat: bool = False
    prompt_ids: str | None = None  # comma-separated token ids instead of the prompt
    max_tokens: int = 64
    ignore_eos: bool = False
    json: bool = False
    draft: list[str] = field(default_factory=list)
    spec_k: int | None = None
    in_flight: int | None = None
    receipt: Path | None = None  # write the run's signed receipt here
    receipt_private: bool = False  # the receipt holds hashes of the prompt and output, not their ids
    # Sampling; None leaves the request's field unset (greedy). The coordinator checks ranges.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.receipt_private and self.receipt is None:
            raise ConfigError("--receipt-private needs --receipt FILE")
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise ConfigError(f"--seed must lie in [0, 2**64), not {self.seed}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"--top-k must be at least 0, not {self.top_k}")
        if self.prompt_ids is not None:
            try:
                [int(i) for i in self.prompt_ids.split(",")]
            except ValueError:
                raise ConfigError(f"--prompt-ids must be comma-separated integers, not {self.prompt_ids!r}") from None


@dataclass
class GenerateConfig(RequestConfig):
    coordinator: str = ""
    certs: Path | None = None
    node_id: str = "client"
    insecure: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.coordinator:
            raise ConfigError("give --coordinator HOST:PORT")
        check_address(self.coordinator, "--coordinator", any_port=False)
        if self.insecure:
            self.certs = None
        elif not self.certs:
            raise ConfigError("give --certs DIR (or --insecure)")
        elif not Path(self.certs).is_dir():
            raise ConfigError(f"--certs {self.certs}: no such folder")


@dataclass
class UpConfig(RequestConfig):
    model: Path | None = None  # default: the shared tiny model
    stages: int = 2
    insecure: bool = False
    device: str | None = None  # the stages'; default: a GPU where there is one
    dtype: str = "auto"
    draft_device: str | None = None  # the coordinator's draft; default as for a coordinator
    draft_dtype: str | None = None
    memory_budget: int | None = None
    verbose: bool = False
    http_listen: str | None = None  # then keep serving the HTTP API after the generation

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.receipt is not None and self.insecure:
            raise ConfigError("--receipt needs node keys to sign with: drop --insecure")
        if self.http_listen is not None:
            check_address(self.http_listen, "--http-listen", any_port=False)
            if not is_loopback(self.http_listen.rpartition(":")[0]):
                raise ConfigError(f"--http-listen {self.http_listen}: `shard up` serves loopback only (run "
                                  f"`shard coordinator --http-listen ... --api-key-file FILE` to serve others)")
        if self.model is not None:
            self.model = Path(self.model)
            check_model_dir(self.model)
        if self.stages < 1:
            raise ConfigError("--stages must be at least 1")
        check_dtype(self.dtype)
        if self.draft_dtype is not None:
            check_dtype(self.draft_dtype, "--draft-dtype")
        if self.memory_budget is not None:
            self.memory_budget = byte_size(self.memory_budget)


def node_tls(config: NodeConfig):
    """The node's mTLS identity (a shard.wire.tls.NodeTLS); None only under --insecure."""
    from shard.wire.tls import NodeTLS

    if config.insecure:
        return None
    try:
        return NodeTLS.load(config.certs, config.node_id)
    except FileNotFoundError as error:
        raise ConfigError(f"--certs: {error.filename} is missing (create it with `shard certs`)") from None
    except ValueError as error:  # another CA's certificate, a key of another certificate...
        raise ConfigError(f"--certs: {error}") from None


def node_secrets(config: JoiningConfig) -> list[bytes] | None:
    """Deployment secrets for the AEAD layer: the node seals with the first and opens
    frames sealed with any (several while a new secret is rolled out).
    From --secret files, else <certs>/deployment.secret. Without one the payloads travel
    unsealed, which only --insecure allows."""
    from shard.wire.certs import SECRET_FILE
    from shard.wire.seal import load_secret

    paths = list(config.secret)
    if not paths and config.certs and (config.certs / SECRET_FILE).is_file():
        paths = [config.certs / SECRET_FILE]
    if not paths:
        if config.insecure:
            return None
        raise ConfigError(f"no deployment secret: give --secret FILE or put {SECRET_FILE} in the certs "
                          f"folder (shard certs local writes one)")
    try:
        return [load_secret(path) for path in paths]
    except ValueError as error:
        raise ConfigError(str(error)) from None
