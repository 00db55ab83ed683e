"""Plain decode: one token per traversal, the latency-bound baseline."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Awaitable, Callable

Step = Callable[[int, list[int], int], Awaitable[list[int]]]
Emit = Callable[[list[int]], Awaitable[None]]


class Finish(enum.Enum):
    LENGTH = "length"
    EOS = "eos"


@dataclass
class DecodeStats:
    output_ids: list[int] = field(default_factory=list)
    finish: Finish = Finish.LENGTH
    traversals: int = 0


async def plain_decode(step: Step, prompt_ids: list[int], *, max_tokens: int,
                       eos_ids: frozenset[int], emit: Emit) -> DecodeStats:
    stats = DecodeStats()
    tokens, start_pos = list(prompt_ids), 0
    while True:
        (next_id,) = await step(start_pos, tokens, 1)
        stats.traversals += 1
        stats.output_ids.append(next_id)
        await emit([next_id])
        if next_id in eos_ids:
            stats.finish = Finish.EOS
            return stats
        if len(stats.output_ids) >= max_tokens:
            return stats
        start_pos += len(tokens)
        tokens = [next_id]
