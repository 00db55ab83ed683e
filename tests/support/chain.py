"""Blocks of one model chained in one process: the ring's computation without the wire,
and the decoding driver run over it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch

from shard.decode.speculative import Lookahead, decode
from shard.model.block import Block
from shard.model.static_block import StaticBlock
from shard.node.tail_sampling import ChunkSampling, choose_tokens


class LocalChain:
    def __init__(self, model_dir, bounds: list[tuple[int, int]], *, static: dict | None = None, positions: int = 0,
                 **load_kwargs):
        """`static` (StaticBlock's keyword arguments): run the blocks over static KV caches,
        of a session that said it would hold `positions` (0: unsaid)."""
        load_kwargs.setdefault("progress", False)
        last = len(bounds) - 1
        self.blocks = [Block.load(model_dir, start, end, first=i == 0, last=i == last, **load_kwargs)
                       for i, (start, end) in enumerate(bounds)]
        self.runners = [StaticBlock(block, **static) if static else block for block in self.blocks]
        self.caches = [runner.new_cache(positions=positions) for runner in self.runners]

    def __call__(self, start_pos: int, ids: list[int], num_outputs: int = 1, *, logits: bool = False):
        """One traversal: the tail's argmax ids for the chunk `ids` written at start_pos
        (with `logits`: the logits tensor of its last num_outputs positions)."""
        x = torch.tensor(ids, dtype=torch.int64)
        for block, runner, cache in zip(self.blocks, self.runners, self.caches):
            inputs = {"input_ids": x} if block.is_first else {"hidden": x}
            x = runner.forward(cache, start_pos, **inputs, num_outputs=num_outputs, logits=logits and block.is_last)
        return x if logits else x.tolist()

    def cache_lengths(self) -> list[int]:
        return [runner.cache_length(cache) for runner, cache in zip(self.runners, self.caches)]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Plain decoding: prefill the prompt as one chunk, then one token per traversal."""
        out = self(0, list(prompt_ids))
        while len(out) < max_new_tokens:
            out += self(len(prompt_ids) + len(out) - 1, out[-1:])
        return out


class ChainRing:
    """The driver's Ring over LocalChain; checks every chunk against the caches. With
    `sampling`, the tail's choice is the stage's own (shard.node.tail_sampling)."""

    def __init__(self, chain: LocalChain, sampling: ChunkSampling | None = None):
        self.chain, self.sampling = chain, sampling

    async def submit(self, *, start_pos, tokens, num_outputs, epoch, proposals=None):
        result = asyncio.get_running_loop().create_future()
        if self.sampling is None:
            result.set_result(self.chain(start_pos, tokens, num_outputs))
        else:
            logits = self.chain(start_pos, tokens, num_outputs, logits=True)
            sampling = replace(self.sampling, proposals=tuple(proposals or ()))
            result.set_result(choose_tokens(logits, sampling, start_pos + len(tokens) - num_outputs + 1))
        # Absolute positions: every stage cropped to start_pos, then wrote the chunk.
        assert self.chain.cache_lengths() == [start_pos + len(tokens)] * len(self.chain.blocks)
        return result

    async def cancel(self, epoch):
        return 0


class AlwaysAhead(Lookahead):
    """Keeps the window full whatever the draft's record: the hardest case for rollback."""

    def allows(self, depth: int, chunk_tokens: int) -> bool:
        return True

    def piece(self, wanted: int) -> int:
        return wanted


def run(chain, prompt, draft=None, sampling: ChunkSampling | None = None, **settings) -> tuple[list[int], object]:
    """Decode over the chain; with `sampling` (not greedy), by speculative sampling: the
    draft session's propose_sampled draws the guesses."""
    emitted = []

    async def emit(ids, logprobs):
        emitted.extend(ids)

    sampled = sampling is not None and not sampling.params.greedy
    propose = None
    if sampled and draft is not None:
        async def propose(sequence, n):
            return draft.propose_sampled(sequence, n, sampling.params)
    stats = asyncio.run(decode(ChainRing(chain, sampling), prompt, emit=emit, draft=draft, propose=propose,
                               sampled=sampled, **settings))
    assert emitted == stats.output_ids
    return emitted, stats
