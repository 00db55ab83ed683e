"""Sessions never outlive their coordinator: kill -9 of the coordinator with many streams
open, then a new incarnation of it under the same id. The stages drop the dead one's
sessions at once (not after their idle time), so the new coordinator serves within a
bounded time even though the dead one's sessions had filled every stage's session cap."""

import asyncio
import time

import pytest

from shard.client import generate
from shard.local import LocalSwarm
from shard.v1 import api_pb2, stage_pb2, stage_pb2_grpc
from shard.wire.tls import open_channel

from support.reference import reference_greedy

pytestmark = pytest.mark.slow

PROMPT = [1, 415, 1022, 264, 727]
STREAMS = 16  # also every stage's session cap: the dead coordinator's sessions fill it


def request(max_tokens: int, stop_at_eos: bool = True) -> api_pb2.GenerateRequest:
    return api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=max_tokens,
                                   stop_at_eos=stop_at_eos)


async def stage_infos(swarm: LocalSwarm) -> list[stage_pb2.InfoResponse]:
    tls = swarm.node_tls("coordinator")  # Info is for nodes, not clients
    infos = []
    for node_id in ("stage-0", "stage-1"):
        async with open_channel(swarm.address_of(node_id), tls) as channel:
            infos.append(await stage_pb2_grpc.StageServiceStub(channel).Info(stage_pb2.InfoRequest(), timeout=10))
    return infos


async def until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = await condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {seconds:.0f} s"
        await asyncio.sleep(0.2)


async def crash_mid_generation(swarm: LocalSwarm):
    tls = swarm.client_tls()
    await generate(swarm.coordinator_address, tls, request(2), wait_ready_seconds=60)
    streams = [asyncio.create_task(generate(swarm.coordinator_address, tls, request(400, stop_at_eos=False)))
               for _ in range(STREAMS)]

    async def every_stream_held():
        infos = await stage_infos(swarm)
        held = all(len(info.sessions) == STREAMS for info in infos) and sum(info.kv_bytes for info in infos)
        return held and infos

    before = await until(every_stream_held, 60, "every stream holds a session at every stage")
    dead = {s.session_id for s in before[0].sessions}
    assert not any(stream.done() for stream in streams), "a stream ended before the crash"
    await asyncio.to_thread(swarm.restart_coordinator)
    restarted = time.monotonic()
    outcomes = await asyncio.gather(*streams, return_exceptions=True)
    assert all(isinstance(outcome, Exception) for outcome in outcomes)  # their coordinator died

    served = await generate(swarm.coordinator_address, tls, request(40), wait_ready_seconds=30)
    served_after = time.monotonic() - restarted

    async def dead_sessions_freed():
        infos = await stage_infos(swarm)
        return all(info.kv_bytes == 0 and not info.sessions for info in infos) and infos

    after = await until(dead_sessions_freed, 30, "the dead coordinator's sessions freed")
    return dead, served, served_after, after


def test_a_restarted_coordinator_serves_and_the_dead_ones_sessions_are_freed(tinystories_dir, tmp_path):
    with LocalSwarm(tinystories_dir, 2, workdir=tmp_path, logs_to_files=True,
                    stage_args=[f"--max-sessions={STREAMS}"]) as swarm:
        dead, served, served_after, after = asyncio.run(crash_mid_generation(swarm))
    assert len(dead) == STREAMS
    assert list(served.summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, 40)
    assert served_after < 30
    # The default idle time is 300 s: these were freed because their coordinator was gone.
    assert all(info.kv_budget_bytes > 0 for info in after)
    print(f"\nthe new coordinator served {served_after:.1f} s after the crash")
