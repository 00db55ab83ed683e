"""A dummy-weight folder served by real stage processes: every process makes its own
tensors, and the swarm's greedy decode equals transformers' generate() on the same
weights in one process (registry, stages and coordinator agree on its fingerprint)."""

import asyncio

import pytest
import torch

from shard.client import generate
from shard.local import LocalSwarm
from shard.model.causal_lm import load_causal_lm
from shard.model.synthetic import TINY_TARGET, build_dummy_model
from shard.v1 import api_pb2

pytestmark = pytest.mark.slow

PROMPT = [3, 141, 59, 26, 5, 358, 97, 93]


def test_a_swarm_of_dummy_weights_decodes_as_one_process_does(tmp_path):
    model_dir = build_dummy_model(tmp_path / "dummy", TINY_TARGET, dtype="float32", initializer_range=0.5)
    ids = torch.tensor([PROMPT])
    expected = load_causal_lm(model_dir).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                                  do_sample=False)[0, len(PROMPT):].tolist()
    request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=20, stop_at_eos=False)
    with LocalSwarm(model_dir, 3, workdir=tmp_path / "swarm", logs_to_files=True, device="cpu",
                    stage_args=["--threads=1"]) as swarm:
        got = asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request, wait_ready_seconds=120))
    assert list(got.summary.output_ids) == expected
