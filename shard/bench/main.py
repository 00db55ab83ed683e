"""`shard bench {wan,concurrency,seal,memory,gpu,sampling}`: one subcommand per benchmark, each writing its JSON
results under --out and its rendered Markdown (and plot) under --docs.

Only the arguments live here: the benchmarks' modules (torch, model code) are imported
when one runs, so `shard bench --help` stays fast."""

from __future__ import annotations

from shard.bench.topology import TOPOLOGIES

def _wan_arguments(parser) -> None:
    parser.add_argument("--model", help="target model folder (default: the shared tiny model)")
    parser.add_argument("--topology", action="append", choices=sorted(TOPOLOGIES),
                        help="repeatable (default: lan, wan-3, wan-6)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3, help="how many of the story prompts")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer drafts and settings")
    parser.add_argument("--compute-check", action="store_true",
                        help="also compare plain 2-stage decode with one process on a compute-heavy model")
    parser.add_argument("--compute-threads", type=int, default=1,
                        help="torch threads per node and for the single process in the compute check")
    parser.add_argument("--compute-rounds", type=int, default=9,
                        help="paired rounds (single process, then pipeline) in the compute check")
    parser.add_argument("--no-plot", action="store_true", help="no plot (no matplotlib needed)")
    parser.add_argument("--from-json", metavar="RESULTS", nargs="+",
                        help="run nothing: write one table and plot of results files (from another machine, "
                             "or several runs of one)")


def _concurrency_arguments(parser) -> None:
    parser.add_argument("--model", help="target model folder (default: the shared tiny model)")
    parser.add_argument("--compute-model", action="store_true",
                        help="instead of --model, the compute check's random llama (8 layers, hidden 1024: tens "
                             "of ms a token on a CPU), with fixed prompt ids: batching where compute dominates")
    parser.add_argument("--topology", action="append", choices=sorted(TOPOLOGIES),
                        help="repeatable (default: lan, wan-3)")
    parser.add_argument("--mode", action="append", choices=("plain", "pipelined"),
                        help="repeatable (default: both; pipelined: the target as its own draft, K=4, W=4)")
    parser.add_argument("--sessions", default="1,2,4,8,16", metavar="N,N,...",
                        help="concurrent sessions per round (default 1,2,4,8,16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per session")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="the stages' --max-batch (1: no batching, to compare)")


def _seal_arguments(parser) -> None:
    parser.add_argument("--reps", type=int, default=3000, help="codec repetitions per config")
    parser.add_argument("--hop-reps", type=int, default=1000, help="plain/sealed hop pairs per config")
    parser.add_argument("--no-tls", action="store_true", help="skip the mTLS hop comparison")
    parser.add_argument("--quick", action="store_true", help="few repetitions; smoke test only")
    parser.add_argument("--no-write", action="store_true", help="print the JSON results, write nothing")


def _memory_arguments(parser) -> None:
    parser.add_argument("--model", help="model folder (default: a random llama of about 530 MiB, built here)")
    parser.add_argument("--stages", type=int, default=4, help="stages of the split swarm")


def _gpu_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (tiny shapes: the CI run)")
    parser.add_argument("--gpus", metavar="DEV,DEV,...",
                        help="the stages' devices, round robin (one stage per GPU: cuda:0,cuda:1,...); the draft "
                             "runs on the first. Default: --device")
    parser.add_argument("--shape", default="8b", choices=("8b", "70b", "405b"),
                        help="the Llama-3 shape of the GPU target (default 8b); a CPU run uses tiny shapes")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="default auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--topology", action="append", choices=sorted(TOPOLOGIES),
                        help="repeatable (default: lan, wan-3, wan-6)")
    parser.add_argument("--draft", action="append", metavar="LABEL=SPEC",
                        help="repeatable; a --draft value of the coordinator, {target} and {draft} standing for "
                             "the dummy target and draft folders (default: target={target}, "
                             "oracle-1.0=oracle:1.0:{draft}, oracle-0.8=oracle:0.8:{draft})")
    parser.add_argument("--setting", action="append", metavar="K,W",
                        help="repeatable, one K per run: draft tokens per chunk and chunks in flight of the "
                             "speculative modes (default: 4,1 and 4,4)")
    parser.add_argument("--max-tokens", type=int, help="new tokens per generation (default 64; 16 with --quick)")
    parser.add_argument("--prompts", type=int, help="generations per mode (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and prompts: a run that fits one call")
    parser.add_argument("--sessions", metavar="N,N,...",
                        help="after the modes, rounds of this many concurrent plain-decode sessions on each "
                             "topology (e.g. 1,8,16): aggregate tok/s, latencies, stage busy fractions")
    parser.add_argument("--static-batch", type=int, default=0, metavar="N",
                        help="the stages' --static-batch: decode chunks of up to N sessions as one graphed forward "
                             "(default 0: one at a time)")
    parser.add_argument("--session-positions", type=int, metavar="N",
                        help="the stages' --session-positions (default: the model's context, at most 4096)")
    parser.add_argument("--session-draft", metavar="LABEL",
                        help="with --sessions, also rounds of speculative sessions with this --draft (e.g. "
                             "oracle-1.0) at the --setting with the most chunks in flight: the coordinator's "
                             "drafts under load")
    parser.add_argument("--draft-batch", type=int, metavar="N",
                        help="the coordinator's --draft-batch: on a GPU, the draft steps of up to N sessions as "
                             "one graphed forward (default: the coordinator's)")


def _sampling_arguments(parser) -> None:
    parser.add_argument("--model", help="target model folder (default: the shared tiny model)")
    parser.add_argument("--topology", action="append", choices=sorted(TOPOLOGIES), help="repeatable (default: lan)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3, help="how many of the story prompts")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per verify chunk")
    parser.add_argument("--w", type=int, default=4, help="chunks in flight in the pipelined rows")


# name -> (one-line help, its own arguments)
BENCHMARKS = {
    "wan": ("every decoding mode side by side over emulated WAN links", _wan_arguments),
    "concurrency": ("1 to 16 sessions at once on one ring: aggregate and per-session tok/s, latencies, "
                    "stage busy", _concurrency_arguments),
    "seal": ("what the AEAD layer costs per frame, alone and on a loopback gRPC hop", _seal_arguments),
    "memory": ("a stage's peak memory against its block's share of the model", _memory_arguments),
    "sampling": ("acceptance and tok/s under speculative sampling (T 0.7, 1.0) next to greedy",
                 _sampling_arguments),
    "gpu": ("8B-shaped dummy-weight models on a GPU: one process, micro benchmarks, every mode end to end",
            _gpu_arguments),
}


def add_arguments(parser) -> None:
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (summary, arguments) in BENCHMARKS.items():
        benchmark = benchmarks.add_parser(name, help=summary, description=summary)
        arguments(benchmark)
        benchmark.add_argument("--out", default="bench/results", metavar="DIR",
                               help="folder for the JSON results (default: bench/results)")
        benchmark.add_argument("--docs", default="docs", metavar="DIR",
                               help="folder for the rendered Markdown and plot (default: docs)")


def main(args) -> int:
    from shard.bench import concurrency, gpu, memory, sampling, seal, wan

    return {"wan": wan, "concurrency": concurrency, "seal": seal, "memory": memory, "gpu": gpu,
            "sampling": sampling}[args.benchmark].main(args)
