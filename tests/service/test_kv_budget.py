"""KV caches are accounted in bytes against each stage's memory budget: a session whose
KV would not fit fails alone with RESOURCE_EXHAUSTED, naming bytes, while another session
on the same stages streams on to the right answer and the bytes are freed at the end."""

import asyncio

import grpc
import pytest

from shard.client import generate
from shard.model.checkpoint import Checkpoint
from shard.v1 import api_pb2

from support.reference import reference_greedy
from support.swarm import inprocess_swarm

PROMPT = [1, 415, 1022, 264, 727]  # greedy TinyStories runs 155 tokens before its eos
KV_POSITIONS = 100  # about what each stage's budget leaves for KV (and kept outputs) beyond its weights


@pytest.fixture(scope="module")
def swarm(tinystories_dir, tmp_path_factory):
    checkpoint = Checkpoint.open(tinystories_dir)
    weights = max(checkpoint.block_bytes(0, 1, first=True, last=False),
                  checkpoint.block_bytes(1, 2, first=False, last=True))
    # K and V of 4 KV heads of 16 float32s (one layer a stage), and on the first stage the
    # 128 float32s of output it keeps for a replay: the most a position takes at any stage.
    bytes_per_position = 2 * 4 * 16 * 4 + 128 * 4
    budget = weights + KV_POSITIONS * bytes_per_position
    stage_args = [[f"--memory-budget={budget}", "--speed=1"]] * 2  # one layer each
    loop = asyncio.new_event_loop()
    context = inprocess_swarm(tinystories_dir, 2, tmp_path_factory.mktemp("swarm"), stage_args=stage_args)
    swarm = loop.run_until_complete(context.__aenter__())
    swarm.run = loop.run_until_complete
    yield swarm
    loop.run_until_complete(context.__aexit__(None, None, None))
    loop.close()


def test_a_session_over_the_kv_budget_fails_alone(swarm, tinystories_dir):
    infos = [stage.node.info() for stage in swarm.stages]
    positions = [info.kv_budget_bytes // stage.node.compute.kv.bytes_per_position
                 for info, stage in zip(infos, swarm.stages)]
    assert all(KV_POSITIONS <= p <= 2 * KV_POSITIONS for p in positions), positions
    too_long = [1] + [415] * (max(positions) + 10)  # its prompt alone fits no stage's KV
    tls = swarm.tls()
    plain = {"draft": "none", "max_tokens": 60}  # a token per traversal: it runs a while

    async def both():
        streaming = asyncio.Event()
        fits = asyncio.create_task(generate(
            swarm.coordinator.address, tls, api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), **plain),
            on_text=lambda _: streaming.set()))
        await streaming.wait()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generate(swarm.coordinator.address, tls, api_pb2.GenerateRequest(
                prompt_ids=api_pb2.TokenIds(ids=too_long), max_tokens=4))
        assert not fits.done(), "the session that fits ended before the other was refused"
        return refused.value, await fits

    refused, generation = swarm.run(both())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "bytes" in refused.details() and "budget" in refused.details()
    assert list(generation.summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, 60)

    async def drained():
        for _ in range(100):
            if not any(stage.node.info().kv_bytes for stage in swarm.stages):
                return True
            await asyncio.sleep(0.05)
        return False

    assert swarm.run(drained()), [stage.node.info() for stage in swarm.stages]


def kv_positions(swarm) -> int:
    """The most positions one session can hold at every stage, from the stages' own Info."""
    infos = [stage.node.info() for stage in swarm.stages]
    return min((info.kv_budget_bytes - info.kv_session_bytes) // info.kv_bytes_per_position for info in infos)


def test_generations_that_fit_alone_but_not_together_take_turns(swarm, tinystories_dir):
    """Each needs 60% of the stages' KV: the coordinator holds the second back until the
    first is through, rather than letting either fail half-way."""
    max_tokens = int(0.6 * kv_positions(swarm)) - len(PROMPT)
    request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=max_tokens, draft="none")
    loop_time = asyncio.get_running_loop

    async def timed():
        first_text = None

        def on_text(_):
            nonlocal first_text
            first_text = first_text or loop_time().time()

        generation = await generate(swarm.coordinator.address, swarm.tls(), request, on_text=on_text)
        return first_text, loop_time().time(), generation

    async def both():
        return await asyncio.gather(timed(), timed())

    (start_a, end_a, a), (start_b, end_b, b) = swarm.run(both())
    expected = reference_greedy(tinystories_dir, PROMPT, max_tokens)
    assert list(a.summary.output_ids) == list(b.summary.output_ids) == expected
    assert end_a <= start_b or end_b <= start_a, "both held more KV at once than the stages have"


def test_a_generation_no_stage_could_hold_is_refused_before_it_starts(swarm):
    request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), draft="none",
                                      max_tokens=kv_positions(swarm) + 10)
    streamed = []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        swarm.run(generate(swarm.coordinator.address, swarm.tls(), request, on_text=streamed.append))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "bytes" in refused.value.details() and "budget" in refused.value.details(), refused.value.details()
    assert not streamed
