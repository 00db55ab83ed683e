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
