"""Batch invariance of a block's forward, across the equivalence matrix's architectures:
each session's chunks give the same tokens alone and batched with 1, 3 or 7 other
sessions at other positions, with other chunk lengths, rolling back at other times; on
dynamic caches (the CPU path) and on a static block's batched pool (the GPU path, run
eagerly here)."""

import pytest
import torch

from shard.model.batch import Row, forward_batch
from shard.model.block import Block, CacheGapError
from shard.model.static_block import StaticBlock
from shard.model.synthetic import ARCHS

from support.groups import Schedule, run_in_groups, schedule

SESSIONS = 8
STEPS = 6


def run(blocks: list[Block], schedules: list[Schedule], group: int) -> list[list[list[int]]]:
    """Every session's tail ids per chunk (all positions), its sessions run `group` at a
    time: each step one batched forward per block for a chunk of every session of the group."""
    def step(index, members, caches, x):
        for b, block in enumerate(blocks):
            rows = [Row(caches[i][b], schedules[i][index][0], x[i], num_outputs=0) for i in members]
            x = dict(zip(members, forward_batch(block, rows)))
        return {i: x[i].tolist() for i in members}

    return run_in_groups(schedules, group, new_caches=lambda: [block.new_cache() for block in blocks], step=step)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokens_alone_equal_tokens_batched(tiny_model_dirs, arch):
    model_dir = tiny_model_dirs[arch]
    blocks = [Block.load(model_dir, 0, 2, progress=False), Block.load(model_dir, 2, 6, progress=False)]
    schedules = [schedule(seed, blocks[0].vocab_size, STEPS) for seed in range(SESSIONS)]
    alone = run(blocks, schedules, group=1)
    for group in (2, 4, 8):  # each session with 1, 3, 7 others
        assert run(blocks, schedules, group) == alone, f"{arch}: batches of {group} changed a session's tokens"


def run_static(blocks: list[Block], schedules: list[Schedule], group: int) -> list[list[list[int]]]:
    """As run(), on static blocks batching a pool of SESSIONS caches: every prompt alone in
    its own shape, the decode chunks of a group's sessions as one forward of the pool."""
    runners = [StaticBlock(block, capacity=64, chunk_sizes=(5, 32), pool_size=SESSIONS, batched=True)
               for block in blocks]

    def step(index, members, caches, x):
        for b, runner in enumerate(runners):
            if index == 0:  # the prompts: longer than the decode size, so each alone
                key = "input_ids" if b == 0 else "hidden"
                x = {i: runner.forward(caches[i][b], 0, **{key: x[i]}, num_outputs=0) for i in members}
            else:
                rows = [Row(caches[i][b], schedules[i][index][0], x[i], num_outputs=0) for i in members]
                x = dict(zip(members, runner.forward_rows(rows)))
        return {i: x[i].tolist() for i in members}

    def release(caches):
        for runner, cache in zip(runners, caches):
            runner.release(cache)

    return run_in_groups(schedules, group, new_caches=lambda: [runner.new_cache() for runner in runners],
                         step=step, release=release)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_pool_tokens_alone_equal_tokens_batched(tiny_model_dirs, arch):
    """Alone, a session runs in pool row 0 with every other row idle; in a group it runs
    in another row beside busy ones: the same tokens, and the dynamic path's."""
    model_dir = tiny_model_dirs[arch]
    blocks = [Block.load(model_dir, 0, 2, progress=False), Block.load(model_dir, 2, 6, progress=False)]
    schedules = [schedule(seed, blocks[0].vocab_size, STEPS) for seed in range(SESSIONS)]
    alone = run_static(blocks, schedules, group=1)
    for group in (2, 4, 8):
        assert run_static(blocks, schedules, group) == alone, f"{arch}: batches of {group} changed a session's tokens"
    assert alone == run(blocks, schedules, group=1), f"{arch}: the static pool's tokens differ from the dynamic path's"


def test_a_static_batch_refuses_what_it_cannot_run(tiny_model_dirs):
    block = Block.load(tiny_model_dirs["llama"], 0, 6, progress=False)
    runner = StaticBlock(block, capacity=16, chunk_sizes=(3, 8), pool_size=2, batched=True)
    a, b = runner.new_cache(), runner.new_cache()
    with pytest.raises(ValueError, match="at most 3 tokens"):
        runner.forward_rows([Row(a, 0, torch.tensor([1, 2, 3, 4]))])
    with pytest.raises(ValueError, match="one chunk per session"):
        runner.forward_rows([Row(a, 0, torch.tensor([1])), Row(a, 0, torch.tensor([2]))])
    with pytest.raises(CacheGapError):
        runner.forward_rows([Row(a, 0, torch.tensor([1])), Row(b, 2, torch.tensor([2]))])
    assert (a.length, b.length) == (0, 0)
    with pytest.raises(ValueError, match="at least one cache"):
        StaticBlock(block, capacity=16, chunk_sizes=(3,), batched=True)


def test_batched_rows_write_each_session_cache_alone(tiny_model_dirs):
    """After a batch each cache holds exactly its own session's positions, with the keys
    the session computed alone (padding never leaks into a cache)."""
    block = Block.load(tiny_model_dirs["llama"], 0, 3, progress=False)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([9, 8, 7, 6, 5, 4, 3])]
    alone = [block.new_cache() for _ in prompts]
    for cache, prompt in zip(alone, prompts):
        block.forward(cache, 0, input_ids=prompt)
    batched = [block.new_cache() for _ in prompts]
    forward_batch(block, [Row(cache, 0, prompt) for cache, prompt in zip(batched, prompts)])
    forward_batch(block, [Row(batched[0], 3, torch.tensor([1])), Row(batched[1], 5, torch.tensor([2, 3, 4]))])
    block.forward(alone[0], 3, input_ids=torch.tensor([1]))
    block.forward(alone[1], 5, input_ids=torch.tensor([2, 3, 4]))
    assert [block.cache_length(c) for c in batched] == [4, 8]
    for a, b in zip(alone, batched):
        for layer_a, layer_b in zip(a.layers, b.layers):
            torch.testing.assert_close(layer_b.keys, layer_a.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer_b.values, layer_a.values, rtol=1e-5, atol=1e-5)


def test_a_block_without_layers_batches_row_by_row(tiny_model_dirs):
    """The embedding-only and head-only blocks of a ring longer than the model count
    positions per session."""
    model_dir = tiny_model_dirs["llama"]
    embed = Block.load(model_dir, 0, 0, first=True, last=False, progress=False)
    caches = [embed.new_cache(), embed.new_cache()]
    out = forward_batch(embed, [Row(caches[0], 0, torch.tensor([1, 2])), Row(caches[1], 0, torch.tensor([3]))])
    assert [tuple(o.shape) for o in out] == [(2, embed.hidden_size), (1, embed.hidden_size)]
    assert [embed.cache_length(c) for c in caches] == [2, 1]
