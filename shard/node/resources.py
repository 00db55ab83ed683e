"""What a node offers: its device's name and id and a default memory budget."""

from __future__ import annotations

import os

import torch


def device_identity(device: str) -> tuple[str, str]:
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        properties = torch.cuda.get_device_properties(index)
        return properties.name, str(getattr(properties, "uuid", index))
    return "cpu", "cpu"


def default_memory_budget(device: str) -> int:
    """Free device memory, or physical RAM for the CPU, kept at 90% for activations."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.9)


def measure_speed(hidden_size: int, device: str, repeats: int = 20) -> float:
    """A short timed forward at start-up: TFLOP/s of a verify-sized chunk through an MLP
    shaped like the model's. The registry only compares nodes, so the scale is free."""
    import time

    dev = torch.device(device)
    chunk = torch.randn(9, hidden_size, device=dev)
    up = torch.randn(hidden_size, 4 * hidden_size, device=dev)
    down = torch.randn(4 * hidden_size, hidden_size, device=dev)
    with torch.inference_mode():
        (chunk @ up @ down).sum().item()  # warm-up
        began = time.perf_counter()
        for _ in range(repeats):
            (chunk @ up @ down).sum().item()
        seconds = time.perf_counter() - began
    return 2 * 2 * 9 * hidden_size * 4 * hidden_size * repeats / seconds / 1e12


def memory_report(device: torch.device | str, weight_bytes: int, kv_budget_bytes: int,
                  kv_allocated_bytes: int) -> dict:
    """A stage's peak device memory against what it is meant to hold: its block's weights
    plus its KV (the budget, and what is preallocated of it). Ratios over 1 are overhead:
    activations, graph pools, the CUDA context's allocator slack. Empty off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "max_memory_allocated": peak,
        "max_memory_reserved": torch.cuda.max_memory_reserved(device),
        "weight_bytes": weight_bytes,
        "kv_budget_bytes": kv_budget_bytes,
        "kv_allocated_bytes": kv_allocated_bytes,
        "peak_over_weights_and_kv_allocated": peak / max(weight_bytes + kv_allocated_bytes, 1),
        "peak_over_weights_and_kv_budget": peak / max(weight_bytes + kv_budget_bytes, 1),
    }
