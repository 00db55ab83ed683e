"""Coordinator RPCs: the public InferenceService and the tail's ReturnService. Translate
the request into the node's plain types, call CoordinatorNode, translate its events back."""

from __future__ import annotations

import grpc

from shard.decode.speculative import Finish
from shard.errors import ShardError
from shard.node.coordinator import CoordinatorNode
from shard.telemetry import caller_context
from shard.node.generation import ChatMessage, GenerationRequest, GenerationResult, Sampling, TokenDelta
from shard.v1 import api_pb2, api_pb2_grpc, return_pb2_grpc
from shard.wire.acks import CumulativeAcks
from shard.wire.inbound import InboundError
from shard.wire.tls import require_peer


class InferenceServicer(api_pb2_grpc.InferenceServiceServicer):
    def __init__(self, node: CoordinatorNode):
        self.node = node

    async def Generate(self, request, context):
        try:
            caller = caller_context(dict(context.invocation_metadata()))
            async for event in self.node.generate(generation_request(request), caller):
                yield generate_response(event)
        except ShardError as error:
            await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata)

    async def GetStatus(self, request, context):
        node = self.node
        return api_pb2.GetStatusResponse(
            node_id=node.node_id, ready=node.ring.ready.is_set(),
            problem="" if node.ring.ready.is_set() else node.ring.problem,
            model_fingerprint=node.fingerprint, context_length=node.context_length,
            drafts=sorted(node.drafts), default_draft=node.default_draft,
            active_generations=node.admission.running, queued_generations=node.admission.queued)


def generation_request(request: api_pb2.GenerateRequest) -> GenerationRequest:
    which = request.WhichOneof("input")
    return GenerationRequest(
        max_tokens=request.max_tokens,
        prompt=request.prompt if which == "prompt" else None,
        chat=tuple(ChatMessage(m.role, m.content) for m in request.chat.messages) if which == "chat" else None,
        prompt_ids=tuple(request.prompt_ids.ids) if which == "prompt_ids" else None,
        spec_k=request.spec_k if request.HasField("spec_k") else None,
        in_flight=request.in_flight if request.HasField("in_flight") else None,
        stop_at_eos=request.stop_at_eos if request.HasField("stop_at_eos") else True,
        draft=request.draft, sampling=sampling_of(request), stop=tuple(request.stop),
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        receipt=request.receipt, receipt_private=request.receipt_private)


def sampling_of(request: api_pb2.GenerateRequest) -> Sampling:
    """The request's sampling fields; unset ones keep Sampling's defaults."""
    return Sampling(**{name: getattr(request, name) for name in Sampling.__dataclass_fields__
                       if request.HasField(name)})


_FINISH = {Finish.LENGTH: api_pb2.FINISH_REASON_LENGTH, Finish.EOS: api_pb2.FINISH_REASON_EOS,
           Finish.STOP: api_pb2.FINISH_REASON_STOP}


def generate_response(event: TokenDelta | GenerationResult) -> api_pb2.GenerateResponse:
    if isinstance(event, TokenDelta):
        delta = api_pb2.TokenDelta(ids=event.ids, text=event.text)
        for entry in event.logprobs or ():
            delta.logprobs.add(id=entry.id, logprob=entry.logprob,
                               top=[api_pb2.TopLogprob(id=i, logprob=lp) for i, lp in entry.top])
        return api_pb2.GenerateResponse(delta=delta)
    stats, seconds = event.stats, event.stats.seconds
    tokens = len(stats.output_ids)
    return api_pb2.GenerateResponse(summary=api_pb2.GenerationSummary(
        session_id=event.session_id, prompt_ids=event.prompt_ids, output_ids=stats.output_ids,
        text=event.text, finish_reason=_FINISH[stats.finish], tokens=tokens, seconds=seconds,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        acceptance_rate=stats.acceptance_rate, tokens_per_traversal=stats.tokens_per_traversal,
        traversals=stats.traversals, chunks_sent=stats.chunks_sent, chunks_wasted=stats.chunks_wasted,
        chunks_cancelled=stats.chunks_cancelled, draft_seconds=stats.draft_seconds,
        ring_seconds=stats.ring_seconds,
        coordinator_seconds=max(seconds - stats.draft_seconds - stats.ring_seconds, 0.0),
        spec_k=event.spec_k, in_flight=event.in_flight, draft_tokens=stats.proposed,
        replays=stats.replays, pipeline_breaks=stats.pipeline_breaks, partial_replays=stats.partial_replays,
        replayed_positions=stats.replayed_positions, receipt=event.receipt, seed=event.seed))


class ReturnServicer(return_pb2_grpc.ReturnServiceServicer):
    def __init__(self, node: CoordinatorNode):
        self.node = node

    async def Return(self, request_iterator, context):
        # Only the tail of the current plan may hand results back.
        tail = self.node.ring.tail_id
        peer = await require_peer(context, "stage", node_ids=[tail] if tail else None)
        acks = CumulativeAcks(context)
        try:
            async for frame in request_iterator:
                self.node.ring.deliver(frame, peer.node_id if peer else None)
                acks.taken(frame.header)
                acks.acknowledge(frame.header)
            await acks.flush()
        except InboundError as error:
            await acks.flush()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{error.reason}: {error}")
        finally:
            acks.close()
