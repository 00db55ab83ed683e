"""Stages on a CUDA device (run on a GPU machine: `pytest -m gpu tests/gpu`): CUDA-graph
replay gives the eager static path's exact bytes under random rollbacks; float32 stage
processes reproduce one-process generate(); in bf16, speculative and pipelined decoding
emit exactly the same swarm's plain decode; a batched pool (--static-batch) gives each
session the bytes it gets alone."""

import asyncio
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from shard.bench.gpu_stage import stage_chunk_benchmark
from shard.client import generate
from shard.local import LocalSwarm
from shard.model.batch import Row
from shard.model.block import Block
from shard.model.checkpoint import Checkpoint
from shard.model.static_block import StaticBlock
from shard.v1 import api_pb2

from support.groups import Schedule, run_in_groups, schedule

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = [1, 415, 1022, 264, 727]  # TinyStories ids; folded into a smaller vocabulary by prompt()
NEW = 48
SIZES = (5, 16)


def prompt(model_dir) -> list[int]:
    vocab = Checkpoint.open(model_dir).vocab_size
    return [token % vocab for token in PROMPT]


def static_blocks(model_dir, dtype, *, graphs: bool) -> list[StaticBlock]:
    """First, middle and last blocks of a 6-layer model (two layers each), or of the
    2-layer TinyStories (one layer each, the last with the head)."""
    layers = Checkpoint.open(model_dir).num_layers
    cuts = [0, 2, 4, 6] if layers == 6 else [0, 1, 2]
    runners = []
    for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
        block = Block.load(model_dir, start, end, first=i == 0, last=end == layers, device="cuda", dtype=dtype,
                           progress=False)
        # 512 positions: the decode size graphed over the 256-slot extent and the whole cache.
        runner = StaticBlock(block, capacity=512, chunk_sizes=SIZES, pool_size=1 if graphs else 0)
        runner.capture()
        assert runner.graphed == graphs
        runners.append(runner)
    return runners


@pytest.mark.parametrize("positions", [0, 256])  # the session's extent: the whole cache, 256 slots
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "tinystories"])
def test_graph_replay_is_bitwise_eager_under_forced_rejections(tiny_model_dirs, tinystories_dir, arch, dtype,
                                                               positions):
    model_dir = tinystories_dir if arch == "tinystories" else tiny_model_dirs[arch]
    graphed, eager = static_blocks(model_dir, dtype, graphs=True), static_blocks(model_dir, dtype, graphs=False)
    chains = [(runners, [r.new_cache(positions=positions) for r in runners]) for runners in (graphed, eager)]
    vocab = graphed[0].block.vocab_size
    rng = random.Random(0)

    def traverse(start_pos: int, ids: list[int]) -> list[torch.Tensor]:
        results = []
        for runners, caches in chains:
            x, outs = torch.tensor(ids), []
            for runner, cache in zip(runners, caches):
                inputs = {"input_ids": x} if runner.block.is_first else {"hidden": x}
                x = runner.forward(cache, start_pos, **inputs, num_outputs=0).clone()
                outs.append(x)
            results.append(outs)
        for stage, (g, e) in enumerate(zip(*results)):
            assert torch.equal(g, e), f"stage {stage} differs at start_pos {start_pos}, chunk {ids}"
        return results[0]

    length = len(PROMPT)
    traverse(0, prompt(model_dir))
    for _ in range(80):
        # Roll back up to 6 positions (rejected guesses), then a chunk of 1..9 tokens (9: the 16 shape).
        start = rng.randint(max(1, length - 6), length)
        n = rng.choice([1, 1, 2, 5, 5, 9])
        if start + n > 256:
            break
        traverse(start, [rng.randrange(vocab) for _ in range(n)])
        length = start + n
    assert all(c.length == length for _, caches in chains for c in caches)


def _generate(swarm: LocalSwarm, **fields) -> list[int]:
    request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=prompt(swarm.model_dir)), max_tokens=NEW,
                                      **fields)
    generation = asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request,
                                      wait_ready_seconds=300))
    return list(generation.summary.output_ids)


def _settings(model_dir) -> dict[str, dict]:
    target = str(model_dir)
    return {"plain": dict(draft="none"), "speculative": dict(draft=target, spec_k=4, in_flight=1),
            "pipelined": dict(draft=target, spec_k=4, in_flight=4), "ngram": dict(draft="ngram", spec_k=4, in_flight=4)}


def _one_process_generate(model_dir, dtype) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda").eval()
    ids = torch.tensor([prompt(model_dir)], device="cuda")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "tinystories"])
def test_float32_graphed_stages_equal_one_process_generate(tiny_model_dirs, tinystories_dir, arch, tmp_path):
    model_dir = tinystories_dir if arch == "tinystories" else tiny_model_dirs[arch]
    expected = _one_process_generate(model_dir, torch.float32)
    with LocalSwarm(model_dir, 2, workdir=tmp_path, dtype="float32", device="cuda", logs_to_files=True,
                    coordinator_args=[f"--draft={model_dir}", "--draft=ngram"]) as swarm:
        got = {name: _generate(swarm, **fields) for name, fields in _settings(model_dir).items()}
    assert "captured" in (tmp_path / "stage-0.log").read_text()  # the stages really ran graphs
    for name, ids in got.items():
        assert ids == expected, name


@pytest.mark.slow
@pytest.mark.parametrize("batch", [0, 4])
@pytest.mark.parametrize("arch", ["llama", "tinystories"])
def test_bfloat16_speculation_equals_the_same_swarms_plain_decode(tiny_model_dirs, tinystories_dir, arch, batch,
                                                                  tmp_path):
    """With one chunk size, K+1, every position of every chunk runs in one shape (with
    --static-batch, the batched pool's)."""
    model_dir = tinystories_dir if arch == "tinystories" else tiny_model_dirs[arch]
    with LocalSwarm(model_dir, 2, workdir=tmp_path, dtype="bfloat16", device="cuda", logs_to_files=True,
                    stage_args=["--chunk-sizes=5", f"--static-batch={batch}"],
                    coordinator_args=[f"--draft={model_dir}", "--draft=ngram"]) as swarm:
        got = {name: _generate(swarm, **fields) for name, fields in _settings(model_dir).items()}
    for name, ids in got.items():
        assert ids == got["plain"], name


def test_stage_chunk_benchmark_reports_graph_and_eager():
    from transformers import AutoConfig

    small = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                                 max_position_embeddings=4096)
    result = stage_chunk_benchmark(layers=4, config=small, repeats=5, warmup=2, capacity=1024, context=128)
    assert result["graph_identical_to_eager"]
    assert result["static_graphed_ms"] > 0 and result["static_eager_ms"] > 0 and result["dynamic_eager_ms"] > 0
    assert result["memory"]["max_memory_allocated"] >= result["weight_bytes"]


POOL = 8


def _batched_runs(runners: list[StaticBlock], group: int, schedules: list[Schedule]) -> list[list]:
    """Every block's output bytes per session and chunk, the sessions run `group` at a time:
    prompts alone, the decode chunks of a group as one replay of the batched graph."""
    def step(index, members, caches, x):
        outs = {i: [] for i in members}
        for b, runner in enumerate(runners):
            if index == 0:
                key = "input_ids" if b == 0 else "hidden"
                x = {i: runner.forward(caches[i][b], 0, **{key: x[i]}, num_outputs=0).clone() for i in members}
            else:
                rows = [Row(caches[i][b], schedules[i][index][0], x[i], num_outputs=0) for i in members]
                x = {i: out.clone() for i, out in zip(members, runner.forward_rows(rows))}
            for i in members:
                outs[i].append(x[i])
        return outs

    def release(caches):
        for runner, cache in zip(runners, caches):
            runner.release(cache)

    return run_in_groups(schedules, group, new_caches=lambda: [runner.new_cache() for runner in runners],
                         step=step, release=release)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_bfloat16_batched_graph_gives_each_session_its_bytes_alone(tiny_model_dirs, arch):
    """Compiled and graphed, in bf16: each of 8 sessions' outputs at every block, alone
    and batched with 1, 3 or 7 others (other positions, chunk lengths, rollbacks), are the
    same bytes."""
    model_dir = tiny_model_dirs[arch]
    runners = []
    for start, end in ((0, 3), (3, 6)):
        block = Block.load(model_dir, start, end, first=start == 0, last=end == 6, device="cuda",
                           dtype=torch.bfloat16, progress=False)
        runner = StaticBlock(block, capacity=128, chunk_sizes=SIZES, pool_size=POOL, compiled=True, batched=True)
        runner.capture()
        assert runner.graphed
        runners.append(runner)
    steps = [schedule(seed, runners[0].block.vocab_size, 12, longest=SIZES[0]) for seed in range(POOL)]
    alone = _batched_runs(runners, 1, steps)
    for group in (2, 4, 8):
        batched = _batched_runs(runners, group, steps)
        for session, (a, b) in enumerate(zip(alone, batched)):
            assert all(torch.equal(x, y) for chunk_a, chunk_b in zip(a, b) for x, y in zip(chunk_a, chunk_b)), \
                f"{arch}: session {session} in groups of {group}"
