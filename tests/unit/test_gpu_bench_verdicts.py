"""The GPU harness's verdicts: in float32 every mode must give generate()'s tokens; in
bfloat16 every mode must give the swarm's plain decode, and a departure from generate()
is recorded with the reference's margin there; without a reference (a target no one GPU
holds) every mode must give the swarm's plain decode; drafts name the run's dummy folders."""

from pathlib import Path

import pytest

from shard.bench.gpu import Reference, check_rows, parse_counts, parse_drafts, parse_settings
from shard.bench.run import Row
from shard.local import stage_device

REFERENCE = Reference(tokens_per_second=1.0, outputs=[[5, 6, 7, 8], [1, 2, 3, 4]],
                      margins=[[0.5, 0.25, 0.125, 2.0], [1.0, 1.0, 1.0, 1.0]], load_seconds=0.0)


def row(mode: str, k: int, outputs: list[list[int]]) -> Row:
    return Row(topology="lan", mode=mode, draft="d", k=k, w=1, tokens=8, seconds=1.0, tokens_per_second=8.0,
               acceptance=0.0, tokens_per_traversal=1.0, chunks_sent=1, chunks_wasted=0, chunks_cancelled=0,
               pipeline_breaks=0, generations=2, traversals=8, draft_seconds=0.0, draft_seconds_per_token=0.0,
               stage_seconds_per_chunk=[0.001], traversal_seconds=0.01,
               lossless=outputs == REFERENCE.outputs, outputs=outputs)


def test_bfloat16_rows_must_equal_the_swarms_plain_decode():
    plain = [[5, 6, 9, 9], [1, 2, 3, 4]]  # parts from generate() at position 2 of the first prompt
    parted = [[5, 6, 9, 1], [1, 2, 3, 4]]
    rows = check_rows([row("plain", 0, plain), row("sync", 4, plain), row("pipelined", 4, parted)],
                      REFERENCE, exact=False)
    assert [r.extra["ok"] for r in rows] == [True, True, False]
    assert rows[0].extra["matched_prefix"] == [2, 4]
    assert rows[0].extra["divergence_margins"] == [0.125, None]
    assert rows[2].extra["equals_swarm_plain"] is False
    assert {r.extra["must_equal"] for r in rows} == {"swarm plain decode"}


def test_float32_rows_must_equal_generate():
    plain = [list(o) for o in REFERENCE.outputs]
    rows = check_rows([row("plain", 0, plain), row("sync", 4, [[5, 6, 7, 0], [1, 2, 3, 4]])], REFERENCE, exact=True)
    assert [r.extra["ok"] for r in rows] == [True, False]
    assert rows[1].extra["matched_prefix"] == [3, 4] and rows[1].extra["divergence_margins"] == [2.0, None]


def test_without_a_one_process_reference_every_mode_must_equal_the_swarms_plain_decode():
    plain = [[5, 6, 9, 9], [1, 2, 3, 4]]
    rows = check_rows([row("plain", 0, plain), row("sync", 4, plain), row("pipelined", 4, [[5, 6, 9, 1], [1, 2, 3, 4]])],
                      None, exact=True)  # a 70B target on four GPUs: nothing to run generate() on
    assert [r.extra["ok"] for r in rows] == [True, True, False]
    assert {r.extra["must_equal"] for r in rows} == {"swarm plain decode"}
    assert all("matched_prefix" not in r.extra for r in rows)


def test_stages_take_the_gpus_round_robin():
    assert [stage_device("cuda:0,cuda:1,cuda:2,cuda:3", i) for i in range(6)] == \
        ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert stage_device("cpu", 2) == "cpu"


def test_drafts_name_the_runs_folders():
    drafts = parse_drafts(["target={target}", "oracle-0.8=oracle:0.8:{draft}", "ngram"],
                          target=Path("/t/target"), draft=Path("/t/draft"))
    assert drafts == {"target": "/t/target", "oracle-0.8": "oracle:0.8:/t/draft", "ngram": "ngram"}


def test_settings_share_one_k_because_stages_graph_chunks_of_k_plus_one():
    assert parse_settings(["8,1", "8,8"]) == [(8, 1), (8, 8)]
    for bad in (["4,1", "8,8"], ["8"], ["0,4"], ["a,b"]):
        with pytest.raises(SystemExit):
            parse_settings(bad)


def test_session_counts_are_positive_and_sorted():
    assert parse_counts("16,1,8,8") == [1, 8, 16]
    for bad in ("", "0,4", "a", "1,,x"):
        with pytest.raises(SystemExit, match="--sessions"):
            parse_counts(bad)
