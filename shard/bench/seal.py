"""`shard bench seal`: what the AEAD layer costs per frame, alone and on a loopback gRPC hop.

    shard bench seal [--reps N] [--hop-reps N] [--quick] [--out DIR] [--docs DIR]

1. Codec + AEAD, one core: for each hidden size and chunk length, the median per-frame time
   of encode_tensor, seal, open and decode_tensor (all four in every repetition, so the
   plain and sealed paths are measured interleaved), and the throughput per core.
2. Loopback hop: an in-process grpc.aio server (generic handlers, no new protos) with two
   bidi methods on one loopback channel. The client encodes (and seals) a chunk, writes a
   Frame and waits for the receiver's FrameAck; the receiver parses the Frame, (opens
   and) decodes the tensor and acks. Plain and sealed frames alternate, pair by pair; the
   overhead is taken from the medians and from the median of the per-pair differences.
   Run twice: on a plaintext channel (no TLS on either variant: the AEAD layer alone is
   the difference) and, for context, on an mTLS channel with the deployment's own
   certificates and options (shard.wire.tls), as stages are deployed.

Writes <out>/seal_cost.json and <docs>/seal-cost.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cryptography
import grpc
import torch

from shard.v1 import frame_pb2
from shard.wire import tls as shard_tls
from shard.wire.certs import create_deployment
from shard.wire.codec import decode_tensor, encode_tensor
from shard.wire.seal import OVERHEAD_BYTES, EdgeOpener, EdgeSealer

HIDDEN = (4096, 8192)
TOKENS = (1, 2, 5, 9, 17)
HEADLINE = (8192, 9)
GOAL_PCT = 5.0
SECRET = bytes(range(32))
SERVICE = "shard.bench.SealCost"
RESULTS, DOC = "seal_cost.json", "seal-cost.md"


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cryptography": cryptography.__version__,
        "openssl": _openssl_version(),
        "grpcio": grpc.__version__,
    }


def _openssl_version() -> str:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        return backend.openssl_version_text()
    except Exception:  # informational only
        return "unknown"


def header(counter: int, tokens: int, sender: str = "stage-0", receiver: str = "stage-1") -> frame_pb2.FrameHeader:
    return frame_pb2.FrameHeader(
        session_id="bench-session-0001",
        chunk_id=counter,
        epoch=1,
        start_pos=512,
        num_tokens=tokens,
        num_outputs=0,
        kind=frame_pb2.FRAME_KIND_FORWARD,
        sender=sender,
        receiver=receiver,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        counter=counter,
    )


def chunk(hidden: int, tokens: int) -> torch.Tensor:
    return torch.randn(1, tokens, hidden).to(torch.bfloat16)


def median_us(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e3


# ---------------------------------------------------------------------------------------
# 1. codec + AEAD on one core


def bench_codec(hidden: int, tokens: int, reps: int, warmup: int) -> dict:
    tensor = chunk(hidden, tokens)
    sealer = EdgeSealer(SECRET, "stage-0", "stage-1")
    opener = EdgeOpener([SECRET], "stage-0", "stage-1")
    times = {name: [] for name in ("encode", "seal", "open", "decode")}
    clock = time.perf_counter_ns
    payload_bytes = 0
    for i in range(warmup + reps):
        h = header(i + 1, tokens)
        t0 = clock()
        payload = encode_tensor(tensor)
        t1 = clock()
        sealed = sealer.seal(h, payload)
        t2 = clock()
        opened = opener.open(h, sealed)
        t3 = clock()
        decode_tensor(opened)
        t4 = clock()
        if i >= warmup:
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[name].append(dt)
        payload_bytes = len(payload)
    tensor_bytes = tensor.numel() * tensor.element_size()
    encode_seal = [a + b for a, b in zip(times["encode"], times["seal"])]
    open_decode = [a + b for a, b in zip(times["open"], times["decode"])]
    med = {name: median_us(values) for name, values in times.items()}
    med["encode_seal"], med["open_decode"] = median_us(encode_seal), median_us(open_decode)

    def gbps(nbytes: int, us: float) -> float:
        return round(nbytes / (us * 1e3), 3)

    return {
        "hidden": hidden,
        "tokens": tokens,
        "tensor_bytes": tensor_bytes,
        "payload_bytes": payload_bytes,
        "sealed_bytes": payload_bytes + OVERHEAD_BYTES,
        "reps": reps,
        **{f"{name}_us": round(value, 2) for name, value in med.items()},
        "seal_gbps": gbps(payload_bytes, med["seal"]),
        "open_gbps": gbps(payload_bytes, med["open"]),
        "encode_seal_gbps": gbps(tensor_bytes, med["encode_seal"]),
        "open_decode_gbps": gbps(tensor_bytes, med["open_decode"]),
    }


def bench_primitives(nbytes: int, reps: int) -> list[dict]:
    """Raw AEAD primitives on one payload, for reference: ChaCha20-Poly1305 (used) and
    AES-256-GCM (not used; the design names ChaCha20-Poly1305). Interleaved per repetition."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    data, nonce, ad = os.urandom(nbytes), bytes(12), b"\x00" * 128
    ciphers = {"ChaCha20-Poly1305": ChaCha20Poly1305(os.urandom(32)), "AES-256-GCM": AESGCM(os.urandom(32))}
    sealed = {name: aead.encrypt(nonce, data, ad) for name, aead in ciphers.items()}
    times = {name: ([], []) for name in ciphers}
    clock = time.perf_counter_ns
    for _ in range(reps):
        for name, aead in ciphers.items():
            t0 = clock()
            aead.encrypt(nonce, data, ad)
            t1 = clock()
            aead.decrypt(nonce, sealed[name], ad)
            t2 = clock()
            times[name][0].append(t1 - t0)
            times[name][1].append(t2 - t1)
    rows = []
    for name, (enc, dec) in times.items():
        e, d = median_us(enc), median_us(dec)
        rows.append({"aead": name, "bytes": nbytes, "encrypt_us": round(e, 2), "decrypt_us": round(d, 2),
                     "encrypt_gbps": round(nbytes / (e * 1e3), 2), "decrypt_gbps": round(nbytes / (d * 1e3), 2)})
    return rows


def bench_split_seal(nbytes: int, reps: int, ways: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    """Could more cores take the cipher off the hop? The payload sealed as `ways` segments,
    one in the calling thread and the rest in a thread pool (cryptography releases the GIL
    while it works); wall time per payload. Not used by the wire: it measures the idea."""
    from concurrent.futures import ThreadPoolExecutor

    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    data, ad = memoryview(os.urandom(nbytes)), b"\x00" * 128
    aead = ChaCha20Poly1305(os.urandom(32))
    rows = []
    for n in ways:
        size = -(-nbytes // n)
        segments = [data[i * size:(i + 1) * size] for i in range(n)]
        with ThreadPoolExecutor(max(n - 1, 1)) as pool:
            def seal_all():
                others = [pool.submit(aead.encrypt, i.to_bytes(12, "little"), seg, ad)
                          for i, seg in enumerate(segments[1:], 1)]
                aead.encrypt(bytes(12), segments[0], ad)
                for other in others:
                    other.result()

            for _ in range(max(10, reps // 10)):
                seal_all()
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter_ns()
                seal_all()
                samples.append(time.perf_counter_ns() - t0)
        rows.append({"segments": n, "threads": n, "seal_us": round(median_us(samples), 2)})
    return rows


# ---------------------------------------------------------------------------------------
# 2. loopback gRPC hop


class Sink:
    """Receiver of both methods: parse (grpc did), open if sealed, decode, ack."""

    def __init__(self):
        self.opener = EdgeOpener([SECRET], "stage-0", "stage-1")
        self.open_ns: list[int] = []  # time inside EdgeOpener.open, per sealed frame

    async def plain(self, frames, context):
        async for frame in frames:
            decode_tensor(frame.payload)
            yield _ack(frame.header)

    async def sealed(self, frames, context):
        clock = time.perf_counter_ns
        async for frame in frames:
            payload = frame.payload
            t0 = clock()
            opened = self.opener.open(frame.header, payload)
            self.open_ns.append(clock() - t0)
            decode_tensor(opened)
            yield _ack(frame.header)


def _ack(h: frame_pb2.FrameHeader) -> frame_pb2.FrameAck:
    return frame_pb2.FrameAck(session_id=h.session_id, chunk_id=h.chunk_id, counter=h.counter)


async def bench_hops(
    configs: list[tuple[int, int]],
    reps: int,
    warmup: int,
    tls: tuple[shard_tls.NodeTLS, shard_tls.NodeTLS] | None = None,
) -> list[dict]:
    """``tls``: (server's, client's) certificates, or None for a plaintext channel."""
    server_tls, client_tls = tls if tls is not None else (None, None)
    transport = "plaintext" if tls is None else "mtls"
    sink = Sink()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.stream_stream_rpc_method_handler(
                method,
                request_deserializer=frame_pb2.Frame.FromString,
                response_serializer=frame_pb2.FrameAck.SerializeToString,
            )
            for name, method in (("Plain", sink.plain), ("Sealed", sink.sealed))
        },
    )
    server = grpc.aio.server(options=shard_tls.SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = shard_tls.add_port(server, "127.0.0.1:0", server_tls)
    await server.start()
    results = []
    try:
        async with shard_tls.open_channel(f"localhost:{port}", client_tls) as channel:
            def method(name):
                return channel.stream_stream(
                    f"/{SERVICE}/{name}",
                    request_serializer=frame_pb2.Frame.SerializeToString,
                    response_deserializer=frame_pb2.FrameAck.FromString,
                )

            plain_call, sealed_call = method("Plain")(), method("Sealed")()
            sealer = EdgeSealer(SECRET, "stage-0", "stage-1")
            counter = 0
            clock = time.perf_counter_ns
            seal_ns: list[int] = []

            async def hop(tensor, tokens, sealed: bool) -> int:
                nonlocal counter
                counter += 1
                h = header(counter, tokens)
                t0 = clock()
                payload = encode_tensor(tensor)
                if sealed:
                    t_seal = clock()
                    payload = sealer.seal(h, payload)
                    seal_ns.append(clock() - t_seal)
                call = sealed_call if sealed else plain_call
                await call.write(frame_pb2.Frame(header=h, payload=payload))
                ack = await call.read()
                t1 = clock()
                assert ack.counter == counter
                return t1 - t0

            for hidden, tokens in configs:
                tensor = chunk(hidden, tokens)
                plain, sealed = [], []
                seal_ns.clear()
                sink.open_ns.clear()
                for i in range(warmup + reps):
                    # Alternate which variant goes first in each pair.
                    order = (False, True) if i % 2 == 0 else (True, False)
                    got = {variant: await hop(tensor, tokens, variant) for variant in order}
                    if i >= warmup:
                        plain.append(got[False])
                        sealed.append(got[True])
                plain_us, sealed_us = median_us(plain), median_us(sealed)
                paired_us = median_us([s - p for s, p in zip(sealed, plain)])
                results.append({
                    "transport": transport,
                    "hidden": hidden,
                    "tokens": tokens,
                    "reps": reps,
                    "plain_us": round(plain_us, 1),
                    "sealed_us": round(sealed_us, 1),
                    "plain_p10_us": round(_quantile(plain, 0.1) / 1e3, 1),
                    "plain_p90_us": round(_quantile(plain, 0.9) / 1e3, 1),
                    "sealed_p10_us": round(_quantile(sealed, 0.1) / 1e3, 1),
                    "sealed_p90_us": round(_quantile(sealed, 0.9) / 1e3, 1),
                    "overhead_pct": round(100 * (sealed_us - plain_us) / plain_us, 2),
                    "paired_overhead_us": round(paired_us, 1),
                    "paired_overhead_pct": round(100 * paired_us / plain_us, 2),
                    # seal and open timed where they run, inside the hop (caches colder than
                    # in the tight loop of bench_codec)
                    "seal_in_hop_us": round(median_us(seal_ns[warmup:]), 1),
                    "open_in_hop_us": round(median_us(sink.open_ns[warmup:]), 1),
                })
                print(_hop_line(results[-1]), file=sys.stderr, flush=True)
            await plain_call.done_writing()
            await sealed_call.done_writing()
            assert sink.opener.rejected == {}, sink.opener.rejected
    finally:
        await server.stop(None)
    return results


def _quantile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _hop_line(r: dict) -> str:
    return (
        f"hop {r['transport']:>9} {r['hidden']:>5} x {r['tokens']:>2}: plain {r['plain_us']:8.1f} us, "
        f"sealed {r['sealed_us']:8.1f} us, overhead {r['overhead_pct']:+6.2f}% "
        f"(paired {r['paired_overhead_us']:+7.1f} us, {r['paired_overhead_pct']:+6.2f}%); "
        f"in hop: seal {r['seal_in_hop_us']:.1f} us, open {r['open_in_hop_us']:.1f} us"
    )


# ---------------------------------------------------------------------------------------
# report


def _hop_table(rows: list[dict]) -> list[str]:
    lines = [
        "| hidden | tokens | plain us (p10-p90) | sealed us (p10-p90) | overhead (medians) | overhead (paired) "
        "| seal in hop us | open in hop us |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hidden']} | {r['tokens']} | {r['plain_us']:.1f} ({r['plain_p10_us']:.0f}-{r['plain_p90_us']:.0f}) "
            f"| {r['sealed_us']:.1f} ({r['sealed_p10_us']:.0f}-{r['sealed_p90_us']:.0f}) "
            f"| {r['overhead_pct']:+.2f}% | {r['paired_overhead_us']:+.1f} us ({r['paired_overhead_pct']:+.2f}%) "
            f"| {r['seal_in_hop_us']:.1f} | {r['open_in_hop_us']:.1f} |"
        )
    return lines


def _headline_line(h: dict) -> str:
    return (
        f"plain {h['plain_us']} us, sealed {h['sealed_us']} us per hop: the AEAD layer adds "
        f"**{h['overhead_pct']:+.2f}%** (median of per-pair differences: {h['paired_overhead_us']:+.1f} us, "
        f"{h['paired_overhead_pct']:+.2f}%)"
    )


def _split_verdict(rows: list[dict]) -> str:
    one = rows[0]["seal_us"]
    best = min(rows[1:], key=lambda r: r["seal_us"])
    if best["seal_us"] >= one:
        return "the thread hand-offs cost more than the split saves"
    return f"{best['segments']} segments save {100 * (1 - best['seal_us'] / one):.0f}% of the seal"


def markdown(report: dict, results: Path) -> str:
    m, heads = report["machine"], report["headline"]
    plain_head = heads["plaintext"]
    lines = [
        "# AEAD seal cost",
        "",
        "Generated by `shard bench seal`; do not edit by hand. Command (repository root, venv active):",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Machine: {m['nproc']} CPUs (`nproc`), CPU model `{m['cpu_model']}` (/proc/cpuinfo); {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} thread), cryptography {m['cryptography']} "
        f"({m['openssl']}), grpcio {m['grpcio']}. Run at {report['when']}.",
        "",
        "Chunks are bf16 activations of shape `[1, tokens, hidden]`. Times are medians over "
        f"{report['params']['reps']} repetitions (codec) and {report['params']['hop_reps']} "
        "interleaved plain/sealed pairs per row (hops), after warm-up. Throughput is per core "
        f"(one thread). A sealed payload is {report['params']['overhead_bytes_per_frame']} bytes longer "
        "(4-byte key id, 12-byte stream id, 16-byte tag).",
        "",
        f"## Headline: {HEADLINE[0]} x {HEADLINE[1]} chunk on a loopback hop (goal: AEAD adds < {GOAL_PCT}%)",
        "",
        f"- Plaintext loopback: {_headline_line(plain_head)}. Goal "
        f"**{'met' if plain_head['goal_met'] else 'not met'}**.",
    ]
    if "mtls" in heads:
        lines.append(f"- mTLS loopback (as deployed): {_headline_line(heads['mtls'])}.")
    aead_us = plain_head["seal_in_hop_us"] + plain_head["open_in_hop_us"]
    lines += [
        f"- The overhead is the cipher's CPU time on the bytes: seal {plain_head['seal_in_hop_us']} us + "
        f"open {plain_head['open_in_hop_us']} us inside the hop. It is under {GOAL_PCT}% of a hop only when "
        f"the hop takes at least {aead_us * 100 / GOAL_PCT / 1000:.1f} ms (a real network link, not loopback).",
    ]
    lines += [
        "",
        "## Codec and AEAD per frame (one core, tight loop)",
        "",
        "encode = `encode_tensor`, decode = `decode_tensor`; seal/open = `EdgeSealer.seal`/`EdgeOpener.open` "
        "(AD encoding included). All four run in every repetition, so plain (encode, decode) and sealed "
        "(encode+seal, open+decode) are measured interleaved. GB/s = payload bytes (seal, open) or "
        "tensor bytes (the pairs) per second on one core.",
        "",
        "| hidden | tokens | payload B | encode us | seal us | encode+seal us | open us | decode us "
        "| open+decode us | seal GB/s | open GB/s | encode+seal GB/s | open+decode GB/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["codec"]:
        lines.append(
            f"| {r['hidden']} | {r['tokens']} | {r['payload_bytes']} | {r['encode_us']:.1f} | {r['seal_us']:.1f} "
            f"| {r['encode_seal_us']:.1f} | {r['open_us']:.1f} | {r['decode_us']:.1f} | {r['open_decode_us']:.1f} "
            f"| {r['seal_gbps']:.2f} | {r['open_gbps']:.2f} | {r['encode_seal_gbps']:.2f} | {r['open_decode_gbps']:.2f} |"
        )
    lines += [
        "",
        f"Raw AEAD primitives on a {report['primitives'][0]['bytes']}-byte payload (the {HEADLINE[0]} x "
        f"{HEADLINE[1]} chunk), tight loop, for reference (AES-256-GCM is not used):",
        "",
        "| AEAD | encrypt us | decrypt us | encrypt GB/s | decrypt GB/s |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {p['aead']} | {p['encrypt_us']:.1f} | {p['decrypt_us']:.1f} | {p['encrypt_gbps']:.2f} | {p['decrypt_gbps']:.2f} |"
            for p in report["primitives"]
        ),
        "",
        f"The same ChaCha20-Poly1305 seal split into segments across threads ({os.cpu_count()} CPUs here), "
        f"to see whether more cores could take the cipher off the hop: {_split_verdict(report['split_seal'])}.",
        "",
        "| segments (threads) | seal us |",
        "|---:|---:|",
        *(f"| {r['segments']} | {r['seal_us']:.1f} |" for r in report["split_seal"]),
        "",
        "## Loopback gRPC hop, plaintext both ways (in-process grpc.aio)",
        "",
        "One hop = the client encodes (and seals) the chunk and writes the Frame on a bidi stream; the "
        "receiver parses it, (opens and) decodes the tensor and replies with a FrameAck; timed until "
        "the ack is read. Client and server share one process and one event loop. No TLS on either "
        "variant, so the difference is the AEAD layer alone. `seal/open in hop` are the medians of "
        "the seal and open calls timed where they run inside the hop (colder caches than the tight loop "
        "above); their sum is most of the paired overhead.",
        "",
        *_hop_table(report["hops"]["plaintext"]),
    ]
    if "mtls" in report["hops"]:
        lines += [
            "",
            "## Loopback gRPC hop over mTLS (context: the deployed transport)",
            "",
            "The same hop on a channel with the deployment's certificates (`shard.wire.tls`, ECDSA P-256 "
            "node certificates from `shard.wire.certs`); TLS encrypts both variants.",
            "",
            *_hop_table(report["hops"]["mtls"]),
        ]
    lines += ["", f"Raw numbers: `{results}`.", ""]
    return "\n".join(lines)


def _tls_pair(directory: Path) -> tuple[shard_tls.NodeTLS, shard_tls.NodeTLS]:
    create_deployment(directory, [("stage", "stage-0"), ("stage", "stage-1")])
    return shard_tls.NodeTLS.load(directory, "stage-1"), shard_tls.NodeTLS.load(directory, "stage-0")


def main(args) -> int:
    if args.quick:
        args.reps, args.hop_reps = 50, 30
    torch.set_num_threads(1)
    configs = [(hidden, tokens) for hidden in HIDDEN for tokens in TOKENS]

    codec = []
    for hidden, tokens in configs:
        codec.append(bench_codec(hidden, tokens, args.reps, warmup=max(10, args.reps // 10)))
        r = codec[-1]
        print(
            f"codec {hidden:>5} x {tokens:>2}: encode+seal {r['encode_seal_us']:7.1f} us "
            f"(seal {r['seal_us']:6.1f}, {r['seal_gbps']:.2f} GB/s), open+decode {r['open_decode_us']:7.1f} us "
            f"(open {r['open_us']:6.1f}, {r['open_gbps']:.2f} GB/s)",
            file=sys.stderr,
            flush=True,
        )
    headline_bytes = HEADLINE[0] * HEADLINE[1] * 2
    primitives = bench_primitives(headline_bytes, args.reps)
    split = bench_split_seal(headline_bytes, args.reps)
    warmup = max(10, args.hop_reps // 10)
    hops = {"plaintext": asyncio.run(bench_hops(configs, args.hop_reps, warmup))}
    if not args.no_tls:
        with tempfile.TemporaryDirectory(prefix="seal-cost-certs-") as certs:
            hops["mtls"] = asyncio.run(bench_hops(configs, args.hop_reps, warmup, _tls_pair(Path(certs))))
    headline = {
        transport: {
            **next(r for r in rows if (r["hidden"], r["tokens"]) == HEADLINE),
            "goal_pct": GOAL_PCT,
        }
        for transport, rows in hops.items()
    }
    for head in headline.values():
        head["goal_met"] = head["paired_overhead_pct"] < GOAL_PCT and head["overhead_pct"] < GOAL_PCT
    report = {
        "command": shlex.join(["shard", "bench", *sys.argv[sys.argv.index("bench") + 1:]]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "params": {"reps": args.reps, "hop_reps": args.hop_reps, "hidden": HIDDEN, "tokens": TOKENS,
                   "dtype": "bfloat16", "shape": "[1, tokens, hidden]",
                   "overhead_bytes_per_frame": OVERHEAD_BYTES},
        "headline": headline,
        "codec": codec,
        "primitives": primitives,
        "split_seal": split,
        "hops": hops,
    }
    if args.no_write:
        print(json.dumps(report, indent=2))
        return 0
    results, doc = Path(args.out) / RESULTS, Path(args.docs) / DOC
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(markdown(report, results))
    print(f"wrote {results} and {doc}", file=sys.stderr)
    for head in headline.values():
        print(_hop_line(head))
    return 0
