"""OpenTelemetry over the real services: every traversal is a span at the coordinator with
a child span at each stage it crossed, the trace context riding in the sealed frame header;
with the standard OTEL_* variables set, separate processes export them over OTLP."""

import asyncio
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shard.client import generate
from shard.local import LocalSwarm
from shard.v1 import api_pb2, api_pb2_grpc
from shard.wire.tls import open_channel

from support.reference import reference_greedy
from support.swarm import inprocess_swarm

PROMPT = [1, 415, 1022, 264, 727]
TOKENS = 6


def request(**extra):
    return api_pb2.GenerateRequest(prompt_ids=api_pb2.TokenIds(ids=PROMPT),
                                           max_tokens=TOKENS, stop_at_eos=False, **extra)


@pytest.fixture(scope="module")
def spans():
    """This process's tracer provider, recording into memory (set once per process)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def test_each_traversal_has_a_child_span_at_every_stage(tinystories_dir, tmp_path, spans):
    spans.clear()

    async def run():
        async with inprocess_swarm(tinystories_dir, 2, tmp_path) as swarm:
            return await generate(swarm.coordinator.address, swarm.tls(), request(draft="none"))

    generation = asyncio.run(run())
    assert list(generation.summary.output_ids) == reference_greedy(tinystories_dir, PROMPT, TOKENS)
    finished = spans.get_finished_spans()
    [root] = [s for s in finished if s.name == "shard.generate"]
    traversals = [s for s in finished if s.name == "shard.traversal"]
    hops = [s for s in finished if s.name == "shard.stage"]
    assert root.attributes["shard.tokens"] == TOKENS
    assert len(traversals) == generation.summary.chunks_sent == TOKENS
    for traversal in traversals:
        assert traversal.parent.span_id == root.context.span_id
        assert traversal.context.trace_id == root.context.trace_id
        children = [h for h in hops if h.parent.span_id == traversal.context.span_id]
        assert sorted(h.attributes["shard.node"] for h in children) == ["stage-0", "stage-1"]
        for hop in children:
            assert hop.context.trace_id == traversal.context.trace_id
            assert traversal.start_time <= hop.start_time <= hop.end_time <= traversal.end_time
            assert hop.attributes["shard.chunk"] == traversal.attributes["shard.chunk"]


def test_a_callers_traceparent_becomes_the_parent_of_the_generation(tinystories_dir, tmp_path, spans):
    """Over gRPC (metadata) and over the HTTP front (header): the caller's trace holds
    shard.generate, and its traversals below it."""
    spans.clear()
    caller = trace.get_tracer("caller")

    async def run():
        async with inprocess_swarm(tinystories_dir, 2, tmp_path, coordinator_args=[
                "--http-listen", "127.0.0.1:0"]) as swarm:
            parents = []
            with caller.start_as_current_span("caller.grpc") as parent:
                carrier = {}
                propagate.inject(carrier)
                parents.append(parent)
                async with open_channel(swarm.coordinator.address, swarm.tls()) as channel:
                    calls = api_pb2_grpc.InferenceServiceStub(channel).Generate(
                        request(draft="none"), metadata=tuple(carrier.items()))
                    [_ async for _ in calls]
            with caller.start_as_current_span("caller.http") as parent:
                carrier = {"content-type": "application/json"}
                propagate.inject(carrier)
                parents.append(parent)
                body = json.dumps({"model": tinystories_dir.name, "prompt": PROMPT, "max_tokens": TOKENS,
                                   "temperature": 0}).encode()
                http = urllib.request.Request(f"http://{swarm.coordinator.http_address}/v1/completions",
                                              data=body, headers=carrier)
                await asyncio.to_thread(lambda: urllib.request.urlopen(http, timeout=60).read())
            return parents

    parents = asyncio.run(run())
    finished = spans.get_finished_spans()
    generations = [s for s in finished if s.name == "shard.generate"]
    assert len(generations) == 2
    for parent, generation in zip(parents, generations):
        assert generation.parent.span_id == parent.get_span_context().span_id
        assert generation.context.trace_id == parent.get_span_context().trace_id
        traversals = [s for s in finished if s.name == "shard.traversal"
                      and s.parent.span_id == generation.context.span_id]
        assert traversals and all(t.context.trace_id == parent.get_span_context().trace_id for t in traversals)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC endpoint that keeps what it is sent."""

    def __init__(self):
        self.requests = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def services(self) -> set[tuple[str, str]]:
        """(service.name, service.instance.id) of every resource that sent spans."""
        return {tuple(next((a.value.string_value for a in r.resource.attributes if a.key == key), "")
                      for key in ("service.name", "service.instance.id"))
                for request in self.requests for r in request.resource_spans}

    def spans(self) -> list[tuple[str, object]]:
        """(service name, span) for every span received."""
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                out += [(service, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return out


def test_processes_export_their_spans_over_otlp(tinystories_dir, tmp_path, monkeypatch):
    collector = Collector()
    # A thread-pool server: it must keep serving while the launcher blocks on the nodes.
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    try:
        with LocalSwarm(tinystories_dir, 2, workdir=tmp_path, logs_to_files=True, device="cpu") as swarm:
            asyncio.run(generate(swarm.coordinator_address, swarm.client_tls(), request(draft="none"),
                                 wait_ready_seconds=120))
        # Stopping the nodes flushed their spans.
    finally:
        server.stop(None)
    assert collector.services() >= {("shard-coordinator", "coordinator"), ("shard-stage", "stage-0"),
                                    ("shard-stage", "stage-1")}
    received = collector.spans()
    traversals = {s.span_id: s for service, s in received if service == "shard-coordinator"
                  and s.name == "shard.traversal"}
    hops = [s for service, s in received if service == "shard-stage" and s.name == "shard.stage"]
    assert len(traversals) == TOKENS
    for traversal in traversals.values():
        children = [h for h in hops if h.parent_span_id == traversal.span_id]
        assert len(children) == 2 and all(h.trace_id == traversal.trace_id for h in children)
