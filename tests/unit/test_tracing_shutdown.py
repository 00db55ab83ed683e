"""A node's exit with tracing on: the spans still batched are flushed, but a collector that
is down does not hold the exit up for the exporter's whole retry timeout."""

import socket
import time

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shard.telemetry import shutdown_tracing


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_an_unreachable_collector_does_not_hold_up_the_exit():
    provider = TracerProvider(shutdown_on_exit=False)
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{closed_port()}", insecure=True, timeout=30)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    provider.get_tracer("test").start_span("batched").end()
    started = time.monotonic()
    assert shutdown_tracing(provider, timeout=1.0) is False
    assert time.monotonic() - started < 5  # not the exporter's 30 s of retries


def test_a_reachable_exporter_is_flushed():
    provider = TracerProvider(shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    provider.get_tracer("test").start_span("batched").end()
    assert shutdown_tracing(provider) is True
    assert [span.name for span in exporter.get_finished_spans()] == ["batched"]
