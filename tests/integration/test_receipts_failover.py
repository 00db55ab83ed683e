"""A receipt across a fail-over: the middle stage of three is killed with SIGKILL while a
generation that asked for a receipt runs; a spare takes its block and the session is
replayed into it. The receipt verifies, names the lost stage as unattested, and shows the
spare's attestation with the replayed frames; the output is still transformers' own."""

import asyncio
import json
import time

import pytest

from shard import receipt as receipts
from shard.client import generate
from shard.local import LocalSwarm
from shard.v1 import api_pb2
from shard.wire import certs

from support.reference import reference_greedy

pytestmark = pytest.mark.slow

PROMPT = [1, 415, 1022, 264, 727]


async def generate_while_killing(swarm: LocalSwarm, victim: str):
    tls = swarm.client_tls()
    warm = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=2)
    await generate(swarm.coordinator_address, tls, warm, wait_ready_seconds=60)
    request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=300, receipt=True)
    task = asyncio.create_task(generate(swarm.coordinator_address, tls, request))
    await asyncio.sleep(0.3)
    assert not task.done(), "the generation ended before the kill"
    swarm.kill(victim)
    return await task


def test_a_receipt_across_a_killed_stage_verifies_and_shows_the_replacement(tinystories_dir, tmp_path):
    with LocalSwarm(tinystories_dir, 3, spares=1, workdir=tmp_path, logs_to_files=True) as swarm:
        started = time.monotonic()
        generation = asyncio.run(generate_while_killing(swarm, "stage-1"))
        ca_pem = (swarm.certs / certs.CA_CERT).read_bytes()
    summary = generation.summary
    assert list(summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, 300)
    assert summary.replays >= 1
    verified = receipts.verify(json.loads(summary.receipt), ca_pem)
    envelope = verified.envelope
    assert list(verified.lost) == ["stage-1"] and verified.lost["stage-1"].startswith("UNAVAILABLE")
    # The registry orders the ring by round trips: the spare takes stage-1's place, wherever it was.
    before, after = ([entry["node_id"] for entry in layout] for layout in (envelope["layouts"][0],
                                                                           envelope["layouts"][-1]))
    assert after == [node_id if node_id != "stage-1" else "stage-3" for node_id in before]
    place = before.index("stage-1")
    upstream = before[place - 1] if place else envelope["node_id"]
    spare = verified.stages["stage-3"]
    assert spare["received"][upstream]["kinds"].get("REPLAY", 0) >= 1  # the session replayed into it
    lost_block = envelope["layouts"][0][place]
    assert (spare["block"]["layer_start"], spare["block"]["layer_end"]) == (
        lost_block["layer_start"], lost_block["layer_end"])
    assert (upstream, "stage-1") in verified.unchecked_edges and verified.checked_edges >= 4
    lines = receipts.summary(verified)
    assert any(line.strip().startswith("LOST stage-1") for line in lines)
    print(f"\nreceipt across a fail-over ({time.monotonic() - started:.1f} s):\n" + "\n".join(lines))
