"""What `shard generate` and `shard up` ask a coordinator for, and how they print its
answer: the request from a RequestConfig, the summary as one line or as JSON."""

from __future__ import annotations

import json
import sys

from google.protobuf.json_format import MessageToDict

from shard.config import RequestConfig
from shard.v1 import api_pb2


def build_request(config: RequestConfig) -> api_pb2.GenerateRequest:
    request = api_pb2.GenerateRequest(max_tokens=max(config.max_tokens, 0), stop_at_eos=not config.ignore_eos,
                                      draft=config.draft[0] if config.draft else "")
    if config.spec_k is not None:
        request.spec_k = config.spec_k
    if config.in_flight is not None:
        request.in_flight = config.in_flight
    for name in ("temperature", "top_p", "top_k", "min_p", "seed"):
        if getattr(config, name) is not None:
            setattr(request, name, getattr(config, name))
    request.stop.extend(config.stop)
    if config.prompt_ids:
        request.prompt_ids.ids.extend(int(i) for i in config.prompt_ids.split(","))
    elif config.chat:
        request.chat.messages.add(role="user", content=config.prompt)
    else:
        request.prompt = config.prompt
    return request


def print_generation(generation, as_json: bool, note: str = "") -> None:
    """The summary: JSON on stdout, or one line on stderr after the streamed text (with
    `note` at its end)."""
    summary = generation.summary
    if as_json:
        fields = MessageToDict(summary, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        fields["finish_reason"] = api_pb2.FinishReason.Name(summary.finish_reason)
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
