"""Several sessions' chunk schedules run a group of sessions at a time: what the
batch-invariance tests compare across group sizes (a session alone against the same
session beside 1, 3 or 7 others)."""

import random
from collections.abc import Callable

import torch

Schedule = list[tuple[int, list[int]]]  # one session's chunks: (start_pos, token ids)


def schedule(seed: int, vocab: int, steps: int, longest: int = 5) -> Schedule:
    """One session's chunks: a prompt of 2 to 20 tokens, then `steps` verify-sized chunks
    (1 to `longest` tokens), some of which start before the cache's end (a rejected draft
    rolled back)."""
    rng = random.Random(seed)
    chunks, end = [], rng.randint(2, 20)
    chunks.append((0, [rng.randrange(vocab) for _ in range(end)]))
    for _ in range(steps):
        start = end - rng.choice([0, 0, 0, 1, 3]) if end > 4 else end
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, longest))]
        chunks.append((start, tokens))
        end = start + len(tokens)
    return chunks


def run_in_groups(schedules: list[Schedule], group: int, *, new_caches: Callable[[], list],
                  step: Callable[[int, range, dict, dict], dict],
                  release: Callable[[list], None] = lambda caches: None) -> list[list]:
    """What `step` records for every session and chunk, its sessions run `group` at a
    time. `new_caches()`: one session's caches (one per block); `step(index, members,
    caches, inputs)`: runs chunk `index` of each member (inputs: session -> its token ids)
    and returns session -> what to record; `release(caches)`: a finished session's caches."""
    outputs = [[] for _ in schedules]
    for first in range(0, len(schedules), group):
        members = range(first, min(first + group, len(schedules)))
        caches = {i: new_caches() for i in members}
        for index in range(len(schedules[first])):
            recorded = step(index, members, caches, {i: torch.tensor(schedules[i][index][1]) for i in members})
            for i in members:
                outputs[i].append(recorded[i])
        for i in members:
            release(caches[i])
    return outputs
