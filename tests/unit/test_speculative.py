"""Invariant 1 for speculation: whatever the draft, K and the in-flight depth, the output is
exactly transformers' greedy generate(). The ring here is the real blocks chained in one
process; tests/integration runs the same driver over the services."""

import asyncio
import random
import time

import pytest

from shard.decode.draft import ModelDraft, NgramDraft
from shard.decode.speculative import Finish, Lookahead, decode
from shard.model.synthetic import ARCHS

from support.chain import AlwaysAhead, ChainRing, LocalChain, run
from support.drafts import perturbed_copy, unrelated_copy
from support.reference import reference_greedy

PROMPT = [1, 17, 42, 99, 3, 250, 7, 311]
NEW = 32
SPLITS = {1: [(0, 6)], 2: [(0, 2), (2, 6)], 3: [(0, 1), (1, 4), (4, 6)]}


@pytest.fixture(scope="module")
def drafts(tiny_model_dirs, tmp_path_factory):
    """arch -> {kind: draft session factory}: agreeing always, often, never, n-gram."""
    root = tmp_path_factory.mktemp("drafts")
    made = {}
    for arch in ARCHS:
        target = tiny_model_dirs[arch]
        made[arch] = {
            "target": ModelDraft.load(target),
            "perturbed": ModelDraft.load(perturbed_copy(target, root / f"{arch}-perturbed", noise=0.03)),
            "unrelated": ModelDraft.load(unrelated_copy(target, root / f"{arch}-unrelated")),
            "ngram": NgramDraft(),
        }
    return made


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_draft_k_and_depth_is_lossless(tiny_model_dirs, drafts, arch, stages):
    model_dir = tiny_model_dirs[arch]
    chain = LocalChain(model_dir, SPLITS[stages])
    expected = reference_greedy(model_dir, PROMPT, NEW)
    acceptance = {}
    for kind, draft in drafts[arch].items():
        for k in (1, 4, 8):
            for in_flight in (1, 4):
                out, stats = run(chain, PROMPT, draft.session(), max_tokens=NEW, eos_ids=frozenset(),
                                 spec_k=k, in_flight=in_flight, lookahead=AlwaysAhead())
                assert out == expected, (kind, k, in_flight)
                acceptance[kind, k, in_flight] = stats.acceptance_rate
    # The drafts span agreement: always, sometimes, (almost) never.
    assert acceptance["target", 4, 1] == 1.0
    assert 0.0 < acceptance["perturbed", 4, 1] < 1.0
    assert acceptance["unrelated", 4, 1] < 0.3


def test_tinystories_with_a_real_draft(tinystories_dir, tmp_path):
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(tinystories_dir)("Once upon a time")["input_ids"]
    expected = reference_greedy(tinystories_dir, prompt, 64)
    for split in ([(0, 2)], [(0, 1), (1, 2)]):
        chain = LocalChain(tinystories_dir, split)
        for draft in (ModelDraft.load(tinystories_dir), ModelDraft.load(perturbed_copy(tinystories_dir, tmp_path / "p", noise=0.2)),
                      NgramDraft()):
            for k, in_flight in ((1, 1), (4, 4), (8, 1), (8, 4)):
                out, _ = run(chain, prompt, draft.session(), max_tokens=64, eos_ids=frozenset(),
                             spec_k=k, in_flight=in_flight)
                assert out == expected, (draft.name, k, in_flight)


class Saboteur:
    """A perfect draft that corrupts one token at a random place in every proposal, so
    every chunk is rejected somewhere. It may take `seconds` per proposal, like a real one."""

    def __init__(self, full: list[int], seed: int, seconds: float = 0.0):
        self.full, self.random, self.seconds = full, random.Random(seed), seconds
        self.proposals = 0

    def propose(self, sequence, n):
        right = self.full[len(sequence):len(sequence) + n]
        if not right:
            return []
        time.sleep(self.seconds)
        self.proposals += 1
        wrong = self.random.randrange(len(right))
        return [t if i != wrong else (t + 1) % 512 for i, t in enumerate(right)]


class WholeChunks(Lookahead):
    """The depth policy alone: each chunk drafted in one piece."""

    def piece(self, wanted: int) -> int:
        return wanted


@pytest.mark.parametrize("seed", range(4))
def test_rollback_under_pressure(tiny_model_dirs, seed):
    model_dir = tiny_model_dirs["gpt_oss"]  # sliding windows: rollback reaches past them
    expected = reference_greedy(model_dir, PROMPT, NEW)
    chain = LocalChain(model_dir, SPLITS[3])
    draft = Saboteur(PROMPT + expected, seed)
    out, stats = run(chain, PROMPT, draft, max_tokens=NEW, eos_ids=frozenset(), spec_k=6, in_flight=4,
                     lookahead=AlwaysAhead())
    assert out == expected
    assert stats.accepted < stats.drafted and stats.chunks_wasted > 0
    # The stages' KV ends at the last chunk the driver sent: never past the committed
    # sequence by more than that chunk's own rejected drafts.
    committed = len(PROMPT) + len(out)
    assert all(committed - 1 <= length <= committed - 1 + 6 for length in chain.cache_lengths())


def test_a_draft_that_keeps_missing_stops_running_ahead(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    expected = reference_greedy(model_dir, PROMPT, NEW)
    wasted = {}
    for name, lookahead in (("always", AlwaysAhead()), ("adaptive", WholeChunks())):
        chain = LocalChain(model_dir, SPLITS[2])
        out, stats = run(chain, PROMPT, Saboteur(PROMPT + expected, seed=0, seconds=0.002), max_tokens=NEW, eos_ids=frozenset(),
                         spec_k=4, in_flight=8, lookahead=lookahead)
        assert out == expected
        assert stats.pipeline_breaks >= NEW // 5 - 1  # every chunk is rejected somewhere
        wasted[name] = stats.chunks_wasted
    assert wasted["always"] >= 5 * NEW // 5  # the window is refilled after every rejection
    assert 0 < wasted["adaptive"] <= min(3 * 8, wasted["always"] // 2)  # only until its record shows


def test_lookahead_weighs_a_wasted_draft_against_a_saved_traversal():
    lookahead = Lookahead()
    assert all(lookahead.allows(depth, 4) for depth in range(64))  # no record yet: optimistic
    for fully_accepted in [True, False] * 8:  # every other chunk is fully accepted
        lookahead.record_chunk(fully_accepted)
    lookahead.record_draft(0.004, 4)
    for _ in range(16):
        lookahead.record_traversal(0.060)  # a WAN ring: waiting costs far more than drafting
    wan_depth = max(d for d in range(64) if lookahead.allows(d, 4))
    for _ in range(16):
        lookahead.record_traversal(0.001)  # a LAN ring: drafting dominates
    lan_depth = max(d for d in range(64) if lookahead.allows(d, 4))
    assert wan_depth >= 3 and lan_depth <= 1


@pytest.mark.parametrize("k, in_flight", [(1, 1), (4, 1), (8, 4)])
def test_eos_and_max_tokens_are_exact(tiny_model_dirs, drafts, k, in_flight):
    model_dir = tiny_model_dirs["qwen3"]
    chain = LocalChain(model_dir, SPLITS[2])
    expected = reference_greedy(model_dir, PROMPT, NEW)
    # An eos that first appears mid-way: nothing after it may be emitted, even when a chunk
    # that verified past it is already in flight.
    eos = expected[17]
    stop = expected.index(eos)
    out, stats = run(chain, PROMPT, drafts["qwen3"]["target"].session(), max_tokens=NEW,
                     eos_ids=frozenset([eos]), spec_k=k, in_flight=in_flight)
    assert out == expected[:stop + 1] and stats.finish == Finish.EOS
    for limit in (1, 2, 7, 13):
        out, stats = run(chain, PROMPT, drafts["qwen3"]["target"].session(), max_tokens=limit,
                         eos_ids=frozenset(), spec_k=k, in_flight=in_flight)
        assert out == expected[:limit] and stats.finish == Finish.LENGTH


def test_draft_must_share_the_tokenizer(tiny_model_dirs, tinystories_dir):
    from shard.decode.draft import DraftMismatch
    from shard.decode.loading import load_draft

    with pytest.raises(DraftMismatch, match="does not share the tokenizer"):
        load_draft(str(tiny_model_dirs["llama"]), tinystories_dir)
    with pytest.raises(DraftMismatch, match="neither 'ngram' nor a model folder"):
        load_draft("/nonexistent", tinystories_dir)
    assert load_draft("ngram", tinystories_dir).name == "ngram"


class DelayedRing(ChainRing):
    """A ring whose results come back `delay` seconds after the chunk is sent."""

    def __init__(self, chain: LocalChain, delay: float):
        super().__init__(chain)
        self.delay = delay

    async def submit(self, **chunk):
        computed = await super().submit(**chunk)
        result = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(
            self.delay, lambda: result.done() or result.set_result(computed.result()))  # a dropped one is cancelled
        return result


class SlowMisser:
    """A draft slower than the ring that guesses every `every`-th position wrong (by
    position, so how its work is split does not change its guesses): about half its
    chunks of 8 are fully accepted, so running one chunk ahead pays."""

    def __init__(self, full: list[int], seconds_per_token: float, every: int = 17):
        self.full, self.seconds, self.every = full, seconds_per_token, every

    def propose(self, sequence, n):
        right = self.full[len(sequence):len(sequence) + n]
        time.sleep(self.seconds * len(right))
        return [t if (len(sequence) + i) % self.every else (t + 1) % 512 for i, t in enumerate(right)]


def test_a_draft_slower_than_the_ring_stops_when_a_result_comes_back(tiny_model_dirs):
    """Drafting in pieces while a chunk is in flight: a result that rejects a guess is read
    before the rest of the next chunk is drafted, not after."""
    model_dir = tiny_model_dirs["llama"]
    expected = reference_greedy(model_dir, PROMPT, 64)
    proposed = {}
    for name, lookahead in (("whole", WholeChunks()), ("pieces", Lookahead())):
        chain = LocalChain(model_dir, SPLITS[2])
        emitted = []

        async def emit(ids, logprobs):
            emitted.extend(ids)

        draft = SlowMisser(PROMPT + expected, 0.004)

        async def propose(sequence, n):  # in a thread, as the coordinator drafts
            return await asyncio.get_running_loop().run_in_executor(None, draft.propose, sequence, n)

        stats = asyncio.run(decode(DelayedRing(chain, delay=0.006), PROMPT, max_tokens=64, eos_ids=frozenset(),
                                   emit=emit, draft=draft, propose=propose, spec_k=8, in_flight=4,
                                   lookahead=lookahead))
        assert emitted == stats.output_ids == expected
        proposed[name] = stats.proposed
    print(f"\ntokens drafted: {proposed}")
    assert proposed["pieces"] < 0.75 * proposed["whole"], proposed
