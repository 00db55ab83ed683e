"""Hostile and heavy input on a real in-process swarm with mTLS: over-limit prompts are
refused before any work while other users' streams go on, malformed bytes get
INVALID_ARGUMENT without a traceback, a burst waits in a bounded queue and the rest is
refused with a retry hint, and a cancelled stream leaves nothing behind."""

import asyncio
import gc
import logging
import time

import grpc
import pytest

from shard.v1 import api_pb2, api_pb2_grpc, stage_pb2, stage_pb2_grpc
from shard.wire.tls import open_channel

from support.reference import reference_greedy
from support.swarm import inprocess_swarm

CONTEXT = 512  # tinystories' max_position_embeddings
MAX_PROMPT_CHARS = 262144  # the coordinator's default --max-prompt-chars
PROMPT_IDS = [1, 450, 1731, 338, 263]
# Room for two generations at once and one waiting, for at most a second.
COORDINATOR_ARGS = ["--max-concurrent", "2", "--max-queued", "1", "--queue-timeout", "1"]


@pytest.fixture(scope="module")
def swarm(tinystories_dir, tmp_path_factory):
    loop = asyncio.new_event_loop()
    context = inprocess_swarm(tinystories_dir, 2, tmp_path_factory.mktemp("swarm"),
                              coordinator_args=COORDINATOR_ARGS)
    swarm = loop.run_until_complete(context.__aenter__())
    swarm.run = loop.run_until_complete
    yield swarm
    loop.run_until_complete(context.__aexit__(None, None, None))
    loop.close()


def long_request() -> api_pb2.GenerateRequest:
    """One token per traversal to the end of the context: a stream that lasts."""
    return api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT_IDS), max_tokens=CONTEXT - len(PROMPT_IDS),
                                   stop_at_eos=False, draft="none")


def assert_reference(model_dir, ids: list[int]) -> None:
    """The model's own greedy output; it stops at its EOS token, where a long_request() goes on."""
    reference = reference_greedy(model_dir, PROMPT_IDS, CONTEXT - len(PROMPT_IDS))
    assert len(ids) == CONTEXT - len(PROMPT_IDS) and ids[:len(reference)] == reference


async def collect(stub, request) -> list[int]:
    ids = []
    async for response in stub.Generate(request):
        ids += response.delta.ids
    return ids


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value


def no_tracebacks_or_errors(caplog) -> None:
    assert "Traceback" not in caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


def test_over_limit_prompts_are_refused_at_once_while_another_stream_goes_on(swarm, tinystories_dir):
    async def scenario():
        async with open_channel(swarm.coordinator.address, swarm.tls()) as channel:
            stub = api_pb2_grpc.InferenceServiceStub(channel)
            other = stub.Generate(long_request())
            first = await other.read()
            refused = []
            # Over the character limit; over the request byte limit (8 MiB froze the
            # coordinator for 11 s when it was tokenized on the event loop).
            for prompt in ("x" * (MAX_PROMPT_CHARS + 1), "x" * (8 << 20)):
                began = time.perf_counter()
                error = await refusal(stub.Generate(api_pb2.GenerateRequest(prompt=prompt, max_tokens=8)))
                refused.append((error.code(), error.details(), time.perf_counter() - began))
            ids = list(first.delta.ids)
            while (response := await other.read()) != grpc.aio.EOF:
                ids += response.delta.ids
            return refused, ids

    refused, ids = swarm.run(scenario())
    (chars_code, chars_details, chars_seconds), (bytes_code, bytes_details, bytes_seconds) = refused
    assert chars_code == bytes_code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_PROMPT_CHARS}" in chars_details and "characters" in chars_details
    assert "bytes" in bytes_details and "Generate takes at most" in bytes_details
    assert chars_seconds < 2.0 and bytes_seconds < 2.0  # generous: tokenizing took 11 s
    assert_reference(tinystories_dir, ids)


MALFORMED = {
    # prompt (field 1) holding bytes that are not UTF-8, then max_tokens 8
    "prompt not UTF-8": b"\x0a\x03\xff\xfe\xfd\x20\x08",
    # chat > message > content holding a lone continuation byte
    "chat not UTF-8": b"\x12\x0b\x0a\x09\x0a\x04user\x12\x01\x80" + b"\x20\x08",
    "length past the end": b"\x0a\x10abc",
    "field number 0": b"\x00\x01\x02\x03garbage",
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bytes_are_invalid_argument_without_a_traceback(swarm, payload, caplog):
    async def send_raw():
        async with open_channel(swarm.coordinator.address, swarm.tls()) as channel:
            generate = channel.unary_stream("/shard.v1.InferenceService/Generate")
            return await refusal(generate(payload))

    error = swarm.run(send_raw())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in error.details()
    no_tracebacks_or_errors(caplog)


async def wait_for_status(stub, condition, seconds: float = 10.0) -> api_pb2.GetStatusResponse:
    deadline = time.monotonic() + seconds
    while not condition(status := await stub.GetStatus(api_pb2.GetStatusRequest())):
        assert time.monotonic() < deadline, f"status never came: {status}"
        await asyncio.sleep(0.01)
    return status


def test_a_burst_waits_in_the_queue_then_is_refused_with_a_retry_hint(swarm, tinystories_dir):
    short = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT_IDS), max_tokens=4)

    async def scenario():
        async with open_channel(swarm.coordinator.address, swarm.tls()) as channel:
            stub = api_pb2_grpc.InferenceServiceStub(channel)
            runners = [asyncio.ensure_future(collect(stub, long_request())) for _ in range(2)]
            await wait_for_status(stub, lambda s: s.active_generations == 2)
            waiting_call = stub.Generate(short)
            waiting = asyncio.ensure_future(refusal(waiting_call))
            status = await wait_for_status(stub, lambda s: s.queued_generations == 1)
            full = await refusal(stub.Generate(short))  # the queue is full: refused at once
            waited = await waiting
            outputs = await asyncio.gather(*runners)
            after = await wait_for_status(stub, lambda s: s.active_generations == 0)
            return status, full, waited, await waiting_call.trailing_metadata(), outputs, after

    status, full, waited, waited_trailers, outputs, after = swarm.run(scenario())
    assert (status.active_generations, status.queued_generations) == (2, 1)
    for error, trailers in ((full, full.trailing_metadata()), (waited, waited_trailers)):
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after 1000 ms" in error.details()
        assert dict(trailers)["retry-after-ms"] == "1000"
    assert "busy" in full.details()
    assert "within 1 s in the admission queue" in waited.details()
    for ids in outputs:
        assert_reference(tinystories_dir, ids)
    assert after.queued_generations == 0


def test_a_cancelled_stream_is_closed_cleanly(swarm, caplog):
    async def stage_sessions() -> list[str]:
        sessions = []
        for stage in swarm.stages:
            async with open_channel(stage.address, swarm.tls("coordinator")) as channel:
                info = await stage_pb2_grpc.StageServiceStub(channel).Info(stage_pb2.InfoRequest())
                sessions += [s.session_id for s in info.sessions]
        return sessions

    async def scenario():
        async with open_channel(swarm.coordinator.address, swarm.tls()) as channel:
            stub = api_pb2_grpc.InferenceServiceStub(channel)
            call = stub.Generate(long_request())
            await call.read()
            during = await stage_sessions()
            call.cancel()
            await wait_for_status(stub, lambda s: s.active_generations == 0)
        deadline = time.monotonic() + 10.0
        while (after := await stage_sessions()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        gc.collect()  # a task dropped while pending is reported when it is collected
        await asyncio.sleep(0.1)
        return during, after

    during, after = swarm.run(scenario())
    assert len(set(during)) == 1 and after == []  # one session, on every stage that holds it
    assert "Task was destroyed" not in caplog.text
    no_tracebacks_or_errors(caplog)
