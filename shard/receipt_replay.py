"""`shard receipt verify --replay MODEL_DIR`: the check of the computation itself. The
signatures and chains of a receipt prove who handed what to whom; only computing again
shows that the tokens are what the model gives. Checks that the model folder is the one
the receipt names (its config, tokenizer and every attested block's weight hashes), then
recomputes with transformers in one process (float32, on the CPU): a greedy run's output
is regenerated; a sampled run's tokens are re-derived one by one from the target's
distribution at each position, the recorded seed and the draft's proposals the tail
tested (shard.decode.sampling, the functions the tail runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shard.decode.sampling import Proposal, Purpose, SamplingParams, choose, process, uniform
from shard.model.checkpoint import config_fingerprint
from shard.model.fingerprints import block_weights_sha256, tokenizer_sha256
from shard.receipt import Decision, ReceiptInvalid, Verified


def replay(verified: Verified, model_dir: Path) -> list[str]:
    """Lines for the summary; raises ReceiptInvalid when the replay disagrees."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a model folder)")
    envelope = verified.envelope
    model = envelope["model"]
    if config_fingerprint(model_dir) != model["config_sha256"]:
        raise ReceiptInvalid(f"{model_dir} is another model: its config hash differs from the receipt's")
    if tokenizer_sha256(str(model_dir)) != model["tokenizer_sha256"]:
        raise ReceiptInvalid(f"{model_dir}'s tokenizer differs from the one the receipt names")
    for node_id, statement in verified.stages.items():
        block = statement["block"]
        if block_weights_sha256(str(model_dir), block["layer_start"], block["layer_end"], block["first"],
                                block["last"]) != block["weights_sha256"]:
            raise ReceiptInvalid(f"{node_id} served other weights for layers [{block['layer_start']}, "
                                 f"{block['layer_end']}) than {model_dir} holds")
    if "ids" not in envelope["prompt"] or "ids" not in envelope["output"]:
        return ["replay: the receipt is private (no token ids); weights, config and tokenizer match " + str(model_dir)]
    prompt, expected = envelope["prompt"]["ids"], envelope["output"]["ids"]
    if envelope["decoding"]["sampling"] == "greedy":
        produced = _greedy(model_dir, prompt, len(expected))
        if produced != expected:
            at = next(i for i, (a, b) in enumerate(zip(produced, expected)) if a != b)
            raise ReceiptInvalid(f"replay differs at output token {at}: transformers gives {produced[at]}, "
                                 f"the receipt says {expected[at]}")
        return [f"replay: transformers (float32, one process) regenerates all {len(expected)} output tokens; "
                f"config, tokenizer and weight hashes match {model_dir}"]
    sequence = prompt + expected
    logits = _logits(model_dir, sequence)
    for position in range(len(prompt), len(sequence)):
        for decision in verified.decisions.get(position, ()):
            token = rederive(logits[position - 1], decision, position)
            if token != sequence[position]:
                raise ReceiptInvalid(
                    f"replay differs at output token {position - len(prompt)} (chunk {decision.chunk_id}): "
                    f"{explain(logits[position - 1], decision, position)} gives {token}, the receipt says "
                    f"{sequence[position]}")
    return [f"replay: transformers (float32, one process) re-derives all {len(expected)} sampled output tokens "
            f"from the recorded seed and the drafts' proposals; config, tokenizer and weight hashes match {model_dir}"]


def _params(decision: Decision) -> SamplingParams:
    spec = decision.spec
    return SamplingParams(spec.temperature, spec.top_p, spec.top_k, spec.min_p, spec.seed)


def _proposal(decision: Decision) -> Proposal | None:
    """The drafted token the tail tested at this row, with its q; None: a draw from p."""
    proposals = decision.spec.proposals
    if decision.row >= len(proposals):
        return None
    chosen = proposals[decision.row]
    return Proposal(chosen.token, tuple(chosen.ids), tuple(chosen.probs))


def rederive(logits: np.ndarray, decision: Decision, position: int) -> int:
    """The token the tail chooses at `position` from the target's logits there (the row
    that predicts it), as the decision's spec tells it to."""
    params = _params(decision)
    return choose(process(logits, params), _proposal(decision), params.seed, position)[0]


def explain(logits: np.ndarray, decision: Decision, position: int) -> str:
    """How the token at `position` is decided, with the numbers: for a reader of a mismatch."""
    params = _params(decision)
    p, proposal = process(logits, params), _proposal(decision)
    if proposal is None:
        return f"a draw from the target's p (seed {params.seed}, u {uniform(params.seed, position, Purpose.SAMPLE):.6f})"
    d = proposal.token
    q = dict(zip(proposal.ids, proposal.probs))[d] / sum(proposal.probs)
    u = uniform(params.seed, position, Purpose.ACCEPT)
    verdict = "accepted" if u * q < p[d] else "rejected, then a draw from the residual max(0, p - q)"
    return f"the test of the drafted {d} (p {p[d]:.6f}, q {q:.6f}, u {u:.6f}: {verdict})"


def _model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after the prompt (no stop at EOS: the receipt's output says where it ended)."""
    import torch

    ids = torch.tensor([prompt])
    out = _model(model_dir).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _logits(model_dir: Path, sequence: list[int]) -> np.ndarray:
    """The target's logits at every position of the sequence, in one forward pass (float64,
    as the tail's choice reads them): row t predicts the token at t + 1."""
    import torch

    with torch.no_grad():
        return _model(model_dir)(torch.tensor([sequence])).logits[0].to(torch.float64).numpy()
