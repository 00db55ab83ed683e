"""OpenTelemetry metrics, scraped by Prometheus from every node (`--metrics-listen`).

Each node has a MeterProvider and a Prometheus registry of its own, so nodes that share a
process (tests, `shard bench`) keep their numbers apart. Names follow OpenTelemetry's
GenAI semantic conventions where one exists (gen_ai.server.*, gen_ai.token.type); the rest
are shard.*. What a node already counts (frames, KV bytes, refused frames) is observed
from its own counters when scraped; what happens per generation is recorded by
GenerationMetrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from prometheus_client import CollectorRegistry, start_http_server

# Seconds, from a token on a GPU next door to a long prompt over a WAN (the conventions' own).
_SECONDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
_TOKENS_PER_TRAVERSAL = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16, 32, 64)
_RATIO = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class NodeMetrics:
    """A node's meter and, once `serve` was called, its Prometheus endpoint."""

    def __init__(self, role: str, node_id: str):
        self.registry = CollectorRegistry()
        self._provider = MeterProvider(
            metric_readers=[PrometheusMetricReader(registry=self.registry)],
            resource=Resource.create({SERVICE_NAME: f"shard-{role}", SERVICE_INSTANCE_ID: node_id}))
        self.meter = self._provider.get_meter("shard")
        self._server = None

    def serve(self, listen: str) -> int:
        """Serve /metrics on HOST:PORT (port 0: any free one); returns the port."""
        host, _, port = listen.rpartition(":")
        self._server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        return self._server.server_port

    def observe(self, name: str, read: Callable[[], Mapping[tuple, float] | float], *, unit: str,
                description: str, counter: bool = False) -> None:
        """A value read when scraped: a number, or {attributes as (key, value) pairs: number}."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            value = read()
            if isinstance(value, Mapping):
                return [Observation(v, dict(attributes)) for attributes, v in value.items()]
            return [Observation(value)]

        create = self.meter.create_observable_counter if counter else self.meter.create_observable_gauge
        create(name, callbacks=[callback], unit=unit, description=description)

    def observe_round_trips(self, rtts: Mapping[str, float]) -> None:
        """The round trip to each peer, measured (a Ping over mTLS) when it joined the plan."""
        self.observe("shard.peer.round_trip", lambda: {(("peer", p),): s for p, s in rtts.items()}, unit="s",
                     description="the round trip to each peer of the plan, measured when it joined, by peer node id")

    def observe_refused(self, rejected: Mapping[str, int]) -> None:
        """Frames the AEAD layer (and edge checks) refused, by reason (shard.wire.inbound)."""
        self.observe("shard.frames.refused", lambda: {(("reason", r),): n for r, n in rejected.items()},
                     unit="{frame}", description="inbound frames refused: forged, replayed, re-ordered or "
                     "on the wrong edge", counter=True)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._provider.shutdown()


class GenerationMetrics:
    """The coordinator's per-generation instruments."""

    def __init__(self, meter):
        self.requests = meter.create_counter(
            "shard.requests", unit="{request}", description="generations asked for, by outcome (ok, cancelled "
            "or the gRPC status they were refused or failed with)")
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="a generation from its request to its end",
            explicit_bucket_boundaries_advisory=_SECONDS)
        self.first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="from the request to its first tokens",
            explicit_bucket_boundaries_advisory=_SECONDS)
        self.per_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="inter-token latency: the gap before each batch of committed tokens, per token",
            explicit_bucket_boundaries_advisory=_SECONDS)
        self.tokens = meter.create_counter(
            "shard.tokens", unit="{token}", description="tokens in (prompt) and out (generated), by "
            "gen_ai.token.type")
        self.ring_round_trip = meter.create_histogram(
            "shard.ring.round_trip", unit="s", description="a verify chunk's traversal of the ring: from the "
            "coordinator sending it to its result back from the tail", explicit_bucket_boundaries_advisory=_SECONDS)
        self.tokens_per_traversal = meter.create_histogram(
            "shard.tokens_per_traversal", unit="{token}", description="committed tokens per ring traversal, "
            "per generation", explicit_bucket_boundaries_advisory=_TOKENS_PER_TRAVERSAL)
        self.acceptance = meter.create_histogram(
            "shard.acceptance", unit="1", description="share of drafted tokens the target accepted, per "
            "generation with a draft", explicit_bucket_boundaries_advisory=_RATIO)
        self.chunks = meter.create_counter(
            "shard.chunks", unit="{chunk}", description="verify chunks sent into the ring, and of them wasted "
            "(a rejection made them stale) and cancelled out of band, by state")
        self.replays = meter.create_counter(
            "shard.replays", unit="{replay}", description="session replays after a fail-over, by kind (full: "
            "every stage; partial: only the stages that lost the KV)")
        self.pipeline_breaks = meter.create_counter(
            "shard.pipeline_breaks", unit="{break}", description="draft rejections that emptied the pipeline")

    def start(self) -> Generation:
        return Generation(self)


class Generation:
    """One generation's clock: feed it the token batches as they are committed."""

    def __init__(self, metrics: GenerationMetrics):
        self._metrics, self._started = metrics, time.monotonic()
        self._last: float | None = None

    def committed(self, tokens: int) -> None:
        now = time.monotonic()
        if self._last is None:
            self._metrics.first_token.record(now - self._started)
        elif tokens:
            gap = (now - self._last) / tokens
            for _ in range(tokens):
                self._metrics.per_token.record(gap)
        self._last = now

    def finished(self, prompt_tokens: int, stats) -> None:
        m = self._metrics
        m.tokens.add(prompt_tokens, {"gen_ai.token.type": "input"})
        m.tokens.add(len(stats.output_ids), {"gen_ai.token.type": "output"})
        if stats.traversals:
            m.tokens_per_traversal.record(stats.tokens_per_traversal)
        if stats.proposed:
            m.acceptance.record(stats.acceptance_rate)
        for state, count in (("sent", stats.chunks_sent), ("wasted", stats.chunks_wasted),
                             ("cancelled", stats.chunks_cancelled)):
            m.chunks.add(count, {"state": state})
        m.replays.add(stats.replays - stats.partial_replays, {"kind": "full"})
        m.replays.add(stats.partial_replays, {"kind": "partial"})
        m.pipeline_breaks.add(stats.pipeline_breaks)

    def ended(self, outcome: str) -> None:
        self._metrics.requests.add(1, {"outcome": outcome})
        attributes = {"gen_ai.operation.name": "generate"}
        if outcome != "ok":
            attributes["error.type"] = outcome
        self._metrics.duration.record(time.monotonic() - self._started, attributes)
