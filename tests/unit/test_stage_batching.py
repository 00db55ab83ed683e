"""A stage's compute thread batches the verify chunks of different sessions that wait for
it together, and still answers each frame on its own: the same ids as alone, one frame's
error or cancelled epoch costing only that frame, a session's own frames in order."""

import asyncio
import threading

import grpc
import torch

from shard.model.block import Block
from shard.node.stage_compute import AT_ONCE_MAX_TOKENS, BlockSpec, ForwardStep, KVLayout, StageCompute
from shard.v1 import frame_pb2
from shard.wire.codec import decode_tensor, encode_tensor, parse_tensor

K = frame_pb2


def frame(session: str, start_pos: int, tokens: list[int], epoch: int = 0):
    header = K.FrameHeader(session_id=session, start_pos=start_pos, num_tokens=len(tokens), num_outputs=1,
                           epoch=epoch, kind=K.FRAME_KIND_FORWARD)
    return header, ForwardStep(parse_tensor(encode_tensor(torch.tensor(tokens))))


def start_compute(model_dir, max_batch: int = 16, kv_layout: KVLayout = KVLayout()
                  ) -> tuple[StageCompute, list[K.Frame]]:
    sent: list[K.Frame] = []
    compute = StageCompute("stage-0", model_dir=str(model_dir), device="cpu", dtype=torch.float32,
                           memory_budget_bytes=1 << 30, max_sessions=64, session_idle_seconds=60,
                           progress=False, send=sent.append, call_on_loop=lambda fn, *args: fn(*args),
                           max_batch=max_batch, kv_layout=kv_layout)
    asyncio.run(compute.load(BlockSpec(0, 6, first=True, last=True)))
    return compute, sent


def run_queued(compute: StageCompute, frames, *, cancel: tuple[str, int] | None = None) -> None:
    """Queue every frame while the compute thread is held, so that they wait together."""
    gate, done = threading.Event(), threading.Semaphore(0)
    compute._thread.post(gate.wait)
    for header, body in frames:
        compute.submit(header, body, lambda header: done.release())
    if cancel:
        compute.cancel_epoch(*cancel)
    gate.set()
    for _ in frames:
        assert done.acquire(timeout=30)


def alone(model_dir, chunks: list[tuple[int, list[int]]]) -> list[int]:
    """A session's argmax per chunk, run by the block alone."""
    block = Block.load(model_dir, 0, 6, progress=False)
    cache = block.new_cache()
    return [int(block.forward(cache, start, input_ids=torch.tensor(tokens))[0]) for start, tokens in chunks]


def answered_as_alone(model_dir, sessions: dict[str, list[tuple[int, list[int]]]],
                      sent: list[K.Frame]) -> dict[str, list[K.Frame]]:
    """The frames sent, by session, after checking that each of `sessions` got one RESULT
    per chunk with the ids its chunks give alone."""
    results = {}
    for out in sent:
        results.setdefault(out.header.session_id, []).append(out)
    for session, chunks in sessions.items():
        assert [out.header.kind for out in results[session]] == [K.FRAME_KIND_RESULT] * len(chunks)
        assert [int(decode_tensor(out.payload)[0]) for out in results[session]] == alone(model_dir, chunks)
    return results


def test_waiting_chunks_of_sessions_run_as_one_forward_and_answer_alone(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    compute, sent = start_compute(model_dir, max_batch=16)
    try:
        sessions = {"a": [(0, [3, 1, 4, 1, 5]), (5, [9])], "b": [(0, [2, 7])], "f": [(0, [6] * 11), (11, [8, 8])]}
        frames = [frame("a", *sessions["a"][0]), frame("b", *sessions["b"][0]),
                  frame("a", *sessions["a"][1]),  # a's second chunk: after its first, in the next forward
                  frame("gap", 5, [1]),  # no such session to continue: fails alone
                  frame("stale", 0, [1, 2], epoch=0),  # its epoch is cancelled below: dropped
                  frame("vocab", 0, [1, 10**6]),  # out of the vocabulary: fails alone
                  frame("f", *sessions["f"][0]), frame("f", *sessions["f"][1])]
        run_queued(compute, frames, cancel=("stale", 1))
        results = answered_as_alone(model_dir, sessions, sent)
        for session, code in (("gap", grpc.StatusCode.FAILED_PRECONDITION),
                              ("vocab", grpc.StatusCode.INVALID_ARGUMENT)):
            [out] = results[session]
            assert out.header.kind == K.FRAME_KIND_ERROR
            assert K.ErrorDetail.FromString(out.payload).code == code.value[0]
        assert "stale" not in results and compute.frames_dropped_stale == 1
        # a, b and f's first chunks in one forward; then a's and f's second chunks in another.
        assert (compute.frames_batched, compute.largest_batch, compute.frames_processed) == (5, 3, 5)
        assert compute.forwards == 2
        assert [compute.kv.get(s).positions for s in sessions] == [6, 2, 13]
        assert compute.kv.get("vocab") is None and compute.kv.get("gap") is None
    finally:
        compute.close()


def test_a_lone_sessions_chunk_runs_at_once_and_others_go_to_the_thread(tiny_model_dirs):
    """Nothing to batch with (the thread idle, no other session here): a verify chunk runs
    on the caller, the event loop in a stage. A prompt, a second session's chunk, or any
    behind a busy thread, goes to the compute thread, where chunks batch."""
    compute, sent = start_compute(tiny_model_dirs["llama"])
    ran_on: list[str] = []
    compute._send = lambda out: (ran_on.append(threading.current_thread().name), sent.append(out))
    done = threading.Semaphore(0)
    try:
        for start, tokens in [(0, [3, 1, 4]), (3, [1])]:
            compute.submit(*frame("a", start, tokens), lambda header: done.release())
            assert len(sent) == len(ran_on) and ran_on[-1] == threading.current_thread().name
        prompt = [i % 50 for i in range(AT_ONCE_MAX_TOKENS + 1)]
        compute.submit(*frame("a", 4, prompt), lambda header: done.release())
        compute.submit(*frame("b", 0, [2, 7]), lambda header: done.release())
        for _ in range(4):
            assert done.acquire(timeout=30)
        assert ran_on[-2:] == ["stage-0-compute"] * 2
        compute.submit(*frame("a", 21, [5]), lambda header: done.release())  # two sessions here now
        assert done.acquire(timeout=30) and ran_on[-1] == "stage-0-compute"
        assert compute._thread.idle()
        answered_as_alone(tiny_model_dirs["llama"], {"a": [(0, [3, 1, 4]), (3, [1]), (4, prompt), (21, [5])],
                                                     "b": [(0, [2, 7])]}, sent)
    finally:
        compute.close()


def test_max_batch_one_runs_chunks_one_at_a_time(tiny_model_dirs):
    compute, sent = start_compute(tiny_model_dirs["llama"], max_batch=1)
    try:
        run_queued(compute, [frame(s, 0, [1, 2, 3]) for s in "abcd"])
        assert len(sent) == 4 and compute.frames_processed == 4
        assert (compute.frames_batched, compute.largest_batch, compute.forwards) == (0, 0, 4)
    finally:
        compute.close()


def test_a_deep_window_does_not_starve_another_session(tiny_model_dirs):
    """A long session's four pipelined chunks queued before a short session's one: each
    forward takes one chunk per session, so the short one is answered in the first."""
    compute, sent = start_compute(tiny_model_dirs["llama"], max_batch=16)
    try:
        long_chunks = [frame("long", 0, [5] * 8)] + [frame("long", 8 + i, [7]) for i in range(3)]
        run_queued(compute, [*long_chunks, frame("short", 0, [1, 2])])
        assert [(out.header.session_id, out.header.start_pos) for out in sent] == [
            ("long", 0), ("short", 0), ("long", 8), ("long", 9), ("long", 10)]
        assert compute.largest_batch == 2
    finally:
        compute.close()


def test_a_static_stage_batches_decode_chunks_over_its_pool(tiny_model_dirs):
    """--kv static --static-batch 4: decode-size chunks of different sessions run as one
    forward of the pool, a prompt longer than the decode size alone, each answered as
    alone; the pool is the most sessions the stage holds."""
    model_dir = tiny_model_dirs["llama"]
    layout = KVLayout(static=True, session_positions=64, chunk_sizes=(5, 16), batch=4)
    compute, sent = start_compute(model_dir, kv_layout=layout)
    try:
        sessions = {"a": [(0, [3, 1, 4, 1, 5]), (5, [9])], "b": [(0, [2, 7])], "f": [(0, [6] * 11), (11, [8, 8])]}
        frames = [frame("a", *sessions["a"][0]), frame("b", *sessions["b"][0]), frame("f", *sessions["f"][0]),
                  frame("gap", 5, [1]),  # no such session to continue: fails alone
                  frame("a", *sessions["a"][1]), frame("f", *sessions["f"][1])]
        run_queued(compute, frames)
        results = answered_as_alone(model_dir, sessions, sent)
        [gap] = results["gap"]
        assert K.ErrorDetail.FromString(gap.payload).code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        # a and b's prompts in one forward, f's 11 tokens alone, then a's and f's next chunks together.
        assert (compute.forwards, compute.frames_batched, compute.largest_batch) == (3, 4, 2)
        run_queued(compute, [frame(s, 0, [1, 2]) for s in "cde"])  # room for one more: the pool holds 4
        codes = {out.header.session_id: out.header.kind for out in sent[-3:]}
        assert sorted(codes.values()) == [K.FRAME_KIND_RESULT, K.FRAME_KIND_ERROR, K.FRAME_KIND_ERROR]
        refusal = K.ErrorDetail.FromString(next(out.payload for out in sent[-3:] if out.header.kind == K.FRAME_KIND_ERROR))
        assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "holds 4 sessions" in refusal.message
    finally:
        compute.close()


def test_static_batch_settings_are_checked(tiny_model_dirs):
    import pytest

    from services.stage.main import _kv_layout
    from shard.config import ConfigError, StageConfig

    def config(**fields) -> StageConfig:
        return StageConfig(model=str(tiny_model_dirs["llama"]), registry="127.0.0.1:7000", insecure=True, **fields)

    with pytest.raises(ConfigError, match="--static-batch must be at least 0"):
        config(static_batch=-1)
    with pytest.raises(ConfigError, match="needs --kv static"):
        _kv_layout(config(static_batch=4, kv="dynamic"), "cpu")
    assert _kv_layout(config(static_batch=4, kv="static"), "cpu").batch == 4
    assert _kv_layout(config(static_batch=4), "cuda").static
