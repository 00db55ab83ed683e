"""What one draft step costs: eager over a dynamic cache (the draft as it ran before), eager
over the static cache, and the static step replayed as a CUDA graph, of the layers as they
are and of the layers compiled by torch.compile (what a draft on a GPU runs), on a
random-weight model built in memory (nothing written to disk); and many sessions' steps
through graphed slots of their own against one graphed pool. For `shard bench gpu`.

A step is timed inside `propose`, as the coordinator calls it: a session reads a prompt
once, then proposes `steps` tokens from the same position again and again (a rollback
each time, so every repeat runs at the same positions), the host waiting for the tokens
at the end of each proposal as the coordinator does."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shard.decode.draft import ModelDraft

# A Llama-3.2-1B-shaped model.
ONE_B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096)


def random_llama(shape: dict, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """A llama of `shape` with random weights, made on `device` directly."""
    config = AutoConfig.for_model("llama", **shape, tie_word_embeddings=False, bos_token_id=None,
                                  eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.requires_grad_(False).eval()


def draft_step_bench(*, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, shape: dict = ONE_B,
                     context: int = 128, steps: int = 32, repeats: int = 7, model=None) -> dict:
    """Milliseconds per draft step (the median of `repeats` proposals of `steps` tokens after a
    `context`-token prompt) for each way of stepping, and whether they proposed the same tokens.
    On a CPU there is no graph: `graphed_ms` (compiled) is None. With `model`, that model is timed
    instead of a random one of `shape` (one-process graphed decode of a target)."""
    model = model if model is not None else random_llama(shape, device, dtype)
    shape = {key: getattr(model.config, key) for key in ONE_B}
    on_gpu = model.device.type == "cuda"
    drafts = {"eager": ModelDraft(model, name="eager", slots=0),
              "static_eager": ModelDraft(model, name="static", slots=1, capture=False, compiled=False)}
    if on_gpu:
        drafts["graphed_uncompiled"] = ModelDraft(model, name="graphed", slots=1, capture=True, compiled=False)
        drafts["compiled_eager"] = ModelDraft(model, name="compiled", slots=1, capture=False, compiled=True)
        began = time.perf_counter()
        drafts["graphed"] = ModelDraft(model, name="graphed compiled", slots=1, capture=True, compiled=True)
        compile_seconds = time.perf_counter() - began
    prompt = torch.randint(0, shape["vocab_size"], (context,), generator=torch.Generator().manual_seed(1)).tolist()
    timings, proposals = {}, {}
    for label, draft in drafts.items():
        session = draft.session()
        proposals[label] = session.propose(prompt, steps)  # reads the prompt; also the warm-up
        seconds = []
        for _ in range(repeats):
            began = time.perf_counter()
            session.propose(prompt, steps)  # rolls back to the prompt, then steps again
            seconds.append(time.perf_counter() - began)
        session.close()
        timings[label] = statistics.median(seconds) / steps * 1e3
    eager, graphed = timings["eager"], timings.get("graphed")
    return {
        "device": torch.cuda.get_device_name(model.device) if on_gpu else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": dict(shape),
        "context": context,
        "steps": steps,
        "eager_ms": eager,
        "static_eager_ms": timings["static_eager"],
        "graphed_uncompiled_ms": timings.get("graphed_uncompiled"),
        "graphed_ms": graphed,
        "graphed_speedup": eager / graphed if graphed else None,
        "compile_and_capture_seconds": compile_seconds if on_gpu else None,
        # Graph replay runs the eager step's very kernels: its tokens must match.
        "graphed_equals_static_eager": (proposals["graphed_uncompiled"] == proposals["static_eager"]
                                        if on_gpu else None),
        "compiled_graph_equals_compiled_eager": proposals["graphed"] == proposals["compiled_eager"] if on_gpu else None,
        "static_equals_dynamic": proposals["static_eager"] == proposals["eager"],
    }


def draft_batch_bench(*, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, shape: dict = ONE_B,
                      sessions: int = 16, context: int = 128, steps: int = 16, repeats: int = 5,
                      compiled: bool | None = None) -> dict:
    """`sessions` sessions proposing `steps` tokens at once, each from a prompt of its own, in
    threads of their own as the coordinator runs them: through graphed slots of their own (one
    graph replay per session and step, each on its own stream) against the rows of one graphed
    pool (one replay per step for all of them); and one session alone in each. Milliseconds
    per step (the median round's wall time over `steps`) and the draft tokens per second."""
    model = random_llama(shape, device, dtype)
    capture = model.device.type == "cuda"
    drafts = {"slots": ModelDraft(model, name="slots", slots=sessions, batch=1, capture=capture, compiled=compiled),
              "pool": ModelDraft(model, name="pool", slots=sessions, batch=sessions, capture=capture,
                                 compiled=compiled)}
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, shape["vocab_size"], (context,), generator=generator).tolist()
               for _ in range(sessions)]
    result = {"device": torch.cuda.get_device_name(model.device) if capture else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "sessions": sessions, "context": context, "steps": steps}
    for label, draft in drafts.items():
        drafting = [draft.session() for _ in range(sessions)]
        with ThreadPoolExecutor(sessions) as threads:
            def round_of(count: int) -> float:
                began = time.perf_counter()
                list(threads.map(lambda i: drafting[i].propose(prompts[i], steps), range(count)))
                return time.perf_counter() - began

            round_of(sessions)  # reads the prompts; also the warm-up
            alone = statistics.median(round_of(1) for _ in range(repeats))
            together = statistics.median(round_of(sessions) for _ in range(repeats))
        for session in drafting:
            session.close()
        result[f"{label}_alone_ms"] = alone / steps * 1e3
        result[f"{label}_together_ms"] = together / steps * 1e3
        result[f"{label}_tokens_per_second"] = sessions * steps / together
    result["pool_over_slots_together"] = result["pool_tokens_per_second"] / result["slots_tokens_per_second"]
    result["pool_alone_over_slot_alone"] = result["pool_alone_ms"] / result["slots_alone_ms"]
    return result
