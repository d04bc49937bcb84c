"""Prometheus metrics on their own registry, and the ``GET /metrics`` page.

Counters and histograms are fed by the gateway (one :class:`Completed` per request), the health
checker and model sync, and aggregated in plain Python (see :class:`_Family`) so a request costs
a few dict lookups and float additions; in-flight requests, queue depths, backend health and
client connections (open, and refused by ``Webserver.MaxConnections``) are read from live state at
scrape time.

The per-API-key families are labelled with the key's identifier (``anonymous`` or ``admin``
without one), so their cardinality grows with the number of keys, never with what clients send:
the model label is bounded as for the other families, and to :data:`MODELS_PER_KEY` per key.
A deleted key's series stay until :meth:`Metrics.forget_keys` is called (else until restart).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence, Sized
from itertools import accumulate
from typing import Protocol

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client import metrics as client_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString
from twisted.web.server import Request

from ollamaflow import modelnames
from ollamaflow.admin.errors import write_error
from ollamaflow.catalog import Catalog, Registry
from ollamaflow.credentials import Tokens
from ollamaflow.gateway.completed import Completed
from ollamaflow.gateway.placement import PlacementStats
from ollamaflow.records import RESERVED_KEY_IDENTIFIERS, Backend
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
#: Distinct model labels one API key's series take at most; later models count as ``other``.
MODELS_PER_KEY = 100
#: The reason label of a request the gateway refused for its key, by status.
REFUSALS = {401: "unauthorized", 403: "forbidden", 429: "rate_limited"}


@attrs.define(eq=False)
class KnownModels:
    """``model → display name`` for the models some configured backend lists, else None.

    Rebuilt lazily after an inventory refresh or a configuration change, so a lookup is one
    ``str.lower`` and one dict lookup. Expects names in display form (as in :class:`Completed`).
    """

    registry: Registry
    inventory: ModelInventory
    _names: dict[str, str] | None = None

    def changed(self, _what: str | Catalog) -> None:
        """A registry subscriber and an inventory listener: the names are read again."""
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
class LiveState:
    """What the scrape-time gauges read: configured backends and frontends, and queues."""

    registry: Registry
    runtime: Runtime
    queue_depth: Callable[[str], int]
    #: What placement did per backend (``ModelAware`` frontends): loads, evictions...
    placement: Mapping[str, PlacementStats] = attrs.field(factory=dict)


#: The placement counters: (metric name, help, PlacementStats attribute).
_PLACEMENT_COUNTERS = (
    (
        "ollamaflow_model_loads",
        "Models sent to a backend where they were not loaded (ModelAware frontends, preloads "
        "included).",
        "loads",
    ),
    (
        "ollamaflow_model_evictions",
        "Models those loads pushed out of the backend's VRAM.",
        "evictions",
    ),
    ("ollamaflow_model_preloads", "Models loaded ahead of demand (preloads).", "preloads"),
    (
        "ollamaflow_affinity_hits",
        "Chat turns sent to the backend that served the conversation's previous turn.",
        "affinity_hits",
    ),
)


class _LiveCollector:
    """Scrape-time gauges: in-flight requests, queue depths, backend health."""

    def __init__(self, live: LiveState) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        live = self.live
        catalog = live.registry.catalog
        states = live.runtime.states
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
        in_rotation = GaugeMetricFamily(
            "ollamaflow_backend_in_rotation",
            "1 if the backend takes requests: healthy, and not out after failing one.",
            labels=["backend"],
        )
        for identifier in catalog.backends:
            state = states.get(identifier)
            in_flight.add_metric([identifier], state.active_requests if state else 0)
            healthy.add_metric([identifier], 1 if state is not None and state.healthy else 0)
            in_rotation.add_metric(
                [identifier], 1 if state is not None and state.in_rotation else 0
            )
        depth = GaugeMetricFamily(
            "ollamaflow_queue_depth",
            "Requests waiting in the frontend's queue for a backend slot.",
            labels=["frontend"],
        )
        for identifier in catalog.frontends:
            depth.add_metric([identifier], live.queue_depth(identifier))
        yield from (in_flight, depth, healthy, in_rotation)
        for name, text, attribute in _PLACEMENT_COUNTERS:
            counter = CounterMetricFamily(name, text, labels=["backend"])
            for identifier in catalog.backends:
                stats = live.placement.get(identifier)
                counter.add_metric([identifier], getattr(stats, attribute) if stats else 0)
            yield counter


class ClientConnections(Protocol):
    """What the listener tells about client connections, read at scrape time."""

    @property
    def connections(self) -> Sized: ...

    @property
    def max_connections(self) -> int: ...

    @property
    def refused(self) -> int: ...


class _ConnectionsCollector:
    """Scrape-time client connections: open now, the cap, and how many the cap refused."""

    def __init__(self, door: ClientConnections) -> None:
        self.door = door
        self.created = time.time()

    def collect(self) -> Iterator[Metric]:
        door = self.door
        yield GaugeMetricFamily(
            "ollamaflow_client_connections",
            "Client connections open now, idle keep-alive ones included.",
            value=len(door.connections),
        )
        yield GaugeMetricFamily(
            "ollamaflow_client_connections_limit",
            "Client connections this process accepts at once (Webserver.MaxConnections).",
            value=door.max_connections,
        )
        refused = CounterMetricFamily(
            "ollamaflow_connections_refused_total",
            "Client connections answered 503 and closed because MaxConnections were open.",
        )
        refused.add_metric([], door.refused, self.created if _created_series() else None)
        yield refused


def _created_series() -> bool:
    """Whether ``_created`` series are exported: prometheus_client's own switch (the
    ``PROMETHEUS_DISABLE_CREATED_SERIES`` environment variable), on if it ever goes away."""
    return bool(getattr(client_metrics, "_use_created", True))


class _Family:
    """One counter or histogram family, aggregated in plain Python and exported at scrape time.

    ``series`` maps a tuple of label values (``str`` or ``int``, exported with ``str``) to a
    list of floats; its insertion order is the exposition order, as for prometheus_client's
    label children. Every update runs on the reactor thread and a scrape does too, so there is
    no lock: prometheus_client's per-child ``inc``/``observe`` each take one, and cost several
    percent of a proxied request.
    """

    #: How many floats one series holds.
    width = 1

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str | int, ...], list[float]] = {}
        self.created: dict[tuple[str | int, ...], float] = {}

    def new(self, key: tuple[str | int, ...]) -> list[float]:
        """The zeroed values of a label tuple seen for the first time."""
        values = self.series[key] = [0.0] * self.width
        self.created[key] = time.time()
        return values


class _Counter(_Family):
    """A counter: per label tuple, ``[total]``."""

    def inc(self, key: tuple[str | int, ...], amount: float = 1.0) -> None:
        (self.series.get(key) or self.new(key))[0] += amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        # prometheus_client's switch for ``_created`` series (PROMETHEUS_DISABLE_CREATED_SERIES).
        created = self.created if _created_series() else {}
        for key, (total,) in self.series.items():
            family.add_metric([str(value) for value in key], total, created.get(key))
        yield family


class _Histogram(_Family):
    """A histogram: per label tuple, the count of each bucket (not cumulative), then ``+Inf``,
    then the sum. An observation goes to the first bucket whose bound is >= it (``le``)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], bounds: Sequence[float]
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(float(bound) for bound in bounds)
        self.le = [*map(floatToGoString, self.bounds), "+Inf"]
        self.width = len(self.bounds) + 2

    def observe(self, key: tuple[str | int, ...], value: float) -> None:
        values = self.series.get(key) or self.new(key)
        values[bisect_left(self.bounds, value)] += 1.0
        values[-1] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        use_created = _created_series()
        for key, values in self.series.items():
            labels = [str(value) for value in key]
            family.add_metric(
                labels, [*zip(self.le, accumulate(values[:-1]), strict=True)], values[-1]
            )
            if use_created:
                named = dict(zip(self.labelnames, labels, strict=True))
                family.add_sample(self.name + "_created", named, self.created[key])
        yield family


class Metrics:
    """Every OllamaFlow metric, on its own :class:`CollectorRegistry`; a gateway observer."""

    def __init__(
        self,
        *,
        known_model: Callable[[str], str | None] = lambda _model: None,
        live: LiveState | None = None,
    ) -> None:
        self.known_model = known_model
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.requests = _Counter(
            "ollamaflow_requests_total",
            "Client requests finished, by frontend, backend, model and status.",
            ["frontend", "backend", "model", "status"],
        )
        self.retries = _Counter(
            "ollamaflow_retries_total",
            "Attempts retried on another backend.",
            ["frontend"],
        )
        self.disconnects = _Counter(
            "ollamaflow_client_disconnects_total",
            "Requests whose client went away before the answer was complete.",
            ["frontend"],
        )
        self.ttfb = _Histogram(
            "ollamaflow_ttfb_seconds",
            "Seconds from the request's arrival to the first byte of the backend's answer.",
            ["frontend", "backend"],
            LATENCY_BUCKETS,
        )
        self.duration = _Histogram(
            "ollamaflow_request_duration_seconds",
            "Seconds from the request's arrival to its last byte.",
            ["frontend", "backend"],
            LATENCY_BUCKETS,
        )
        self.queue_wait = _Histogram(
            "ollamaflow_queue_wait_seconds",
            "Seconds a request waited in its frontend's queue for a backend slot.",
            ["frontend"],
            LATENCY_BUCKETS,
        )
        self.tokens = _Counter(
            "ollamaflow_tokens_generated_total",
            "Tokens generated, from the final message of completions (eval_count).",
            ["backend", "model"],
        )
        self.rate = _Histogram(
            "ollamaflow_tokens_per_second",
            "Generation speed of completions (eval_count / eval_duration).",
            ["backend", "model"],
            RATE_BUCKETS,
        )
        self.checks = _Histogram(
            "ollamaflow_health_check_seconds",
            "Health check latency, by backend and result (ok or failure).",
            ["backend", "result"],
            CHECK_BUCKETS,
        )
        self.pulls = _Counter(
            "ollamaflow_pulls_total",
            "Model pulls finished, by backend and result (success or failure).",
            ["backend", "result"],
        )
        self.key_requests = _Counter(
            "ollamaflow_apikey_requests_total",
            "Client requests finished, by API key and model.",
            ["key", "model"],
        )
        self.key_errors = _Counter(
            "ollamaflow_apikey_errors_total",
            "Client requests that failed (status 400 or above, or not answered in full), "
            "by API key and model.",
            ["key", "model"],
        )
        self.key_tokens = _Counter(
            "ollamaflow_apikey_tokens_total",
            "Tokens the backends reported, by API key, model and kind (prompt or completion).",
            ["key", "model", "kind"],
        )
        self.key_refused = _Counter(
            "ollamaflow_apikey_refused_total",
            "Requests the gateway refused, by API key and reason "
            "(unauthorized, forbidden or rate_limited).",
            ["key", "reason"],
        )
        #: API key → how many model labels its series use (at most :data:`MODELS_PER_KEY`).
        self._key_models: dict[str, int] = {}
        for family in (
            self.requests,
            self.retries,
            self.disconnects,
            self.ttfb,
            self.duration,
            self.queue_wait,
            self.tokens,
            self.rate,
            self.checks,
            self.pulls,
            self.key_requests,
            self.key_errors,
            self.key_tokens,
            self.key_refused,
        ):
            registry.register(family)
        if live is not None:
            registry.register(_LiveCollector(live))

    def __call__(self, c: Completed) -> None:
        """Count one finished client request.

        The hot path: the common updates are written out (a dict lookup, then list arithmetic)
        instead of calling ``inc``/``observe``, which would cost about 15% more.
        """
        frontend = c.frontend
        backend = c.backend or NONE
        model = NONE if c.model is None else self.known_model(c.model) or OTHER
        key: tuple[str | int, ...] = (frontend, backend, model, c.status)  # str(status) at scrape
        counter = self.requests
        (counter.series.get(key) or counter.new(key))[0] += 1.0
        if c.retries:
            self.retries.inc((frontend,), c.retries)
        if c.outcome == "client_gone":
            self.disconnects.inc((frontend,))
        if c.backend is not None or c.queued:
            key = (frontend,)
            histogram = self.queue_wait
            values = histogram.series.get(key) or histogram.new(key)
            values[bisect_left(histogram.bounds, c.queued)] += 1.0
            values[-1] += c.queued
        key = (frontend, backend)
        if c.ttfb is not None:
            histogram = self.ttfb
            values = histogram.series.get(key) or histogram.new(key)
            values[bisect_left(histogram.bounds, c.ttfb)] += 1.0
            values[-1] += c.ttfb
        histogram = self.duration
        values = histogram.series.get(key) or histogram.new(key)
        values[bisect_left(histogram.bounds, c.duration)] += 1.0
        values[-1] += c.duration
        if c.eval_count:
            key = (backend, model)
            counter = self.tokens
            (counter.series.get(key) or counter.new(key))[0] += c.eval_count
            rate = c.tokens_per_second
            if rate is not None:
                histogram = self.rate
                values = histogram.series.get(key) or histogram.new(key)
                values[bisect_left(histogram.bounds, rate)] += 1.0
                values[-1] += rate
        self._count_for_key(c, model)

    def _count_for_key(self, c: Completed, model: str) -> None:
        """The per-API-key families: ``model`` is the label the other families use."""
        key: tuple[str | int, ...] = (c.api_key, model)
        counter = self.key_requests
        values = counter.series.get(key)
        if values is None:
            key = self._key_model(c.api_key, model)
            values = counter.series.get(key) or counter.new(key)
        values[0] += 1.0
        if c.failed:
            self.key_errors.inc(key)
            if c.outcome == "refused":
                reason = REFUSALS.get(c.status)
                if reason is not None:
                    self.key_refused.inc((c.api_key, reason))
        if c.prompt_eval_count:
            self.key_tokens.inc((*key, "prompt"), c.prompt_eval_count)
        if c.eval_count:
            self.key_tokens.inc((*key, "completion"), c.eval_count)

    def _key_model(self, api_key: str, model: str) -> tuple[str, str]:
        """The labels of a model the key's series do not have yet: ``other`` past the cap."""
        used = self._key_models.get(api_key, 0)
        if used >= MODELS_PER_KEY:
            return api_key, OTHER
        self._key_models[api_key] = used + 1
        return api_key, model

    def forget_keys(self, existing: Collection[str]) -> None:
        """Drop the series of API keys not in ``existing`` (identifiers of the configured
        keys; ``admin`` and ``anonymous`` stay): call it when the keys change."""
        kept = {*existing, *RESERVED_KEY_IDENTIFIERS}
        for family in (self.key_requests, self.key_errors, self.key_tokens, self.key_refused):
            for labels in [labels for labels in family.series if labels[0] not in kept]:
                del family.series[labels]
                family.created.pop(labels, None)
        for api_key in [api_key for api_key in self._key_models if api_key not in kept]:
            del self._key_models[api_key]

    def watch_connections(self, door: ClientConnections) -> None:
        """Export the client connections of ``door`` (the listener) at every scrape."""
        self.registry.register(_ConnectionsCollector(door))

    def health_checked(self, backend: Backend, ok: bool, seconds: float) -> None:
        """A health check finished (the health checker's ``on_check`` hook)."""
        self.checks.observe((backend.identifier, "ok" if ok else "failure"), seconds)

    def pull_done(self, backend_id: str, model: str, ok: bool) -> None:
        """A model pull finished (model sync's ``on_pull_done`` hook)."""
        self.pulls.inc((backend_id, "success" if ok else "failure"))

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return bytes(generate_latest(self.registry))


@attrs.define(eq=False)
class MetricsPage:
    """Renders ``GET /metrics``; with a ``token``, only for ``Authorization: Bearer <token>``."""

    metrics: Metrics
    token: str | None = attrs.field(default=None, repr=False)
    _tokens: Tokens = attrs.field(init=False, repr=False)

    @_tokens.default
    def _of_token(self) -> Tokens:
        return Tokens.of([self.token])

    def render(self, request: Request) -> bytes:
        if self.token is not None and not self._tokens.match(request.getHeader(b"authorization")):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="metrics"')
            return write_error(request, 401, "GET /metrics needs Authorization: Bearer <token>")
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.exposition()
