"""A whole causal LM in one process (a benchmark's reference, a draft), from a real
checkpoint or a dummy-weight folder alike."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from shard.model.checkpoint import Checkpoint
from shard.model.dummy import is_dummy


def load_causal_lm(model_dir, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model on `device` in `dtype`, in eval mode without gradients. Dummy weights are
    made on the device itself (the model is built on the meta device, then each tensor
    made in place), so an 8B-shaped reference never passes through host memory."""
    if not is_dummy(model_dir):
        model = AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=dtype).to(device)
        return model.requires_grad_(False).eval()
    checkpoint = Checkpoint.open(model_dir)
    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(checkpoint.config, dtype=dtype)
    # As Block.load: made in the stored dtype, then cast to the parameter's, so a stage and
    # this see the same values.
    meta = model.state_dict()
    state = {name: tensor.to(meta[name].dtype)
             for name, tensor in checkpoint.iter_tensors(checkpoint.tensor_names, device)}
    try:
        model.load_state_dict(state, strict=not checkpoint.config.tie_word_embeddings, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{checkpoint.path}: dummy weights do not fit {type(model).__name__}: {e}") from e
    if checkpoint.config.tie_word_embeddings:
        model.tie_weights()
    # Computed buffers (rotary inv_freq) are not in the state dict: rebuild them for real.
    for module_name, module in list(model.named_modules()):
        if "RotaryEmbedding" in type(module).__name__:
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, type(module)(config=module.config).to(device))
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"{checkpoint.path}: tensors not made: {on_meta[:8]}")
    return model.requires_grad_(False).eval()
