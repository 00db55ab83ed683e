"""The draft on a GPU: its CUDA-graphed step proposes exactly what the same step run eagerly
does (its layers compiled by torch.compile or not), through hundreds of proposals with
rollbacks of every depth, in a slot of its own or as a row of a batched pool; sessions in
different threads draft side by side without disturbing one another (in a pool, one graph
replay stepping them all); and a coordinator with its draft on the GPU in bfloat16 serves a
whole swarm. Run on the device machine:
    python -m pytest -m gpu tests/gpu -v"""

import asyncio
import threading

import pytest
import torch

from shard.bench.draft_step import random_llama
from shard.client import generate
from shard.decode.draft import ModelDraft, ModelDraftSession
from shard.decode.static_draft import StaticDraftSession
from shard.local import LocalSwarm
from shard.v1 import api_pb2

from support.drafts import drive
from support.reference import reference_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = [1, 415, 22, 264, 127]  # within every model's vocabulary
# Big enough to be launch-bound like a real draft, with weights drawn wide enough that
# greedy decoding does not collapse to one token (which would make equality trivial).
MID = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
           intermediate_size=2816, vocab_size=8192, max_position_embeddings=1024, initializer_range=0.1)
# One attention extent (256 positions: a single length bucket), so that a pool's step has
# one shape whichever sessions step in it.
MID_256 = {**MID, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {
        "tiny-llama-bf16": ModelDraft.load(tiny_model_dirs["llama"], device="cuda", dtype=torch.bfloat16,
                                           slots=0).model,
        "mid-bf16": random_llama(MID, "cuda", torch.bfloat16),
        "mid-256-bf16": random_llama(MID_256, "cuda", torch.bfloat16),
    }


def graphed_against_eager(model, *, compiled: bool = True, pool: int = 0) -> None:
    """With `pool`, both drafts step their sessions as rows of a pool of that many."""
    lanes = dict(slots=pool, batch=pool) if pool else dict(slots=1)
    eager = ModelDraft(model, name="eager", capture=False, compiled=compiled, **lanes)
    graphed = ModelDraft(model, name="graphed", capture=True, compiled=compiled, **lanes)
    assert (graphed.pool is not None) == bool(pool) and (not pool or graphed.pool.graphs)
    sessions = [eager.session(), graphed.session()]
    assert all(isinstance(s, StaticDraftSession) for s in sessions)
    made = drive(sessions, PROMPT, model.config.vocab_size, proposals=300, seed=7)
    assert made[1] == made[0]
    tokens = [t for proposal in made[0] for t in proposal]
    assert len(tokens) > 800 and len(set(tokens)) > 20  # varied text, not one token repeated


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "uncompiled"])
@pytest.mark.parametrize("name", ["tiny-llama-bf16", "mid-bf16"])
def test_graphed_steps_propose_what_eager_steps_do(models, name, compiled):
    graphed_against_eager(models[name], compiled=compiled)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "uncompiled"])
@pytest.mark.parametrize("name", ["tiny-llama-bf16", "mid-bf16"])
def test_a_graphed_pool_proposes_what_its_eager_steps_do(models, name, compiled):
    graphed_against_eager(models[name], compiled=compiled, pool=4)


def test_graphed_steps_of_the_real_model(tinystories_dir):
    graphed_against_eager(ModelDraft.load(tinystories_dir, device="cuda", dtype=torch.bfloat16, slots=0).model)


@pytest.mark.parametrize("pool", [0, 4], ids=["slot", "pool"])
def test_graphed_float32_equals_the_dynamic_draft(tiny_model_dirs, pool):
    """In float32 the static cache changes nothing: the same tokens as the eager dynamic draft
    (uncompiled: inductor's fused kernels round differently from the dynamic draft's)."""
    dynamic = ModelDraft.load(tiny_model_dirs["llama"], device="cuda", dtype=torch.float32, slots=0)
    lanes = dict(slots=pool, batch=pool) if pool else dict(slots=1)
    graphed = ModelDraft(dynamic.model, name="graphed", compiled=False, **lanes)
    sessions = [dynamic.session(), graphed.session()]
    assert [type(s) for s in sessions] == [ModelDraftSession, StaticDraftSession]
    made = drive(sessions, PROMPT, dynamic.model.config.vocab_size, proposals=200, seed=3)
    assert made[1] == made[0]


@pytest.mark.parametrize("batch", [1, 4], ids=["slots", "pool"])
def test_sessions_draft_side_by_side(models, batch):
    """Four sessions, each in a thread of its own, propose what each proposes alone: with a
    slot and a stream each, or as rows of one pool, whose every step (one shape: one length
    bucket) then runs all of them in one graph replay."""
    draft = ModelDraft(models["mid-256-bf16"], name="side by side", slots=4, batch=batch)
    assert draft.threads == 4 and (draft.pool is not None) == (batch > 1)
    vocab = draft.model.config.vocab_size
    alone = []
    for seed in range(4):
        session = draft.session()
        alone.append(drive([session], PROMPT, vocab, proposals=100, seed=seed, max_length=200)[0])
        session.close()
    together: dict[int, list] = {}
    sessions = [draft.session() for _ in range(4)]
    assert all(isinstance(s, StaticDraftSession) for s in sessions)
    start = threading.Barrier(4)

    def work(seed: int) -> None:
        start.wait()
        together[seed] = drive([sessions[seed]], PROMPT, vocab, proposals=100, seed=seed, max_length=200)[0]

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [together.get(seed) for seed in range(4)] == alone
    if draft.pool:
        assert draft.pool.stats.largest == 4 and draft.pool.stats.batched_forwards > 0


@pytest.mark.parametrize("draft_batch", [1, 4, None], ids=["slots", "pool", "default"])
def test_a_swarm_with_its_draft_on_the_gpu(tiny_model_dirs, tmp_path, draft_batch):
    """Stages in float32 on the CPU (so the output must be generate()'s exactly), the
    coordinator's drafts on the GPU in bfloat16: a model draft (the target itself) and an
    oracle, graphed in slots of their own or in a batched pool (the default)."""
    model_dir = tiny_model_dirs["llama"]
    drafts = [str(model_dir), "oracle:1.0"]
    coordinator_args = [*(f"--draft={d}" for d in drafts), "--draft-device=cuda", "--draft-dtype=bfloat16",
                        *([f"--draft-batch={draft_batch}"] if draft_batch else [])]
    expected = reference_greedy(model_dir, PROMPT, 64)
    with LocalSwarm(model_dir, 2, workdir=tmp_path, logs_to_files=True, device="cpu", dtype="float32",
                    coordinator_args=coordinator_args) as swarm:
        results = {}
        for draft in drafts:
            request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT), max_tokens=64, draft=draft,
                                              spec_k=4, in_flight=4)
            results[draft] = asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request,
                                                  wait_ready_seconds=120)).summary
    for draft, summary in results.items():
        assert list(summary.output_ids) == expected, draft
    assert results["oracle:1.0"].acceptance_rate == 1.0
    # The target itself in bfloat16: it mostly agrees (0.8 measured on a CPU in bfloat16).
    assert results[str(model_dir)].acceptance_rate > 0.5
