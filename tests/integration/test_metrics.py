"""Prometheus metrics from every node (OpenTelemetry, --metrics-listen), scraped over HTTP
after a few real generations: the counters and histograms add up with the generations'
own summaries and the stages' Info."""

import asyncio
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from shard.client import Client, InvalidRequest
from shard.v1 import frame_pb2, stage_pb2_grpc
from shard.wire.certs import SECRET_FILE
from shard.wire.codec import encode_tensor
from shard.wire.seal import EdgeSealer, load_secret
from shard.wire.tls import open_channel

from support.swarm import inprocess_swarm

PROMPT = [1, 415, 1022, 264, 727]
METRICS = ["--metrics-listen", "127.0.0.1:0"]


async def push_forged_frame(swarm) -> grpc.StatusCode:
    """A frame sealed for the coordinator -> stage-0 edge, one payload bit flipped on the way."""
    header = frame_pb2.FrameHeader(session_id="forged", num_tokens=1, num_outputs=1,
                                   kind=frame_pb2.FRAME_KIND_FORWARD, sender="coordinator", receiver="stage-0",
                                   counter=1)
    sealer = EdgeSealer(load_secret(swarm.certs / SECRET_FILE), "coordinator", "stage-0")
    payload = bytearray(sealer.seal(header, encode_tensor(torch.tensor([1]))))
    payload[-1] ^= 1
    async with open_channel(swarm.stages[0].address, swarm.tls("coordinator")) as channel:
        call = stage_pb2_grpc.StageServiceStub(channel).Traverse(iter([frame_pb2.Frame(header=header,
                                                                                       payload=bytes(payload))]))
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def scrape(address: str) -> dict[str, list[tuple[dict, float]]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


@pytest.fixture(scope="module")
def measured(tinystories_dir, tmp_path_factory):
    """A swarm with metrics on every node, three generations (one speculative) and one
    refused request; then every node's scrape."""

    async def run():
        async with inprocess_swarm(tinystories_dir, 2, tmp_path_factory.mktemp("swarm"), stage_args=[METRICS] * 2,
                                   coordinator_args=METRICS, registry_args=METRICS) as swarm:
            generations = []
            async with Client(swarm.coordinator.address, credentials=swarm.certs) as client:
                for options in ({"draft": "none"}, {"draft": "ngram", "spec_k": 3}, {"prompt": "Once upon a time"}):
                    prompt = {"prompt_ids": PROMPT} if "prompt" not in options else {}
                    stream = client.astream(max_tokens=24, stop_at_eos=False, **prompt, **options)
                    deltas = [delta async for delta in stream]
                    generations.append((stream.summary, deltas))
                with pytest.raises(InvalidRequest):
                    await client.agenerate("", max_tokens=4)
            assert await push_forged_frame(swarm) == grpc.StatusCode.UNAUTHENTICATED
            nodes = [swarm.coordinator, *swarm.stages, swarm.registry]
            scrapes = await asyncio.gather(*(asyncio.to_thread(scrape, node.metrics_address) for node in nodes))
            infos = [stage.node.info() for stage in swarm.stages]
            return generations, scrapes, infos, len(swarm.registry.node.nodes)

    return asyncio.run(run())


def test_coordinator_counts_add_up_with_the_summaries(measured):
    generations, (coordinator, *_), _, _ = measured
    summaries = [summary for summary, _ in generations]
    assert value(coordinator, "shard_requests_total", outcome="ok") == 3
    assert value(coordinator, "shard_requests_total", outcome="INVALID_ARGUMENT") == 1
    assert value(coordinator, "gen_ai_server_request_duration_seconds_count") == 4
    assert value(coordinator, "gen_ai_server_request_duration_seconds_count", error_type="INVALID_ARGUMENT") == 1
    assert value(coordinator, "shard_tokens_total", gen_ai_token_type="output") == sum(s.tokens for s in summaries)
    assert value(coordinator, "shard_tokens_total", gen_ai_token_type="input") == \
        sum(len(s.prompt_ids) for s in summaries)
    for state, field in (("sent", "chunks_sent"), ("wasted", "chunks_wasted"), ("cancelled", "chunks_cancelled")):
        assert value(coordinator, "shard_chunks_total", state=state) == sum(getattr(s, field) for s in summaries)
    assert value(coordinator, "gen_ai_server_time_to_first_token_seconds_count") == 3
    # Every token after each generation's first batch has an inter-token latency.
    assert value(coordinator, "gen_ai_server_time_per_output_token_seconds_count") == \
        sum(s.tokens - len(deltas[0].ids) for s, deltas in generations)
    assert value(coordinator, "shard_tokens_per_traversal_count") == 3
    assert value(coordinator, "shard_tokens_per_traversal_sum") == pytest.approx(
        sum(s.tokens_per_traversal for s in summaries))
    speculative = [s for s in summaries if s.draft_tokens]
    assert value(coordinator, "shard_acceptance_count") == len(speculative) >= 1
    assert value(coordinator, "shard_acceptance_sum") == pytest.approx(sum(s.acceptance_rate for s in speculative))
    assert value(coordinator, "shard_generations_active") == value(coordinator, "shard_generations_queued") == 0
    assert value(coordinator, "shard_frames_refused_total") == 0
    # Every chunk whose result came back was timed: those used, and maybe some wasted ones.
    assert sum(s.traversals for s in summaries) <= value(coordinator, "shard_ring_round_trip_seconds_count") <= \
        sum(s.chunks_sent for s in summaries)
    assert value(coordinator, "shard_ring_round_trip_seconds_sum") > 0


def test_each_stage_reports_its_own_counts(measured):
    _, (_, *stages, _), infos, _ = measured
    assert value(stages[0], "shard_frames_refused_total", reason="forged") == 1  # the AEAD layer's refusal
    assert value(stages[1], "shard_frames_refused_total") == 0
    for scraped, info in zip(stages, infos):
        assert value(scraped, "shard_stage_frames_total", state="processed") == info.frames_processed > 0
        assert value(scraped, "shard_stage_positions_total", kind="computed") == info.positions_computed
        assert value(scraped, "shard_stage_kv_budget_bytes") == info.kv_budget_bytes > 0
        assert value(scraped, "shard_stage_kv_used_bytes") == info.kv_bytes
        assert value(scraped, "shard_stage_sessions") == len(info.sessions) == 0
        peers = {labels["peer"]: seconds for labels, seconds in scraped["shard_peer_round_trip_seconds"]}
        assert {"coordinator", "stage-0", "stage-1"} - {info.node_id} <= set(peers) and all(peers.values())
        [(labels, _)] = scraped["target_info"]
        assert (labels["service_name"], labels["service_instance_id"]) == ("shard-stage", info.node_id)


def test_registry_reports_its_members(measured):
    _, scrapes, _, members = measured
    assert value(scrapes[-1], "shard_registry_nodes") == members == 3
