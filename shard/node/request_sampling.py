"""A generation request's sampling options, checked: what the coordinator serves exactly
(temperature, top-p, top-k, min-p, seed, stop strings, logprobs) and what it refuses."""

from __future__ import annotations

import math
import secrets

import grpc

from shard.decode.sampling import SamplingParams
from shard.errors import ShardError
from shard.node.generation import GenerationRequest, Sampling
from shard.node.tail_sampling import MAX_LOGPROBS, ChunkSampling, check_params

MAX_STOPS = 4
MAX_STOP_CHARS = 256


def check_sampling(request: GenerationRequest, *, has_tokenizer: bool) -> None:
    """INVALID_ARGUMENT for a value out of range; UNIMPLEMENTED for what cannot be exact."""
    s = request.sampling
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    try:
        check_params(SamplingParams(s.temperature, s.top_p, s.top_k, s.min_p))
    except ValueError as error:
        raise ShardError(invalid, str(error)) from None
    if s.greedy and (s.top_p, s.top_k, s.min_p) != (1.0, 0, 0.0):
        raise ShardError(invalid, "top_p, top_k and min_p need a temperature above 0 (0 is greedy)")
    if not (math.isfinite(s.repetition_penalty) and 0.5 <= s.repetition_penalty <= 2.0) or not all(
            math.isfinite(v) and -2.0 <= v <= 2.0 for v in (s.presence_penalty, s.frequency_penalty)):
        raise ShardError(invalid, "repetition_penalty must lie in [0.5, 2], presence_penalty and "
                                  "frequency_penalty in [-2, 2]")
    if (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) != (1.0, 0.0, 0.0):
        # A penalty depends on the tokens before each position; the tail, which chooses the
        # tokens, sees only hidden states, and under speculation the drafted tokens too.
        raise ShardError(grpc.StatusCode.UNIMPLEMENTED,
                         "repetition, presence and frequency penalties are not served: the tail that "
                         "samples cannot apply them exactly; leave them unset")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise ShardError(invalid, f"logprobs must lie in [0, {MAX_LOGPROBS}]")
    if request.stop:
        if len(request.stop) > MAX_STOPS or not all(1 <= len(stop) <= MAX_STOP_CHARS for stop in request.stop):
            raise ShardError(invalid, f"give at most {MAX_STOPS} stop strings of 1 to {MAX_STOP_CHARS} characters")
        if not has_tokenizer:
            raise ShardError(grpc.StatusCode.FAILED_PRECONDITION,
                             "stop strings match text: this model has no tokenizer")


def chunk_sampling(sampling: Sampling, logprobs: int | None) -> ChunkSampling | None:
    """How the tail is to choose every chunk's tokens; None for greedy argmax ids. An unset
    seed is drawn here, once per generation, so every chunk (and any replay) uses the same."""
    if sampling.greedy and logprobs is None:
        return None
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(64)
    params = SamplingParams(sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p,
                            0 if sampling.greedy else seed)
    return ChunkSampling(params, logprobs=logprobs)
