"""Prometheus metrics on their own registry, and the ``GET /metrics`` page.

Counters and histograms are fed by the gateway (one :class:`Completed` per request), the health
checker and model sync; in-flight requests, queue depths and backend health are read from live
state at scrape time. Label children are cached per label tuple so a request costs a few dict
lookups and the increments themselves.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.server import Request

from ollamaflow import modelnames
from ollamaflow.admin.errors import write_error
from ollamaflow.catalog import Catalog, Registry
from ollamaflow.gateway.completed import Completed
from ollamaflow.records import Backend
from ollamaflow.runtime import Runtime
from ollamaflow.services.inventory import ModelInventory

#: Seconds, for time to first byte, whole requests and queue waits: 5 ms to 2 minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
#: Seconds, for health checks: 1 ms to 10 s.
CHECK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: Tokens per second of one generation.
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)

#: Label values for a request no backend served, and one that named no model.
NONE = "none"
#: The model label of a model no backend's inventory lists (bounds the label's cardinality).
OTHER = "other"


@attrs.define(eq=False)
class KnownModels:
    """``model → display name`` for the models some configured backend lists, else None.

    Rebuilt lazily after an inventory refresh or a configuration change, so a lookup is one
    ``str.lower`` and one dict lookup. Expects names in display form (as in :class:`Completed`).
    """

    registry: Registry
    inventory: ModelInventory
    _names: dict[str, str] | None = None

    def __attrs_post_init__(self) -> None:
        self.inventory.add_listener(self._changed)
        self.registry.subscribe(self._changed)

    def _changed(self, _what: str | Catalog) -> None:
        self._names = None

    def __call__(self, model: str) -> str | None:
        names = self._names
        if names is None:
            names = self._names = self._collect()
        return names.get(model.lower())

    def _collect(self) -> dict[str, str]:
        names: dict[str, str] = {}
        for identifier in self.registry.catalog.backends:
            for key, entry in self.inventory.entries(identifier).items():
                if key in names:
                    continue
                name = entry.get("name") or entry.get("model") or key
                try:
                    names[key] = modelnames.display(str(name))
                except modelnames.InvalidModelName:
                    names[key] = key
        return names


@attrs.frozen
class Fleet:
    """The live state read at scrape time: configured backends and frontends, and queues."""

    registry: Registry
    runtime: Runtime
    queue_depth: Callable[[str], int]


class _LiveCollector:
    """Scrape-time gauges: in-flight requests, queue depths, backend health."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self.fleet
        catalog = fleet.registry.catalog
        states = fleet.runtime.states
        in_flight = GaugeMetricFamily(
            "ollamaflow_in_flight_requests",
            "Requests holding a slot on the backend right now.",
            labels=["backend"],
        )
        healthy = GaugeMetricFamily(
            "ollamaflow_backend_healthy",
            "1 if the backend is healthy, else 0.",
            labels=["backend"],
        )
        for identifier in catalog.backends:
            state = states.get(identifier)
            in_flight.add_metric([identifier], state.active_requests if state else 0)
            healthy.add_metric([identifier], 1 if state is not None and state.healthy else 0)
        depth = GaugeMetricFamily(
            "ollamaflow_queue_depth",
            "Requests waiting in the frontend's queue for a backend slot.",
            labels=["frontend"],
        )
        for identifier in catalog.frontends:
            depth.add_metric([identifier], fleet.queue_depth(identifier))
        yield from (in_flight, depth, healthy)


class Metrics:
    """Every OllamaFlow metric, on its own :class:`CollectorRegistry`; a gateway observer."""

    def __init__(
        self,
        *,
        known_model: Callable[[str], str | None] = lambda _model: None,
        fleet: Fleet | None = None,
    ) -> None:
        self.known_model = known_model
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "ollamaflow_requests_total",
            "Client requests finished, by frontend, backend, model and status.",
            ["frontend", "backend", "model", "status"],
            registry=registry,
        )
        self.retries = Counter(
            "ollamaflow_retries_total",
            "Attempts retried on another backend.",
            ["frontend"],
            registry=registry,
        )
        self.disconnects = Counter(
            "ollamaflow_client_disconnects_total",
            "Requests whose client went away before the answer was complete.",
            ["frontend"],
            registry=registry,
        )
        self.ttfb = Histogram(
            "ollamaflow_ttfb_seconds",
            "Seconds from the request's arrival to the first byte of the backend's answer.",
            ["frontend", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "ollamaflow_request_duration_seconds",
            "Seconds from the request's arrival to its last byte.",
            ["frontend", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "ollamaflow_queue_wait_seconds",
            "Seconds a request waited in its frontend's queue for a backend slot.",
            ["frontend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "ollamaflow_tokens_generated_total",
            "Tokens generated, from the final message of completions (eval_count).",
            ["backend", "model"],
            registry=registry,
        )
        self.rate = Histogram(
            "ollamaflow_tokens_per_second",
            "Generation speed of completions (eval_count / eval_duration).",
            ["backend", "model"],
            buckets=RATE_BUCKETS,
            registry=registry,
        )
        self.checks = Histogram(
            "ollamaflow_health_check_seconds",
            "Health check latency, by backend and result (ok or failure).",
            ["backend", "result"],
            buckets=CHECK_BUCKETS,
            registry=registry,
        )
        self.pulls = Counter(
            "ollamaflow_pulls_total",
            "Model pulls finished, by backend and result (success or failure).",
            ["backend", "result"],
            registry=registry,
        )
        if fleet is not None:
            registry.register(_LiveCollector(fleet))
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _model(self, model: str | None) -> str:
        if model is None:
            return NONE
        return self.known_model(model) or OTHER

    def __call__(self, c: Completed) -> None:
        """Count one finished client request."""
        child = self._child
        frontend = c.frontend
        backend = c.backend or NONE
        model = self._model(c.model)
        child(self.requests, frontend, backend, model, str(c.status)).inc()
        if c.retries:
            child(self.retries, frontend).inc(c.retries)
        if c.outcome == "client_gone":
            child(self.disconnects, frontend).inc()
        if c.backend is not None or c.queued:
            child(self.queue_wait, frontend).observe(c.queued)
        if c.ttfb is not None:
            child(self.ttfb, frontend, backend).observe(c.ttfb)
        child(self.duration, frontend, backend).observe(c.duration)
        if c.eval_count:
            child(self.tokens, backend, model).inc(c.eval_count)
            rate = c.tokens_per_second
            if rate is not None:
                child(self.rate, backend, model).observe(rate)

    def health_checked(self, backend: Backend, ok: bool, seconds: float) -> None:
        """A health check finished (the health checker's ``on_check`` hook)."""
        self._child(self.checks, backend.identifier, "ok" if ok else "failure").observe(seconds)

    def pull_done(self, backend_id: str, model: str, ok: bool) -> None:
        """A model pull finished (model sync's ``on_pull_done`` hook)."""
        self._child(self.pulls, backend_id, "success" if ok else "failure").inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return bytes(generate_latest(self.registry))


@attrs.define(eq=False)
class MetricsPage:
    """Renders ``GET /metrics``; with a ``token``, only for ``Authorization: Bearer <token>``."""

    metrics: Metrics
    token: str | None = attrs.field(default=None, repr=False)

    def render(self, request: Request) -> bytes:
        if self.token is not None and not self._authorized(request):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="metrics"')
            return write_error(request, 401, "GET /metrics needs Authorization: Bearer <token>")
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.exposition()

    def _authorized(self, request: Request) -> bool:
        assert self.token is not None
        given = request.getHeader(b"authorization") or b""
        scheme, _, credential = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            credential.strip(), self.token.encode()
        )
