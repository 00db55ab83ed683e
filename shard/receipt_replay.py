"""`shard receipt verify --replay MODEL_DIR`: the check of the computation itself. The
signatures and chains of a receipt prove who handed what to whom; only computing again
shows that the tokens are what the model gives. Regenerates the output greedily with
transformers in one process (float32, on the CPU), and checks that the model folder is the
one the receipt names: its config, tokenizer and every attested block's weight hashes."""

from __future__ import annotations

from pathlib import Path

from shard.model.checkpoint import config_fingerprint
from shard.model.fingerprints import block_weights_sha256, tokenizer_sha256
from shard.receipt import ReceiptInvalid, Verified


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
    if envelope["decoding"].get("sampling") != "greedy":
        raise ReceiptInvalid("only greedy runs can be replayed")
    if "ids" not in envelope["prompt"] or "ids" not in envelope["output"]:
        return ["replay: the receipt is private (no token ids); weights, config and tokenizer match " + str(model_dir)]
    expected = envelope["output"]["ids"]
    produced = _greedy(model_dir, envelope["prompt"]["ids"], len(expected))
    if produced != expected:
        at = next(i for i, (a, b) in enumerate(zip(produced, expected)) if a != b)
        raise ReceiptInvalid(f"replay differs at output token {at}: transformers gives {produced[at]}, "
                             f"the receipt says {expected[at]}")
    return [f"replay: transformers (float32, one process) regenerates all {len(expected)} output tokens; "
            f"config, tokenizer and weight hashes match {model_dir}"]


def _greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after the prompt (no stop at EOS: the receipt's output says where it ended)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
