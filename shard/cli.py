"""The `shard` command: one subcommand per service, a client, and `up` for a local swarm.

Parsing and --help import neither torch nor transformers: a command imports what it
runs. Every flag of a service also reads SHARD_<FLAG> from the environment (flag, then
environment, then default), which is how containers and Helm configure nodes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any, Callable

from shard.config import (DTYPES, ConfigError, CoordinatorConfig, GenerateConfig, RegistryConfig, StageConfig,
                          UpConfig, env_name, from_values)
from shard.extras import SERVER_HINT, missing_server_packages, version

_SERVER_COMMANDS = ("registry", "stage", "coordinator", "up", "bench")
SERVICES = {"registry": RegistryConfig, "stage": StageConfig, "coordinator": CoordinatorConfig}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class _Parser(argparse.ArgumentParser):
    """A usage mistake in one line, like every other operator error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Flags:
    """Adds a service's flags, each also read from its SHARD_* variable when not given."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.from_env: list[tuple[str, str, Callable[[str], Any]]] = []  # (dest, variable, convert)
        parser.set_defaults(_env=self.from_env)

    def add(self, flag: str, help: str, *, type: Callable[[str], Any] = str, action: str | None = None,
            **kwargs) -> None:
        variable = env_name(flag)
        if action == "store_true":
            convert = _boolean
        elif action == "append":
            convert = lambda text: [item for item in text.split(",") if item]  # noqa: E731
        else:
            convert = type
            kwargs["type"] = type
        self.from_env.append((flag.lstrip("-").replace("-", "_"), variable, convert))
        # Defaults live in the config dataclasses: None here means "not given".
        self.parser.add_argument(flag, action=action, default=None, help=f"{help} [env {variable}]", **kwargs)


def _boolean(text: str) -> bool:
    if text.strip().lower() not in _TRUE | _FALSE:
        raise ValueError(f"not a boolean: {text!r}")
    return text.strip().lower() in _TRUE


def _node_flags(parser: argparse.ArgumentParser, role: str, default_id: str) -> _Flags:
    flags = _Flags(parser)
    flags.add("--model", "Hugging Face model folder (config.json + safetensors); required", metavar="DIR")
    flags.add("--node-id", f"this node's id (default {default_id})")
    flags.add("--certs", "folder with ca.pem and this node's <id>.pem/<id>.key", metavar="DIR")
    flags.add("--insecure", "plaintext gRPC, no mTLS (testing only)", action="store_true")
    if role != "registry":
        flags.add("--secret", "deployment secret file; repeat to roll a new one: the first seals, any opens "
                  "(default: <certs>/deployment.secret; env: comma-separated)", action="append", metavar="FILE")
    flags.add("--listen", "address to bind (default 0.0.0.0:0; port 0: any free port)", metavar="HOST:PORT")
    flags.add("--advertise-host", "host other nodes dial to reach this one (default 127.0.0.1)")
    flags.add("--advertise", "full address other nodes dial, when it is not this node's own port "
              "(behind a proxy or a relay)", metavar="HOST:PORT")
    flags.add("--address-file", "write host:port here once serving", metavar="FILE")
    flags.add("--region", "where this node runs")
    flags.add("--health-listen", "also serve the gRPC health service alone, in plaintext, here "
              "(for kubelet probes)", metavar="HOST:PORT")
    flags.add("--metrics-listen", "serve Prometheus metrics (OpenTelemetry) at http://HOST:PORT/metrics",
              metavar="HOST:PORT")
    if role != "registry":
        flags.add("--registry", "registry address; required", metavar="HOST:PORT")
        flags.add("--registry-id", "node id the registry's certificate must name (default registry)")
        flags.add("--join-timeout", "give up joining the registry after this many seconds (default 60)",
                  type=float, metavar="SECONDS")
        flags.add("--threads", "torch intra-op threads (default: torch's; 1 is fastest for tiny models, "
                  "whose ops are too small to split)", type=int)
    return flags


def parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _certs_arguments(commands.add_parser("certs", help="create a deployment CA and node certificates"))

    registry = commands.add_parser("registry", help="run the registry")
    flags = _node_flags(registry, "registry", "registry")
    flags.add("--stages", "stages to wait for before planning (default 1)", type=int)
    flags.add("--lease-seconds", "a node that misses heartbeats this long is removed (they come 4 times per "
              "lease; default 5)", type=float)
    flags.add("--pin-trusted-ends", "the first and last blocks (which see the user's tokens) only on stages "
              "joined with --trust trusted", action="store_true")
    flags.add("--kv-reserve-positions", "place a block only where its weights leave room for a session of this "
              "many positions of KV cache (default 0: weights alone)", type=int)

    stage = commands.add_parser("stage", help="run a stage: join the registry, serve a block of layers")
    flags = _node_flags(stage, "stage", "stage-0")
    flags.add("--device", "torch device (default: cuda where there is one, else cpu)")
    flags.add("--dtype", f"{', '.join(DTYPES)} (default auto: bfloat16 on a GPU, float32 on a CPU)")
    flags.add("--memory-budget", "bytes this stage offers, e.g. 24GiB (default: 90%% of free)", metavar="SIZE")
    flags.add("--max-sessions", "sessions held at most; their KV bytes are capped too (default 64)", type=int)
    flags.add("--max-batch", "waiting chunks of different sessions run as one forward, at most this many "
              "(default 16; 1: one at a time; dynamic KV only)", type=int)
    flags.add("--session-idle-seconds", "free a session's KV cache after this long without a chunk (default 300)",
              type=float, metavar="SECONDS")
    flags.add("--kv", "static: each session's KV preallocated, chunks padded to fixed sizes (CUDA graphs on a "
              "GPU); dynamic: caches that grow (default auto: static on CUDA)", choices=("auto", "static", "dynamic"))
    flags.add("--session-positions", "positions a session may hold with static KV (default: the model's "
              "context, at most 4096)", type=int)
    flags.add("--chunk-sizes", "static KV: the chunk shapes, comma-separated, the decode size (spec K + 1) "
              "first (default 5,16,64,256)", metavar="N,N,...")
    flags.add("--static-batch", "static KV: the decode-size chunks of up to N sessions run as one forward (one "
              "CUDA graph); the stage then holds at most N sessions, and each session's decode chunks always run "
              "in that shape, so its tokens do not depend on the others (default 0: one chunk at a time)",
              type=int, metavar="N")
    flags.add("--eager", "static KV without CUDA graphs", action="store_true")
    flags.add("--no-compile", "static KV on CUDA: graph the layers as they are, not compiled by torch.compile "
              "first (starts sooner, runs each chunk slower)", action="store_true")
    flags.add("--trust", "trust label; 'trusted' may hold the first and last blocks")
    flags.add("--speed", "relative speed to report instead of the one measured at start-up", type=float)
    flags.add("--quiet", "no progress bar", action="store_true")

    coordinator = commands.add_parser("coordinator", help="run the coordinator (public Generate API)")
    flags = _node_flags(coordinator, "coordinator", "coordinator")
    _speculation_args(flags.add, drafts_help="a draft to load: 'ngram', a model folder sharing the "
                      "target's tokenizer, or oracle:P[:DIR] (benchmarks: proposes the target's own greedy "
                      "token with probability P while running DIR, default the target, for its cost); repeat "
                      "for several; the first is the default")
    _draft_device_args(flags.add)
    flags.add("--draft-batch", "sessions whose model-draft steps run as one forward (default 16 on CUDA and for a "
              "float32 draft on a CPU, where batching is exact; else 1: each session alone, on CUDA in a graphed "
              "slot of its own); on CUDA the rows of one graphed pool, each step one graph replay for all of them",
              type=int)
    flags.add("--draft-no-compile", "a model draft on CUDA: graph its layers as they are, not compiled by "
              "torch.compile first (starts sooner, steps slower)", action="store_true")
    flags.add("--max-prompt-chars", "longest prompt accepted, in characters, all chat messages together "
              "(default 262144)", type=int)
    flags.add("--max-concurrent", "generations run at once (default 64)", type=int)
    flags.add("--max-queued", "generations that may wait for a slot; beyond: RESOURCE_EXHAUSTED (default 256)",
              type=int)
    flags.add("--queue-timeout", "seconds a generation may wait for a slot before RESOURCE_EXHAUSTED "
              "(default 30)", type=float, metavar="SECONDS")
    flags.add("--http-listen", "also serve the OpenAI-compatible HTTP API here (/v1/chat/completions, "
              "/v1/completions, /v1/models); beyond loopback only with --api-key-file", metavar="HOST:PORT")
    flags.add("--api-key-file", "bearer tokens the HTTP API accepts, one a line (e.g. a mounted Secret)",
              metavar="FILE")
    flags.add("--http-tls", "serve the HTTP API over TLS with this node's certificate from --certs",
              action="store_true")
    flags.add("--served-model-name", "the model's name in the HTTP API (default: the model folder's name)")

    generate = commands.add_parser("generate", help="ask a coordinator for text")
    generate.add_argument("--coordinator", help="coordinator address; required", metavar="HOST:PORT")
    generate.add_argument("--certs", help="folder with ca.pem and the client's certificate", metavar="DIR")
    generate.add_argument("--node-id", help="the client certificate's id (default client)")
    generate.add_argument("--insecure", action="store_true", default=None)
    _speculation_args(_plain(generate), drafts_help="which of the coordinator's drafts to use: 'ngram', "
                      "'none' or the folder it was started with")
    _request_args(generate)

    bench = commands.add_parser("bench", help="benchmarks: wan (decoding modes over emulated WAN links), seal, "
                                "memory, gpu")
    from shard.bench.main import add_arguments

    add_arguments(bench)

    receipt = commands.add_parser("receipt", help="check a run's signed receipt offline")
    receipt_commands = receipt.add_subparsers(dest="receipt_command", required=True, parser_class=_Parser)
    verify = receipt_commands.add_parser("verify", help="check every signature and chain of a receipt; exit 0 "
                                         "valid, 1 invalid, 2 unreadable")
    verify.add_argument("file", help="the receipt (JSON)")
    verify.add_argument("--ca", metavar="CA.pem", help="the deployment's CA certificate: every signer's "
                        "certificate must chain to it and name the role it signs as")
    verify.add_argument("--replay", metavar="MODEL_DIR", help="also regenerate the output greedily with "
                        "transformers from this model folder, and check its config, tokenizer and block "
                        "weight hashes (needs the server extra)")

    up = commands.add_parser("up", help="start a whole local swarm, generate, shut it down")
    up.add_argument("--model", help="model folder (default: the shared tiny model)", metavar="DIR")
    up.add_argument("--stages", type=int, help="stages to start (default 2)")
    up.add_argument("--insecure", action="store_true", default=None,
                    help="plaintext gRPC between the local processes")
    up.add_argument("--device", help="the stages' torch device (default: cuda where there is one, else cpu)")
    up.add_argument("--dtype", choices=DTYPES, help="the stages' (default auto: bfloat16 on a GPU, float32 on a CPU)")
    _draft_device_args(_plain(up))
    up.add_argument("--memory-budget", metavar="SIZE", help="bytes each stage offers (default: 90%% of free)")
    up.add_argument("--verbose", action="store_true", default=None,
                    help="the nodes' logs on the terminal instead of in a file")
    up.add_argument("--http-listen", metavar="HOST:PORT", help="also serve the OpenAI-compatible HTTP API on this "
                    "loopback address, and keep the swarm up after the generation until Ctrl-C")
    _speculation_args(_plain(up), drafts_help="draft for the coordinator: 'ngram' or a model folder")
    _request_args(up)
    return parser


def _plain(parser: argparse.ArgumentParser) -> Callable[..., None]:
    """add_argument with None defaults (the config's apply), for commands without env variables."""
    return lambda flag, help, **kwargs: parser.add_argument(flag, help=help, default=None, **kwargs)


def _speculation_args(add: Callable[..., None], drafts_help: str) -> None:
    add("--draft", drafts_help, action="append")
    add("--spec-k", "draft tokens per verify chunk (0: plain decode)", type=int)
    add("--in-flight", "verify chunks kept in flight (1: synchronous)", type=int)


def _draft_device_args(add: Callable[..., None]) -> None:
    add("--draft-device", "torch device of the model drafts (default: cuda where there is one, else cpu)")
    add("--draft-dtype", f"{', '.join(DTYPES)} for the model drafts (default auto: bfloat16 on a GPU, "
        "float32 on a CPU)")


def _request_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", help="default: Once upon a time")
    parser.add_argument("--chat", action="store_true", default=None, help="wrap the prompt in the model's chat "
                        "template")
    parser.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    parser.add_argument("--max-tokens", type=int, help="default 64")
    parser.add_argument("--ignore-eos", action="store_true", default=None)
    parser.add_argument("--json", action="store_true", default=None, help="print token ids and text as JSON")
    parser.add_argument("--receipt", metavar="FILE", help="write the run's signed receipt here (JSON; check it "
                        "with `shard receipt verify`)")
    parser.add_argument("--receipt-private", action="store_true", default=None,
                        help="the receipt holds hashes of the prompt and output, not their token ids")
    parser.add_argument("--temperature", type=float, help="sample at this temperature, 0 to 2 (default 0: greedy)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens whose mass "
                        "reaches this, in (0, 1] (needs --temperature)")
    parser.add_argument("--top-k", type=int, help="keep the K most likely tokens (needs --temperature)")
    parser.add_argument("--min-p", type=float, help="drop tokens less likely than this times the most likely one "
                        "(needs --temperature)")
    parser.add_argument("--seed", type=int, help="the sampler's seed: the same seed, the same tokens (default: "
                        "a random one, printed in the summary)")
    parser.add_argument("--stop", action="append", help="stop before this text; repeat for several (at most 4)")


def _certs_arguments(certs: argparse.ArgumentParser) -> None:
    roles = ("registry", "coordinator", "stage", "client")  # shard.wire.certs.ROLES, without its import
    sub = certs.add_subparsers(dest="certs_command", required=True, parser_class=_Parser)
    p = sub.add_parser("init", help="create the deployment CA")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p = sub.add_parser("issue", help="issue a node certificate")
    p.add_argument("dir")
    p.add_argument("--role", required=True, choices=roles)
    p.add_argument("--id", required=True, dest="node_id")
    p.add_argument("--host", action="append", dest="hosts", metavar="HOST",
                   help="DNS name or IP the node is reached at (repeatable; default: localhost and 127.0.0.1)")
    p = sub.add_parser("secret", help="a new deployment secret for the AEAD layer (to roll one, write a "
                       "new file and give nodes both, newest first)")
    p.add_argument("file")
    p.add_argument("--force", action="store_true", help="replace an existing secret file")
    p = sub.add_parser("api-key", help="add a new random API key for the HTTP API to FILE (made if missing, "
                       "owner-only) and print it")
    p.add_argument("file")
    p = sub.add_parser("local", help="CA + registry, coordinator, N stages, a client and a secret")
    p.add_argument("dir")
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--host", action="append", dest="hosts", metavar="HOST")


def config_of(args: argparse.Namespace):
    """The typed configuration of a parsed command line: flags, then SHARD_* variables
    (services only), then the dataclass defaults; validated on construction."""
    values = dict(vars(args))
    for dest, variable, convert in values.pop("_env", []):
        if values.get(dest) is None and variable in os.environ:
            try:
                values[dest] = convert(os.environ[variable])
            except ValueError as error:
                raise ConfigError(f"{variable}: {error}") from None
    kind = {**SERVICES, "generate": GenerateConfig, "up": UpConfig}[args.command]
    return from_values(kind, values)


def node_config(argv: list[str]):
    """A service's configuration from its command line (`["stage", "--model", ...]`)."""
    return config_of(parser().parse_args(argv))


def _certs(args) -> int:
    from pathlib import Path

    from shard.wire import certs

    directory = Path(args.dir) if "dir" in args else None
    if args.certs_command == "local" and args.stages < 1:
        raise ConfigError("--stages must be at least 1")
    try:
        if args.certs_command == "init":
            certs.create_ca(directory, overwrite=args.force)
            written = [directory / certs.CA_CERT, directory / certs.CA_KEY]
        elif args.certs_command == "issue":
            written = list(certs.issue(directory, role=args.role, node_id=args.node_id, hosts=args.hosts))
        elif args.certs_command == "api-key":
            from shard.config import add_api_key

            print(add_api_key(Path(args.file)))
            return 0
        elif args.certs_command == "secret":
            from shard.wire.seal import write_secret

            write_secret(Path(args.file), overwrite=args.force)
            written = [Path(args.file)]
        else:
            written = certs.create_local_deployment(directory, args.stages, hosts=args.hosts)
    except (OSError, ValueError) as error:
        raise ConfigError(str(error)) from None
    for path in written:
        print(f"wrote {path}")
    return 0


def _generate(config: GenerateConfig) -> int:
    from pathlib import Path

    from shard.client import Client, ClientError, Credentials
    from shard.errors import ShardError
    from shard.generation import print_generation, request_options, write_receipt

    try:
        credentials = None if config.insecure else Credentials.from_folder(config.certs, config.node_id)
    except ValueError as error:
        raise ConfigError(f"--certs {config.certs}: {error}") from None
    with Client(config.coordinator, credentials=credentials, insecure=config.insecure) as client:
        try:
            stream = client.stream(**request_options(config))
            for delta in stream:
                if not config.json:
                    print(delta.text, end="", flush=True)
        except ClientError as error:
            raise ShardError(error.code, str(error)) from None
    print_generation(stream, config.json)
    write_receipt(stream, config, ca=Path(config.certs or ".") / "ca.pem")
    return 0


def verify_receipt(path: str, *, ca: str | None = None, replay: str | None = None) -> int:
    """`shard receipt verify`: 0 valid, 1 invalid, 2 unreadable (or a usage mistake)."""
    from pathlib import Path

    from shard.receipt import ReceiptInvalid, load, summary, verify

    try:
        receipt = load(path)
        ca_pem = Path(ca).read_bytes() if ca else None
    except (OSError, ValueError) as error:
        print(f"shard receipt verify: cannot read {error}", file=sys.stderr)
        return 2
    try:
        verified = verify(receipt, ca_pem)
        notes = []
        if replay:
            try:
                from shard.receipt_replay import replay as replay_run
            except ImportError as error:
                print(f"shard receipt verify: --replay needs the server extra ({error.name} is missing): "
                      f"{SERVER_HINT}", file=sys.stderr)
                return 2
            notes = replay_run(verified, Path(replay))
    except ReceiptInvalid as error:
        print(f"receipt INVALID: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # a model folder that cannot be read
        print(f"shard receipt verify: cannot replay: {error}", file=sys.stderr)
        return 2
    print("\n".join(summary(verified) + notes))
    return 0


def _serve(command: str, config) -> int:
    from shard.telemetry import configure_tracing, shutdown_tracing

    module = __import__(f"shard.services.{command}.main", fromlist=["serve"])
    tracing = configure_tracing(f"shard-{command}", config.node_id)
    try:
        asyncio.run(module.serve(config))
    finally:
        if tracing is not None:
            shutdown_tracing(tracing)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "certs":
        return _certs(args)
    if args.command == "receipt":
        return verify_receipt(args.file, ca=args.ca, replay=args.replay)
    if args.command == "bench":
        from shard.bench.main import main as bench

        return bench(args)
    config = config_of(args)
    if args.command in SERVICES:
        return _serve(args.command, config)
    if args.command == "generate":
        return _generate(config)
    from shard.local import up

    return up(config)


def _one_line(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename}: {error.strerror or 'not found'}"
    return str(getattr(error, "message", None) or error)


def _command(argv: list[str] | None) -> str | None:
    """The subcommand, before the full parse (which needs nothing beyond the base install)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--log-level")
    first.add_argument("command", nargs="?")
    return first.parse_known_args(argv)[0].command


def main(argv: list[str] | None = None) -> int:
    command = _command(argv)
    missing = missing_server_packages() if command in _SERVER_COMMANDS else []
    if missing:
        print(f"shard {command}: needs the server extra ({', '.join(missing)} not installed): {SERVER_HINT}",
              file=sys.stderr)
        return 2
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    from shard.errors import ShardError
    from shard.local import SwarmError

    try:
        return _run(args)
    except (ConfigError, ShardError, SwarmError, FileNotFoundError, PermissionError) as error:
        # What an operator can cause and fix: one line, no traceback.
        print(f"shard {args.command}: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
