"""The `shard` command: one subcommand per service, a client, and `up` for a local swarm."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

import torch
from google.protobuf.json_format import MessageToDict

from shard.telemetry import configure_tracing
from shard.v1 import api_pb2

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(text: str) -> int:
    """'24GiB', '512m', '1000000' -> bytes."""
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _SUFFIXES.get(cleaned[-1:], 1)
    number = cleaned[:-1] if scale != 1 else cleaned
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def dtype_name(text: str) -> torch.dtype | None:
    if text not in _DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(_DTYPES)}")
    return _DTYPES[text]


def _node_args(parser: argparse.ArgumentParser, role: str, default_id: str) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model folder (config + safetensors)")
    parser.add_argument("--node-id", default=default_id, help=f"this node's id (default {default_id})")
    parser.add_argument("--certs", help="folder with ca.pem and this node's <id>.pem/<id>.key")
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC, no mTLS (testing only)")
    if role != "registry":
        parser.add_argument("--secret", action="append", metavar="FILE",
                            help="deployment secret file; repeat to roll a new one: the first seals, any opens ("
                                 "default: <certs>/deployment.secret)")
    parser.add_argument("--listen", default="0.0.0.0:0", help="address to bind (port 0: any free port)")
    parser.add_argument("--advertise-host", default="127.0.0.1", help="host other nodes dial to reach this one")
    parser.add_argument("--advertise", metavar="HOST:PORT",
                        help="full address other nodes dial, when it is not this node's own port "
                             "(behind a proxy or a relay)")
    parser.add_argument("--address-file", help="write host:port here once serving")
    parser.add_argument("--region", default="", help="where this node runs")
    if role != "registry":
        parser.add_argument("--registry", required=True, help="registry address host:port")
        parser.add_argument("--registry-id", default="registry",
                            help="node id the registry's certificate must name (default registry)")
        parser.add_argument("--threads", type=int,
                            help="torch intra-op threads (default: torch's; 1 is fastest for tiny models, "
                                 "whose ops are too small to split)")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shard", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    certs = commands.add_parser("certs", help="create a deployment CA and node certificates", add_help=False)
    certs.add_argument("rest", nargs=argparse.REMAINDER)

    registry = commands.add_parser("registry", help="run the registry")
    _node_args(registry, "registry", "registry")
    registry.add_argument("--stages", type=int, default=1, help="stages to wait for before planning")
    registry.add_argument("--lease-seconds", type=float, default=5.0,
                          help="a node that misses heartbeats this long is removed (they come 4 times per lease)")
    registry.add_argument("--pin-trusted-ends", action="store_true",
                          help="the first and last blocks (which see the user's tokens) only on stages "
                               "joined with --trust trusted")

    stage = commands.add_parser("stage", help="run a stage: join the registry, serve a block of layers")
    _node_args(stage, "stage", "stage-0")
    stage.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    stage.add_argument("--dtype", type=dtype_name, default=None, help="auto (the checkpoint's), float32, bfloat16, float16")
    stage.add_argument("--memory-budget", type=byte_size, help="bytes this stage offers (default: 90%% of free)")
    stage.add_argument("--max-sessions", type=int, default=64)
    stage.add_argument("--trust", default="", help="trust label; 'trusted' may hold the first and last blocks")
    stage.add_argument("--speed", type=float,
                       help="relative speed to report instead of the one measured at start-up")
    stage.add_argument("--quiet", action="store_true", help="no progress bar")

    coordinator = commands.add_parser("coordinator", help="run the coordinator (public Generate API)")
    _node_args(coordinator, "coordinator", "coordinator")
    _speculation_args(coordinator, drafts_help="a draft to load: 'ngram' or a model folder sharing the "
                      "target's tokenizer (repeat for several; the first is the default)")

    generate = commands.add_parser("generate", help="ask a coordinator for text")
    generate.add_argument("--coordinator", required=True, help="coordinator address host:port")
    generate.add_argument("--certs", help="folder with ca.pem and the client's certificate")
    generate.add_argument("--node-id", default="client")
    generate.add_argument("--insecure", action="store_true")
    _speculation_args(generate, drafts_help="which of the coordinator's drafts to use: 'ngram', 'none' "
                      "or the folder it was started with")
    _request_args(generate)

    bench = commands.add_parser("bench", help="benchmarks: wan (decoding modes over emulated WAN links), seal, memory")
    from shard.bench.main import add_arguments

    add_arguments(bench)

    up = commands.add_parser("up", help="start a whole local swarm, generate, shut it down")
    up.add_argument("--model", default=None, help="model folder (default: the shared tiny model)")
    up.add_argument("--stages", type=int, default=2)
    up.add_argument("--insecure", action="store_true", help="plaintext gRPC between the local processes")
    up.add_argument("--dtype", choices=_DTYPES, default="auto")
    _speculation_args(up, drafts_help="draft for the coordinator: 'ngram' or a model folder")
    _request_args(up)
    return parser


def _speculation_args(parser: argparse.ArgumentParser, drafts_help: str) -> None:
    parser.add_argument("--draft", action="append", default=[], help=drafts_help)
    parser.add_argument("--spec-k", type=int, help="draft tokens per verify chunk (0: plain decode)")
    parser.add_argument("--in-flight", type=int, help="verify chunks kept in flight (1: synchronous)")


def _request_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--json", action="store_true", help="print token ids and text as JSON")


def build_request(args) -> api_pb2.GenerateRequest:
    request = api_pb2.GenerateRequest(max_tokens=max(args.max_tokens, 0), stop_at_eos=not args.ignore_eos,
                                              draft=args.draft[0] if args.draft else "")
    if args.spec_k is not None:
        request.spec_k = args.spec_k
    if args.in_flight is not None:
        request.in_flight = args.in_flight
    if args.prompt_ids:
        request.prompt_ids.ids.extend(int(i) for i in args.prompt_ids.split(","))
    elif args.chat:
        request.chat.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    return request


def print_generation(generation, as_json: bool) -> None:
    summary = generation.summary
    if as_json:
        fields = MessageToDict(summary, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        fields["finish_reason"] = api_pb2.FinishReason.Name(summary.finish_reason)
        print(json.dumps(fields))
    else:
        print(file=sys.stderr)
        print(f"[{summary.tokens} tokens in {summary.seconds:.2f} s: {summary.tokens_per_second:.1f} tok/s, "
              f"K={summary.spec_k} W={summary.in_flight}, acceptance {summary.acceptance_rate:.2f}, "
              f"{summary.tokens_per_traversal:.2f} tokens per traversal, chunks sent/wasted/cancelled "
              f"{summary.chunks_sent}/{summary.chunks_wasted}/{summary.chunks_cancelled}; time draft "
              f"{summary.draft_seconds:.2f} s, ring {summary.ring_seconds:.2f} s, coordinator "
              f"{summary.coordinator_seconds:.2f} s; "
              f"{api_pb2.FinishReason.Name(summary.finish_reason)}]", file=sys.stderr)


async def _generate(args) -> int:
    import grpc

    from shard.client import generate
    from shard.wire.tls import NodeTLS

    tls = None if args.insecure else NodeTLS.load(args.certs, args.node_id)
    on_text = None if args.json else (lambda text: print(text, end="", flush=True))
    try:
        generation = await generate(args.coordinator, tls, build_request(args), on_text=on_text)
    except grpc.aio.AioRpcError as error:
        print(f"shard generate: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print_generation(generation, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    if args.command == "certs":
        from shard.wire.certs import cli

        return cli(args.rest)
    if args.command in ("registry", "stage", "coordinator"):
        if not args.insecure and not args.certs:
            print(f"shard {args.command}: give --certs DIR (or --insecure for plaintext)", file=sys.stderr)
            return 2
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        module = __import__(f"services.{args.command}.main", fromlist=["serve"])
        tracing = configure_tracing(f"shard-{args.command}")
        try:
            asyncio.run(module.serve(args))
        finally:
            if tracing is not None:
                tracing.shutdown()  # flushes the spans still batched
        return 0
    if args.command == "generate":
        if not args.insecure and not args.certs:
            print("shard generate: give --certs DIR (or --insecure)", file=sys.stderr)
            return 2
        return asyncio.run(_generate(args))
    if args.command == "bench":
        from shard.bench.main import main as bench

        return bench(args)
    from shard.launcher import up

    return up(args)
