"""`--replay` of a sampled receipt re-derives each token from the target's logits, the
seed and the proposal the tail tested: it must land where the tail's own choice lands, row
for row and position for position, and say how each token was decided."""

import numpy as np
import pytest
import torch

from shard.decode.sampling import SamplingParams, process, propose
from shard.node.tail_sampling import ChunkSampling, choose_tokens, encode_spec
from shard.receipt import Decision
from shard.receipt_replay import explain, rederive
from shard.v1 import frame_pb2

VOCAB, ROWS, FIRST = 50, 5, 11  # FIRST: the position row 0 of the chunk chooses


def sampled_chunk(seed: int) -> tuple[np.ndarray, ChunkSampling]:
    """The target's logits at a chunk's output rows, and the chunk's sampling: four drafted
    guesses, each drawn from a q of its own, the draft's logits the target's plus noise
    from none to much (the last row draws the bonus from p)."""
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=seed)
    logits = rng.normal(size=(ROWS, VOCAB)) * 3
    drafts = logits + rng.normal(size=logits.shape) * (seed % 3)
    proposals = tuple(propose(process(drafts[i], params), seed, FIRST + i) for i in range(ROWS - 1))
    return logits, ChunkSampling(params, proposals)


@pytest.mark.parametrize("seed", range(12))
def test_replay_rederives_the_tails_choices(seed):
    logits, sampling = sampled_chunk(seed)
    chosen = choose_tokens(torch.tensor(logits), sampling, FIRST).ids
    spec = frame_pb2.SamplingSpec.FromString(encode_spec(sampling))
    decisions = [Decision(chunk_id=3, row=j, spec=spec) for j in range(len(chosen))]
    assert [rederive(logits[j], d, FIRST + j) for j, d in enumerate(decisions)] == chosen
    said = [explain(logits[j], d, FIRST + j) for j, d in enumerate(decisions)]
    # The tail went on past a row only when it accepted that row's guess.
    assert all("accepted" in line for line in said[:-1])
    # Then it stopped at a rejected guess (a draw from the residual), or drew the bonus from p.
    assert ("draw from the target's p" if len(chosen) == ROWS else "rejected") in said[-1]


def test_the_chunks_cover_rejections_and_bonus_draws():
    lengths = {len(choose_tokens(torch.tensor(logits), sampling, FIRST).ids)
               for logits, sampling in map(sampled_chunk, range(12))}
    assert ROWS in lengths and min(lengths) < ROWS


def test_another_seed_or_position_does_not_rederive_them():
    other_seed, other_position = 0, 0
    for seed in range(12):
        logits, sampling = sampled_chunk(seed)
        chosen = choose_tokens(torch.tensor(logits), sampling, FIRST).ids
        spec = frame_pb2.SamplingSpec.FromString(encode_spec(sampling))
        reseeded = frame_pb2.SamplingSpec()
        reseeded.CopyFrom(spec)
        reseeded.seed += 1
        for j, token in enumerate(chosen):
            other_seed += rederive(logits[j], Decision(3, j, reseeded), FIRST + j) != token
            other_position += rederive(logits[j], Decision(3, j, spec), FIRST + j + 1) != token
    assert other_seed > 0 and other_position > 0
