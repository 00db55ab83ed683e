"""A stage's chunk on a GPU, in-process: an 8B-shaped block of random weights made on the
device (nothing written to disk), one chunk timed eagerly (the dynamic cache of today's
CPU path, and the static one) and replayed as a CUDA graph, of the layers as they are and
compiled by torch.compile (what a stage on CUDA runs). For `shard bench gpu`."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoConfig

from shard.model.block import Block
from shard.model.static_block import StaticBlock
from shard.node.resources import memory_report


def llama_8b_config():
    """Llama-3-8B's shapes (32 layers; a stage takes some of them)."""
    return AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def hbm_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + write), the ceiling a
    weight-bound forward can reach."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return nbytes * repeats / (time.perf_counter() - began)


def _time_ms(run, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()  # every forward ends waiting for its output in host memory
        times.append((time.perf_counter() - began) * 1e3)
    return times


def stage_chunk_benchmark(*, layers: int = 16, chunk: int = 9, context: int = 512, capacity: int = 2048,
                          dtype: torch.dtype = torch.bfloat16, device: str = "cuda", repeats: int = 50,
                          warmup: int = 5, config=None) -> dict:
    """Median ms of one `chunk`-token chunk through `layers` layers of an 8B-shaped block
    (hidden in, hidden out: a middle stage), at position `context`, rolled back and re-run
    each time (a verify chunk's life): eager over a DynamicCache, eager over static KV,
    graphed over static KV, and graphed over compiled layers; whether each graph gives the
    bytes of the same layers run without it; the weights-over-HBM bound; peak memory
    against weights plus KV."""
    device = torch.device(device)
    torch.cuda.reset_peak_memory_stats(device)
    block = Block.random(config or llama_8b_config(), layers, device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randn(context, block.hidden_size, generator=generator).to(dtype)
    hidden = torch.randn(chunk, block.hidden_size, generator=generator).to(dtype)

    eager = StaticBlock(block, capacity=capacity, chunk_sizes=(chunk, 64), pool_size=0)
    graphed = StaticBlock(block, capacity=capacity, chunk_sizes=(chunk, 64), pool_size=1)
    began = time.perf_counter()
    graphed.capture()
    capture_seconds = time.perf_counter() - began
    compiled = StaticBlock(block, capacity=capacity, chunk_sizes=(chunk, 64), pool_size=1, compiled=True)
    began = time.perf_counter()
    compiled.capture()
    compile_seconds = time.perf_counter() - began
    outputs = {}

    def static_run(runner: StaticBlock, name: str):
        cache = runner.new_cache()
        runner.forward(cache, 0, hidden=prefix)

        def run():
            outputs[name] = runner.forward(cache, context, hidden=hidden).clone()
        return run

    dynamic_cache = block.new_cache()
    block.forward(dynamic_cache, 0, hidden=prefix.to(device))

    def dynamic_run():
        block.forward(dynamic_cache, context, hidden=hidden.to(device)).cpu()  # crops back to context first

    times = {"dynamic_eager": _time_ms(dynamic_run, repeats, warmup),
             "static_eager": _time_ms(static_run(eager, "eager"), repeats, warmup),
             "static_graphed": _time_ms(static_run(graphed, "graphed"), repeats, warmup),
             "compiled_graphed": _time_ms(static_run(compiled, "compiled"), repeats, warmup)}
    # The compiled layers without the graph: a cache outside the pool has none.
    compiled_cache = compiled.new_cache(pooled=False)
    compiled.forward(compiled_cache, 0, hidden=prefix)
    compiled_eager = compiled.forward(compiled_cache, context, hidden=hidden).clone()
    # Two static caches and the dynamic one; the bandwidth probe's buffers come after the peak is read.
    kv_bytes = 3 * StaticBlock.bytes_per_session(block, capacity) + (context + chunk) * block.kv_bytes_per_position
    memory = memory_report(device, block.weight_bytes, kv_bytes, kv_bytes)
    bandwidth = hbm_bandwidth(device)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "gpu": torch.cuda.get_device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "layers": layers, "chunk": chunk, "context": context, "capacity": capacity, "repeats": repeats,
        "weight_bytes": block.weight_bytes,
        "hbm_bytes_per_second": bandwidth,
        "weights_over_hbm_ms": block.weight_bytes / bandwidth * 1e3,
        **{f"{name}_ms": value for name, value in median.items()},
        **{f"{name}_min_ms": min(values) for name, values in times.items()},
        "graph_speedup_over_static_eager": median["static_eager"] / median["static_graphed"],
        "graph_speedup_over_dynamic_eager": median["dynamic_eager"] / median["static_graphed"],
        "compiled_speedup_over_static_graphed": median["static_graphed"] / median["compiled_graphed"],
        "graph_identical_to_eager": torch.equal(outputs["eager"], outputs["graphed"]),
        "compiled_graph_identical_to_compiled_eager": torch.equal(compiled_eager, outputs["compiled"]),
        "capture_seconds": capture_seconds,
        "compile_and_capture_seconds": compile_seconds,
        "memory": memory,
    }
