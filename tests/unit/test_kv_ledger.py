"""The coordinator's ledger of the stages' KV: room held per generation, by bytes and by
session count, at every stage; waiting until there is room, refusing what never fits."""

import asyncio

import grpc
import pytest

from shard.errors import ShardError
from shard.node.kv_ledger import KVLedger, StageKV

GROWING = StageKV("stage-0", budget_bytes=1000, session_bytes=0, bytes_per_position=10, session_positions=0,
                  max_sessions=8)
STATIC = StageKV("stage-1", budget_bytes=1000, session_bytes=400, bytes_per_position=1, session_positions=64,
                 max_sessions=2)


def test_room_is_counted_at_every_stage_in_bytes_and_sessions():
    async def scenario():
        ledger = KVLedger()
        await ledger.follow(("ring",), [GROWING, STATIC])
        async with ledger.hold(40, timeout=1):  # 400 bytes at stage-0, 440 at stage-1
            assert ledger.fits(50) and not ledger.fits(61)  # stage-0: 400 + 610 > 1000
            async with ledger.hold(50, timeout=1):
                assert not ledger.fits(1)  # stage-1 holds its 2 sessions
            assert ledger.fits(50)
        return ledger.held_positions

    assert asyncio.run(scenario()) == []


def test_a_generation_waits_for_room_and_gives_up_with_a_retry_hint():
    async def scenario():
        ledger = KVLedger()
        await ledger.follow(("ring",), [GROWING])
        order = []

        async def generation(name, positions, seconds, timeout=5.0):
            async with ledger.hold(positions, timeout):
                order.append(name)
                await asyncio.sleep(seconds)

        await asyncio.gather(generation("first", 60, 0.2), generation("second", 60, 0.0))
        async with ledger.hold(90, timeout=1):
            with pytest.raises(ShardError) as timed_out:
                await generation("third", 20, 0.0, timeout=0.1)
        return order, timed_out.value

    order, timed_out = asyncio.run(scenario())
    assert order == ["first", "second"]
    assert timed_out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and timed_out.retry_after_ms > 0


def test_what_no_stage_could_ever_hold_is_refused_at_once_and_says_why():
    ledger = KVLedger()
    asyncio.run(ledger.follow(("ring",), [GROWING, STATIC]))
    for positions, words in ((101, "over its KV budget of 1000 bytes"), (65, "the 64 positions a session may hold on stage-1")):
        with pytest.raises(ShardError) as refused:
            ledger.check(positions)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and words in str(refused.value)
        assert not refused.value.retry_after_ms
    ledger.check(64)


def test_a_new_ring_wakes_the_generations_waiting():
    async def scenario():
        ledger = KVLedger()
        await ledger.follow(("small",), [GROWING])
        async with ledger.hold(90, timeout=1):
            held = ledger.hold(50, timeout=5)
            waiting = asyncio.create_task(held.__aenter__())
            await asyncio.sleep(0.05)
            assert not waiting.done() and ledger.waiting == 1
            await ledger.follow(("bigger",), [StageKV("stage-9", 10_000, 0, 10, 0, 8)])
            await asyncio.wait_for(waiting, 1)
        positions = ledger.held_positions
        await held.__aexit__(None, None, None)
        return positions, ledger.held_positions

    assert asyncio.run(scenario()) == ([50], [])
