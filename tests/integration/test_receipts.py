"""Signed receipts from a real 3-stage swarm (real mTLS, the real TinyStories model): a
genuine receipt verifies, also in a fresh process that holds only the receipt and the CA
certificate, and replays to the same tokens with transformers; every tampering fails
with its own reason, including lies that a signer with a valid key tells. A seeded
sampled run under speculative sampling (a model draft) gets a receipt that records its
settings and re-derives token by token."""

import asyncio
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from shard import receipt as receipts
from shard.cli import verify_receipt
from shard.client import generate
from shard.model.synthetic import truncated_copy
from shard.receipt_replay import replay
from shard.v1 import api_pb2, frame_pb2, stage_pb2, stage_pb2_grpc
from shard.wire import certs
from shard.wire.chain import chain_of
from shard.wire.signing import Signer, digest
from shard.wire.tls import NodeTLS, open_channel

from support.reference import reference_greedy
from support.swarm import inprocess_swarm

PROMPT = [1, 415, 1022, 264, 727]
OTHER_PROMPT = [1, 415, 1022, 264, 400, 88]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def draft_dir(tinystories_dir, tmp_path_factory) -> Path:
    """A model draft (the target cut to one layer): it proposes from a real q."""
    return truncated_copy(tinystories_dir, tmp_path_factory.mktemp("draft") / "truncated", layers=1)


@pytest.fixture(scope="module")
def swarm(tinystories_dir, draft_dir, tmp_path_factory):
    """Three stages and a coordinator in one event loop; `swarm.run(coroutine)` runs in it."""
    loop = asyncio.new_event_loop()
    # Equal speeds, stated: measured ones vary under load, and so would the layout the tests name.
    context = inprocess_swarm(tinystories_dir, 3, tmp_path_factory.mktemp("receipts"),
                              stage_args=[["--speed=1"]] * 3, coordinator_args=[f"--draft={draft_dir}"])
    running = loop.run_until_complete(context.__aenter__())
    running.run = loop.run_until_complete
    yield running
    loop.run_until_complete(context.__aexit__(None, None, None))
    loop.close()


def run_receipt(swarm, prompt, **fields) -> tuple[api_pb2.GenerationSummary, dict]:
    request = api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=prompt), max_tokens=48, receipt=True,
                                      **{"draft": "ngram", "spec_k": 4, "in_flight": 4, **fields})
    # The registry may re-order the ring once it has measured round trips: wait it out.
    summary = swarm.run(generate(swarm.coordinator.address, swarm.tls(), request, wait_ready_seconds=60)).summary
    return summary, json.loads(summary.receipt)


@pytest.fixture(scope="module")
def genuine(swarm):
    """A speculative run (n-gram draft, 4 chunks in flight: wasted and skipped chunks)."""
    return run_receipt(swarm, PROMPT)


@pytest.fixture(scope="module")
def other(swarm):
    """A second run, private, of another prompt: the source of splices and re-used signatures."""
    return run_receipt(swarm, OTHER_PROMPT, receipt_private=True)


@pytest.fixture(scope="module")
def ca_pem(swarm) -> bytes:
    return (swarm.certs / certs.CA_CERT).read_bytes()


def ring(receipt: dict) -> list[str]:
    """The final ring's stages, head first (the registry orders them by round trips)."""
    return [entry["node_id"] for entry in receipt["envelope"]["statement"]["layouts"][-1]]


def test_a_genuine_receipt_verifies_and_says_what_ran(swarm, genuine, ca_pem, tinystories_dir):
    summary, receipt = genuine
    verified = receipts.verify(receipt, ca_pem)
    envelope = verified.envelope
    head, _, tail = ring(receipt)
    assert list(summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, 48) == envelope["output"]["ids"]
    assert [(e["node_id"], e["layer_start"], e["layer_end"]) for e in envelope["layouts"][-1]] == [
        (s["node_id"], s["block"]["layer_start"], s["block"]["layer_end"])
        for s in (verified.stages[node_id] for node_id in ring(receipt))]
    assert sorted(verified.stages) == ["stage-0", "stage-1", "stage-2"]
    assert verified.checked_edges >= 4 and not verified.lost and verified.transcript_checked
    # Speculation's waste is on the record: the chains cover the frames nobody used.
    assert envelope["stats"]["chunks_sent"] == summary.chunks_sent > summary.traversals
    sent = envelope["sent"][head]["kinds"]
    assert sent.get("FORWARD", 0) + sent.get("REPLAY", 0) == summary.chunks_sent and sent["END"] == 1
    skipped = sum(len(s["skipped_chunks"]) for s in verified.stages.values())
    returned = envelope["received"][tail]["count"]
    assert returned + skipped == summary.chunks_sent  # every chunk came back or a stage skipped it
    lines = receipts.summary(verified)
    assert lines[0].endswith("VALID") and any(f"{head}: layers [0, 0) + embedding" in line for line in lines)
    for statement in verified.stages.values():
        assert statement["node"]["device_name"] == "cpu" and len(statement["block"]["weights_sha256"]) == 64
    assert set(envelope["rtts"]) >= {"stage-0", "stage-1", "stage-2"}


def test_a_fresh_process_with_only_the_receipt_and_the_ca_verifies_it(genuine, ca_pem, tmp_path):
    (tmp_path / "receipt.json").write_text(json.dumps(genuine[1]))
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the code; nothing else of the swarm
    command = [sys.executable, "-m", "shard", "receipt", "verify", "receipt.json", "--ca", "ca.pem"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "VALID" in done.stdout and "edges' chains match" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "receipt.json"]
    tampered = copy.deepcopy(genuine[1])
    tampered["envelope"]["statement"]["output"]["ids"][0] += 1
    (tmp_path / "receipt.json").write_text(json.dumps(tampered))
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "INVALID: bad signature on the envelope" in done.stderr


def test_verify_exit_codes(genuine, ca_pem, tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(genuine[1]))
    bad.write_text("{not json")
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    assert verify_receipt(str(good), ca=str(tmp_path / "ca.pem")) == 0
    assert verify_receipt(str(bad)) == 2
    assert verify_receipt(str(tmp_path / "absent.json")) == 2
    assert verify_receipt(str(good), ca=str(tmp_path / "absent.pem")) == 2
    assert verify_receipt(str(good), replay=str(tmp_path)) == 2  # not a model folder
    assert "cannot" in capsys.readouterr().err


def test_replay_regenerates_the_output_and_checks_the_weights(genuine, ca_pem, tinystories_dir, tmp_path):
    verified = receipts.verify(genuine[1], ca_pem)
    assert "regenerates all 48 output tokens" in replay(verified, Path(tinystories_dir))[0]
    # Another model folder (same files, one weight byte changed) is caught by its block hashes.
    changed = tmp_path / "model"
    shutil.copytree(tinystories_dir, changed)
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(receipts.ReceiptInvalid, match="served other weights"):
        replay(verified, changed)


def test_a_private_receipt_holds_hashes_only(other, ca_pem):
    summary, receipt = other
    verified = receipts.verify(receipt, ca_pem)
    envelope = verified.envelope
    assert "ids" not in envelope["output"] and "ids" not in envelope["prompt"] and "transcript" not in envelope
    assert envelope["output"]["tokens"] == len(summary.output_ids)
    assert not verified.transcript_checked
    assert str(list(summary.output_ids)) not in summary.receipt


def test_attest_is_for_the_coordinator_and_forgets_the_session(swarm, genuine):
    session_id = genuine[0].session_id
    stage = swarm.stages[1]

    async def attest(node_id: str):
        async with open_channel(stage.address, NodeTLS.load(swarm.certs, node_id)) as channel:
            return await stage_pb2_grpc.StageServiceStub(channel).Attest(
                stage_pb2.AttestRequest(session_id=session_id), timeout=10)

    for caller, code in (("client", grpc.StatusCode.PERMISSION_DENIED), ("stage-0", grpc.StatusCode.PERMISSION_DENIED),
                         ("coordinator", grpc.StatusCode.NOT_FOUND)):  # attested once, then forgotten
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            swarm.run(attest(caller))
        assert raised.value.code() == code, caller


# ---- tampering ---------------------------------------------------------------------------


def envelope_of(receipt: dict) -> dict:
    return receipt["envelope"]["statement"]


def attestation(receipt: dict, node_id: str) -> dict:
    return next(a for a in receipt["attestations"] if a["statement"]["node_id"] == node_id)


def signer(certs_dir: Path, node_id: str) -> Signer:
    return Signer((certs_dir / f"{node_id}.key").read_bytes(), (certs_dir / f"{node_id}.pem").read_bytes())


class Tamper:
    """Edits of a genuine receipt; `resign` plays a signer who holds a valid key and lies."""

    def __init__(self, receipt: dict, other: dict, certs_dir: Path, tmp: Path):
        self.receipt, self.other, self.certs, self.tmp = receipt, other, certs_dir, tmp
        self.head, self.middle, self.tail = ring(receipt)

    def resign_envelope(self) -> None:
        self.receipt["envelope"] = signer(self.certs, "coordinator").signed(envelope_of(self.receipt))

    def resign_stage(self, node_id: str, key_of: Signer | None = None, rebind: bool = False) -> None:
        signed = attestation(self.receipt, node_id)
        signed.update((key_of or signer(self.certs, node_id)).signed(signed["statement"]))
        if rebind:  # the coordinator colludes: it binds the new attestation
            for entry in envelope_of(self.receipt)["attestations"]:
                if entry["node_id"] == node_id:
                    entry["sha256"] = digest(signed["statement"])
            self.resign_envelope()


def edit_output_token(t):
    envelope_of(t.receipt)["output"]["ids"][3] += 1


def edit_output_and_rehash(t):
    """The coordinator lies about the output, consistently with its own hash and signature."""
    from shard.wire.ids import ids_sha256

    output = envelope_of(t.receipt)["output"]
    output["ids"][3] = (output["ids"][3] + 1) % 2000
    output["sha256"] = ids_sha256(output["ids"])
    t.resign_envelope()


def edit_output_keep_hash(t):
    envelope_of(t.receipt)["output"]["ids"][-1] += 1
    t.resign_envelope()


def swap_blocks_in_plan(t):
    final = envelope_of(t.receipt)["layouts"][-1]
    final[0]["node_id"], final[1]["node_id"] = final[1]["node_id"], final[0]["node_id"]
    t.resign_envelope()


def swap_block_in_attestation(t):
    block = attestation(t.receipt, t.middle)["statement"]["block"]
    block["layer_start"], block["layer_end"] = 1, 2


def remove_stage(t):
    t.receipt["attestations"] = [a for a in t.receipt["attestations"] if a["statement"]["node_id"] != t.middle]


def remove_stage_and_its_binding(t):
    remove_stage(t)
    envelope = envelope_of(t.receipt)
    envelope["attestations"] = [e for e in envelope["attestations"] if e["node_id"] != t.middle]
    t.resign_envelope()


def remove_stage_from_plan_too(t):
    remove_stage_and_its_binding(t)
    envelope = envelope_of(t.receipt)
    envelope["layouts"][-1] = [e for e in envelope["layouts"][-1] if e["node_id"] != t.middle]
    t.resign_envelope()


def forge_signature(t):
    signed = attestation(t.receipt, t.head)
    raw = bytearray(base64.b64decode(signed["signature"]))
    raw[-1] ^= 1
    signed["signature"] = base64.b64encode(bytes(raw)).decode()


def reuse_signature(t):
    attestation(t.receipt, t.head)["signature"] = attestation(t.other, t.head)["signature"]


def reuse_envelope_signature(t):
    t.receipt["envelope"]["signature"] = t.other["envelope"]["signature"]


def reorder_chain(t):
    """The coordinator reorders two frames it sent, and re-chains and re-signs consistently."""
    envelope = envelope_of(t.receipt)
    frames = envelope["transcript"]["sent"][t.head]
    frames[1], frames[2] = frames[2], frames[1]
    from shard.receipt import _entry

    envelope["sent"][t.head]["head"] = chain_of(_entry(envelope["session_id"], f) for f in frames).hex()
    t.resign_envelope()


def reorder_transcript(t):
    frames = envelope_of(t.receipt)["transcript"]["sent"][t.head]
    frames[1], frames[2] = frames[2], frames[1]
    t.resign_envelope()


def change_round_trip(t):
    rtts = attestation(t.receipt, t.middle)["statement"]["rtts"]
    rtts[t.tail] = rtts.get(t.tail, 0.0) + 0.05


def change_coordinator_round_trip(t):
    envelope_of(t.receipt)["rtts"][t.head] = 0.0001


def stage_signs_with_client_certificate(t):
    """A certificate of the deployment's CA with the middle stage's id, but of role client."""
    shutil.copy(t.certs / certs.CA_CERT, t.tmp / certs.CA_CERT)
    shutil.copy(t.certs / certs.CA_KEY, t.tmp / certs.CA_KEY)
    certs.issue(t.tmp, role="client", node_id=t.middle)
    t.resign_stage(t.middle, signer(t.tmp, t.middle), rebind=True)


def stage_signs_with_coordinator_certificate(t):
    t.resign_stage(t.middle, signer(t.certs, "coordinator"), rebind=True)


def stage_certificate_of_another_ca(t):
    certs.create_ca(t.tmp)
    certs.issue(t.tmp, role="stage", node_id=t.middle)
    t.resign_stage(t.middle, signer(t.tmp, t.middle), rebind=True)


def splice_attestation_from_other_run(t):
    index = next(i for i, a in enumerate(t.receipt["attestations"]) if a["statement"]["node_id"] == t.middle)
    t.receipt["attestations"][index] = attestation(t.other, t.middle)


def splice_and_rebind(t):
    """The coordinator splices another run's (genuinely signed) attestation in and binds it."""
    splice_attestation_from_other_run(t)
    for entry in envelope_of(t.receipt)["attestations"]:
        if entry["node_id"] == t.middle:
            entry["sha256"] = digest(attestation(t.receipt, t.middle)["statement"])
    t.resign_envelope()


def stage_rewrites_its_chain(t):
    """A stage (with its own valid key) changes what it says it sent, after the fact."""
    attestation(t.receipt, t.middle)["statement"]["sent"][t.tail]["count"] += 1
    t.resign_stage(t.middle)


def stage_and_coordinator_rewrite_a_chain(t):
    attestation(t.receipt, t.middle)["statement"]["sent"][t.tail]["head"] = "00" * 32
    t.resign_stage(t.middle, rebind=True)


def change_tokens_per_second(t):
    envelope_of(t.receipt)["stats"]["tokens_per_second"] *= 10


def change_weight_hash(t):
    attestation(t.receipt, t.tail)["statement"]["block"]["weights_sha256"] = "ab" * 32


TAMPERINGS = {  # reason templates: {head}, {middle}, {tail} are the final ring's stages
    "edited output token": (edit_output_token, "bad signature on the envelope"),
    "coordinator edits the output and its hash": (edit_output_and_rehash, "is not what the ring computed"),
    "coordinator edits the output, not its hash": (edit_output_keep_hash, "do not match the output hash"),
    "swapped blocks in the plan": (swap_blocks_in_plan, "attests layers"),
    "swapped block in an attestation": (swap_block_in_attestation, "bad signature on the attestation of {middle}"),
    "removed stage": (remove_stage, "attestation of {middle} was removed"),
    "removed stage, coordinator re-signs": (remove_stage_and_its_binding,
                                            "{middle}, in the final plan, did not attest"),
    "removed stage from the plan too": (remove_stage_from_plan_too, "do not tile"),
    "forged signature": (forge_signature, "bad signature on the attestation of {head}"),
    "re-used stage signature": (reuse_signature, "signature does not match the statement"),
    "re-used envelope signature": (reuse_envelope_signature, "bad signature on the envelope"),
    "reordered chain": (reorder_chain, "the chains of edge coordinator -> {head} differ"),
    "reordered transcript": (reorder_transcript, "transcript of frames sent to {head} does not match"),
    "changed round trip": (change_round_trip, "bad signature on the attestation of {middle}"),
    "changed coordinator round trip": (change_coordinator_round_trip, "bad signature on the envelope"),
    "stage signs with a client certificate": (stage_signs_with_client_certificate,
                                              "stage/{middle} signed with the certificate of client/{middle}"),
    "stage signs with the coordinator's certificate": (stage_signs_with_coordinator_certificate,
                                                       "signed with the certificate of coordinator/coordinator"),
    "stage certificate from another CA": (stage_certificate_of_another_ca, "not issued by the given CA"),
    "spliced from two runs": (splice_attestation_from_other_run, "spliced from another run"),
    "spliced and re-bound by the coordinator": (splice_and_rebind, "spliced from another run"),
    "stage rewrites its chain": (stage_rewrites_its_chain, "attestation of {middle} is not the one the coordinator"),
    "stage and coordinator rewrite a chain": (stage_and_coordinator_rewrite_a_chain,
                                              "the chains of edge {middle} -> {tail} differ"),
    "faster tokens per second": (change_tokens_per_second, "bad signature on the envelope"),
    "changed weight hash": (change_weight_hash, "bad signature on the attestation of {tail}"),
}


@pytest.mark.parametrize("name", TAMPERINGS)
def test_a_tampered_receipt_fails_with_its_reason(name, swarm, genuine, other, ca_pem, tmp_path):
    edit, reason = TAMPERINGS[name]
    receipt = copy.deepcopy(genuine[1])
    head, middle, tail = ring(receipt)
    edit(Tamper(receipt, other[1], swarm.certs, tmp_path))
    with pytest.raises(receipts.ReceiptInvalid) as raised:
        receipts.verify(json.loads(json.dumps(receipt)), ca_pem)
    assert reason.format(head=head, middle=middle, tail=tail) in str(raised.value)


def test_an_edge_of_a_superseded_ring_may_differ_only_after_a_replay(swarm, genuine, other, ca_pem, tmp_path):
    """The registry re-ordered the ring mid-session: frames in flight on the old edge head ->
    tail never arrived. Reported, not fatal, when the session was replayed; fatal otherwise."""
    receipt = copy.deepcopy(genuine[1])
    t = Tamper(receipt, other[1], swarm.certs, tmp_path)
    envelope = envelope_of(receipt)
    final = envelope["layouts"][-1]
    envelope["layouts"].insert(0, [final[0], final[2], final[1]])
    attestation(receipt, t.head)["statement"]["sent"][t.tail] = {"head": "11" * 32, "count": 2,
                                                                 "kinds": {"FORWARD": 2}}
    t.resign_stage(t.head, rebind=True)
    with pytest.raises(receipts.ReceiptInvalid, match=f"the chains of edge {t.head} -> {t.tail} differ"):
        receipts.verify(receipt, ca_pem)
    envelope["stats"]["replays"] = 1
    t.resign_envelope()
    verified = receipts.verify(receipt, ca_pem)
    assert verified.unchecked_edges == [(t.head, t.tail)]


# ---- sampled runs ------------------------------------------------------------------------

SAMPLED = dict(temperature=0.8, top_p=0.9, seed=7, stop_at_eos=False, logprobs=2)


@pytest.fixture(scope="module")
def sampled(swarm, draft_dir):
    """Seeded speculative sampling: the model draft proposes from q, the tail tests each
    guess against p and draws corrections from the residual (and reports logprobs)."""
    return run_receipt(swarm, PROMPT, draft=str(draft_dir), **SAMPLED)


def test_a_sampled_receipt_records_its_settings_and_replays_token_by_token(sampled, ca_pem, draft_dir,
                                                                          tinystories_dir, tmp_path):
    summary, receipt = sampled
    verified = receipts.verify(receipt, ca_pem)
    envelope = verified.envelope
    decoding = envelope["decoding"]
    assert (decoding["sampling"], decoding["seed"], decoding["top_k"], decoding["logprobs"], decoding["draft"],
            decoding["spec_k"], decoding["in_flight"]) == ("sampled", summary.seed, 0, 2, str(draft_dir), 4, 4)
    assert summary.seed == 7
    assert round(decoding["temperature"], 6) == 0.8 and round(decoding["top_p"], 6) == 0.9
    assert envelope["output"]["ids"] == list(summary.output_ids) and len(summary.output_ids) == 48
    assert verified.transcript_checked and "the tail's choice" in receipts.summary(verified)[-1]
    # Every output token was chosen by the tail; speculative sampling tested drafted guesses
    # (accepting some, rejecting others) and drew the rest from p.
    prompt_length = len(PROMPT)
    assert sorted(verified.decisions) == list(range(prompt_length, prompt_length + 48))
    decided = [(d, envelope["output"]["ids"][position - prompt_length])
               for position, found in verified.decisions.items() for d in found]
    tested = [(d, token) for d, token in decided if d.row < len(d.spec.proposals)]
    accepted = [d for d, token in tested if d.spec.proposals[d.row].token == token]
    assert accepted and len(accepted) < len(tested) < len(decided)
    assert "re-derives all 48 sampled output tokens" in replay(verified, Path(tinystories_dir))[0]
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    assert verify_receipt(str(tmp_path / "receipt.json"), ca=str(tmp_path / "ca.pem"),
                          replay=str(tinystories_dir)) == 0


def sampled_spec(t, edit) -> None:
    """Edit the sampling spec every chunk of the transcript carried (the coordinator's own
    record of what it sent; the tail's answers name the specs they were chosen under)."""
    for frames in envelope_of(t.receipt)["transcript"]["sent"].values():
        for frame in frames:
            if "sampling" in frame:
                spec = frame_pb2.SamplingSpec.FromString(base64.b64decode(frame["sampling"]))
                edit(spec)
                frame["sampling"] = base64.b64encode(spec.SerializeToString()).decode()


def edit_seed(t):
    envelope_of(t.receipt)["decoding"]["seed"] += 1


def edit_seed_and_resign(t):
    edit_seed(t)
    t.resign_envelope()


def edit_seed_everywhere(t):
    """The coordinator says another seed, in its record and in the specs it says it sent."""
    edit_seed(t)
    sampled_spec(t, lambda spec: setattr(spec, "seed", spec.seed + 1))
    t.resign_envelope()


def edit_temperature(t):
    envelope_of(t.receipt)["decoding"]["temperature"] = 0.5


def edit_temperature_and_resign(t):
    edit_temperature(t)
    t.resign_envelope()


def edit_temperature_everywhere(t):
    edit_temperature(t)
    sampled_spec(t, lambda spec: setattr(spec, "temperature", 0.5))
    t.resign_envelope()


def edit_a_proposal(t):
    """The coordinator changes the q it says it sent with a drafted token."""
    def edit(spec):
        for proposal in spec.proposals:
            proposal.probs[0] *= 0.5

    sampled_spec(t, edit)
    t.resign_envelope()


def drop_the_specs(t):
    for frames in envelope_of(t.receipt)["transcript"]["sent"].values():
        for frame in frames:
            frame.pop("sampling", None)
    t.resign_envelope()


SAMPLED_TAMPERINGS = {
    "edited sampled output token": (edit_output_token, "bad signature on the envelope"),
    "coordinator edits a sampled token and its hash": (edit_output_and_rehash, "is not what the ring computed"),
    "edited seed": (edit_seed, "bad signature on the envelope"),
    "coordinator edits the seed": (edit_seed_and_resign, "seed 7, but the receipt records"),
    "coordinator edits the seed, in the specs too": (edit_seed_everywhere, "under another sampling spec"),
    "edited temperature": (edit_temperature, "bad signature on the envelope"),
    "coordinator edits the temperature": (edit_temperature_and_resign, "but the receipt records temperature 0.5"),
    "coordinator edits the temperature, in the specs too": (edit_temperature_everywhere,
                                                           "under another sampling spec"),
    "coordinator edits a draft's q": (edit_a_proposal, "under another sampling spec"),
    "coordinator drops the specs": (drop_the_specs, "carried no sampling spec"),
}


@pytest.mark.parametrize("name", SAMPLED_TAMPERINGS)
def test_a_tampered_sampled_receipt_fails_with_its_reason(name, swarm, sampled, other, ca_pem, tmp_path):
    edit, reason = SAMPLED_TAMPERINGS[name]
    receipt = copy.deepcopy(sampled[1])
    edit(Tamper(receipt, other[1], swarm.certs, tmp_path))
    with pytest.raises(receipts.ReceiptInvalid, match=reason):
        receipts.verify(json.loads(json.dumps(receipt)), ca_pem)


def test_replay_catches_a_tail_that_lies_about_a_sampled_token(swarm, sampled, other, ca_pem, tinystories_dir,
                                                              tmp_path):
    """The tail and the coordinator agree on another last token: every signature and chain
    holds, and only computing again shows the tail did not choose as the seed says."""
    from shard.receipt import _entry
    from shard.wire.ids import ids_sha256

    receipt = copy.deepcopy(sampled[1])
    t = Tamper(receipt, other[1], swarm.certs, tmp_path)
    envelope = envelope_of(receipt)
    last = len(PROMPT) + 47
    (decision,) = receipts.verify(receipt, ca_pem).decisions[last]
    lie = (envelope["output"]["ids"][-1] + 1) % 2000
    answers = envelope["transcript"]["received"][t.tail]
    answer = next(a for a in answers if a["chunk_id"] == decision.chunk_id)
    choices = frame_pb2.ChunkChoices.FromString(base64.b64decode(answer["payload"]))
    choices.ids[decision.row] = lie
    answer["payload"] = base64.b64encode(choices.SerializeToString()).decode()
    head = chain_of(_entry(envelope["session_id"], a) for a in answers).hex()
    envelope["received"][t.tail]["head"] = head
    attestation(receipt, t.tail)["statement"]["sent"][envelope["node_id"]]["head"] = head
    envelope["output"]["ids"][-1] = lie
    envelope["output"]["sha256"] = ids_sha256(envelope["output"]["ids"])
    t.resign_stage(t.tail, rebind=True)
    verified = receipts.verify(receipt, ca_pem)  # the lie is consistent: signatures and chains hold
    with pytest.raises(receipts.ReceiptInvalid, match=f"replay differs at output token 47 .*the receipt says {lie}"):
        replay(verified, Path(tinystories_dir))
