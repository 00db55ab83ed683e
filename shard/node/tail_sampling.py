"""Sampled chunks on the wire: the SamplingSpec the coordinator puts in a chunk's header
for the tail, the tail's choice of tokens from its logits, and the ChunkChoices it returns.
The decisions themselves are shard.decode.sampling's, the same functions the draft runs."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from shard.decode.sampling import (Chosen, Proposal, SamplingParams, TokenLogprob, check_proposal, choose,
                                   log_probs, process, report)
from shard.errors import ShardError
from shard.v1 import frame_pb2

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class ChunkSampling:
    """How the tail chooses one chunk's tokens. `logprobs`: alternatives reported with each
    chosen token's logprob; None reports none."""

    params: SamplingParams
    proposals: tuple[Proposal, ...] = ()
    logprobs: int | None = None
    # A receipt's session: sha256 of the spec as the tail opened it, named in its answer.
    spec_sha256: bytes = b""


def encode_spec(sampling: ChunkSampling) -> bytes:
    p = sampling.params
    spec = frame_pb2.SamplingSpec(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, seed=p.seed,
        want_logprobs=sampling.logprobs is not None, logprobs=sampling.logprobs or 0)
    for proposal in sampling.proposals:
        spec.proposals.add(token=proposal.token, ids=proposal.ids, probs=proposal.probs)
    return spec.SerializeToString()


def parse_spec(data: bytes, *, vocab_size: int, num_outputs: int, receipt: bool = False) -> ChunkSampling:
    """The tail's reading of a chunk's spec; INVALID_ARGUMENT for one it cannot act on exactly.
    `receipt`: the session keeps a receipt, so the answer names the spec by its hash."""
    try:
        spec = frame_pb2.SamplingSpec.FromString(data)
        params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                                min_p=spec.min_p, seed=spec.seed)
        check_params(params)
        if spec.logprobs > MAX_LOGPROBS:
            raise ValueError(f"logprobs must lie in [0, {MAX_LOGPROBS}]")
        proposals = tuple(Proposal(p.token, tuple(p.ids), tuple(p.probs)) for p in spec.proposals)
        if len(proposals) >= max(num_outputs, 1):
            raise ValueError(f"{len(proposals)} proposals for {num_outputs} outputs: at most one fewer")
        if proposals and params.greedy:
            raise ValueError("a greedy chunk carries no proposals: the coordinator compares argmaxes")
        for proposal in proposals:
            check_proposal(proposal, vocab_size)
    except (DecodeError, ValueError) as error:
        raise ShardError(grpc.StatusCode.INVALID_ARGUMENT, f"bad sampling spec: {error}") from None
    return ChunkSampling(params, proposals, spec.logprobs if spec.want_logprobs else None,
                         hashlib.sha256(data).digest() if receipt else b"")


def check_params(params: SamplingParams) -> None:
    """ValueError for processing that is not a distribution."""
    if not (math.isfinite(params.temperature) and 0.0 <= params.temperature <= 2.0):
        raise ValueError("temperature must lie in [0, 2]")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError("top_p must lie in (0, 1]")
    if params.top_k < 0:
        raise ValueError("top_k must be at least 0 (0: no limit)")
    if not 0.0 <= params.min_p < 1.0:
        raise ValueError("min_p must lie in [0, 1)")


def choose_tokens(logits: torch.Tensor, sampling: ChunkSampling, first_position: int) -> Chosen:
    """The tokens for a chunk's output rows (`logits` [outputs, vocab]; row i chooses the
    token at first_position + i). Greedy: every row's argmax, as the coordinator compares
    them with its drafts. Sampled: accept drafted tokens while the test passes, then one
    correction or bonus token, then stop: later rows followed a token that is not final."""
    rows = logits.to(torch.float64).cpu().numpy()
    params, ids, reported = sampling.params, [], []
    for i, row in enumerate(rows):
        position = first_position + i
        if params.greedy:
            token, go_on = int(torch.as_tensor(row).argmax()), True
        else:
            proposal = sampling.proposals[i] if i < len(sampling.proposals) else None
            token, go_on = choose(process(row, params), proposal, params.seed, position)
        ids.append(token)
        if sampling.logprobs is not None:
            reported.append(report(log_probs(row, params), token, sampling.logprobs))
        if not go_on:
            break
    return Chosen(ids, reported if sampling.logprobs is not None else None)


def encode_choices(chosen: Chosen, spec_sha256: bytes = b"") -> bytes:
    out = frame_pb2.ChunkChoices(ids=chosen.ids, spec_sha256=spec_sha256)
    for entry in chosen.logprobs or ():
        out.logprobs.add(logprob=entry.logprob, top_ids=[i for i, _ in entry.top],
                         top_logprobs=[lp for _, lp in entry.top])
    return out.SerializeToString()


def parse_choices(payload: bytes) -> Chosen:
    """The tail's answer; logprobs None when it sent none (the spec asked for none)."""
    choices = frame_pb2.ChunkChoices.FromString(payload)
    ids = list(choices.ids)
    if not choices.logprobs:
        return Chosen(ids)
    if len(choices.logprobs) != len(ids):
        raise ValueError(f"{len(choices.logprobs)} logprobs for {len(ids)} ids")
    return Chosen(ids, [TokenLogprob(i, entry.logprob, tuple(zip(entry.top_ids, entry.top_logprobs)))
                        for i, entry in zip(ids, choices.logprobs)])
