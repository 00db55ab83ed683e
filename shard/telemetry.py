"""Traces: a span per generation and per traversal at the coordinator, and a child of the
traversal's span at every stage hop. The W3C trace context travels in the frame header,
where the AEAD layer authenticates it with the rest of the header.

Spans are exported over OTLP (gRPC) when the standard variables name a collector
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; the exporter reads the
rest of the OTEL_* settings itself). Otherwise the API's no-op tracer stands in: nothing is
recorded and no context is put on the wire."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context

from shard.v1 import frame_pb2

tracer = trace.get_tracer("shard")
log = logging.getLogger(__name__)


def configure_tracing(service_name: str, instance_id: str = ""):
    """Install an OTLP-exporting tracer provider if the environment asks for one; returns
    it (call its shutdown() on the way out to flush), or None. `instance_id` (the node id)
    tells apart the nodes of one service."""
    wanted = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not wanted or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME, when set, names the service instead (Resource.create reads it).
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    if instance_id:
        attributes[SERVICE_INSTANCE_ID] = instance_id
    # Flushed by shutdown_tracing, not at exit, where nothing bounds how long it takes.
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing(provider, timeout: float = 3.0) -> bool:
    """Flush the spans still batched, but never hold a node's exit up for long: with its
    collector down, the exporter would keep retrying for its whole timeout (OTLP's default:
    10 s a batch). Returns whether the flush finished in time."""
    flush = threading.Thread(target=provider.shutdown, name="flush-spans", daemon=True)
    flush.start()
    flush.join(timeout)
    if flush.is_alive():
        log.warning("spans not flushed within %.0f s (is the OTLP collector reachable?): dropped", timeout)
        return False
    return True


def caller_context(carrier: Mapping[str, str]) -> Context | None:
    """The caller's trace context from its W3C `traceparent` (gRPC metadata or HTTP
    headers, lower-case keys), or None: a generation's span then joins the caller's trace."""
    if "traceparent" not in carrier:
        return None
    return propagate.extract({key: carrier[key] for key in ("traceparent", "tracestate") if key in carrier})


def put_context(header: frame_pb2.FrameHeader, span: trace.Span) -> None:
    """Carry `span`'s context in the header, if it is being recorded."""
    if not span.is_recording():
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    header.traceparent = carrier.get("traceparent", "")
    header.tracestate = carrier.get("tracestate", "")


def context_of(header: frame_pb2.FrameHeader) -> Context | None:
    """The trace context a frame carries, or None."""
    if not header.traceparent:
        return None
    return propagate.extract({"traceparent": header.traceparent, "tracestate": header.tracestate})


async def in_span(span: trace.Span, awaitable):
    """Await `awaitable` with `span` current, in the task that runs this (so spans started
    below it are its children); a failure marks the span."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        return await awaitable
    except Exception as error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        raise
    finally:
        otel_context.detach(token)
