"""What `shard generate` and `shard up` ask a coordinator for, and how they print its
answer: the request from a RequestConfig, the summary as one line or as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from shard.client import build_generate_request
from shard.config import RequestConfig
from shard.v1 import api_pb2


def request_options(config: RequestConfig) -> dict:
    """The request as keyword arguments of shard.client.build_generate_request."""
    options = dict(max_tokens=max(config.max_tokens, 0), stop_at_eos=not config.ignore_eos,
                   draft=config.draft[0] if config.draft else "", spec_k=config.spec_k, in_flight=config.in_flight,
                   receipt=config.receipt is not None, receipt_private=config.receipt_private,
                   temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, min_p=config.min_p,
                   seed=config.seed, stop=config.stop or None)
    if config.prompt_ids:
        return {**options, "prompt_ids": [int(i) for i in config.prompt_ids.split(",")]}
    if config.chat:
        return {**options, "chat": [("user", config.prompt)]}
    return {**options, "prompt": config.prompt}


def build_request(config: RequestConfig) -> api_pb2.GenerateRequest:
    return build_generate_request(**request_options(config))


def write_receipt(generation, config: RequestConfig, ca: Path) -> None:
    """Write the signed receipt where --receipt says, and say on stderr how to check it
    (`ca`: the deployment's CA certificate)."""
    if config.receipt is None:
        return
    Path(config.receipt).write_text(generation.summary.receipt + "\n")
    print(f"receipt written to {config.receipt}; check it with: shard receipt verify {config.receipt} --ca {ca}",
          file=sys.stderr)


def print_generation(generation, as_json: bool, note: str = "") -> None:
    """The summary of a generation (anything with a `summary`): JSON on stdout, or one line on stderr after the streamed text (with
    `note` at its end)."""
    summary = generation.summary
    if as_json:
        fields = MessageToDict(summary, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        fields["finish_reason"] = api_pb2.FinishReason.Name(summary.finish_reason)
        fields.pop("receipt", None)  # written to its own file (--receipt)
        print(json.dumps(fields))
    else:
        print(file=sys.stderr)
        print(f"[{summary.tokens} tokens in {summary.seconds:.2f} s: {summary.tokens_per_second:.1f} tok/s, "
              f"K={summary.spec_k} W={summary.in_flight}, acceptance {summary.acceptance_rate:.2f}, "
              f"{summary.tokens_per_traversal:.2f} tokens per traversal, chunks sent/wasted/cancelled "
              f"{summary.chunks_sent}/{summary.chunks_wasted}/{summary.chunks_cancelled}; time draft "
              f"{summary.draft_seconds:.2f} s, ring {summary.ring_seconds:.2f} s, coordinator "
              f"{summary.coordinator_seconds:.2f} s; "
              f"{api_pb2.FinishReason.Name(summary.finish_reason)}"
              f"{f', seed {summary.seed}' if summary.HasField('seed') else ''}{note}]", file=sys.stderr)
