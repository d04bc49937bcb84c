"""``GET /metrics``: scraped after real traffic through a daemon with simulated backends; the
token; the label rules; client connections. (The open-files limit: test_connection_limits.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from completions import completed as any_completed
from harness import TOKEN, Http, start_daemon, until
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import CancelledError
from twisted.web.client import ResponseNeverReceived

from ollamaflow.daemon import Daemon
from ollamaflow.gateway.completed import Completed
from ollamaflow.metrics import LATENCY_BUCKETS, MODELS_PER_KEY, Metrics
from ollamaflow.records import Backend
from ollamaflow.sim import SimConfig


class Scrape:
    """One scrape, parsed: ``value(name, **labels)`` sums the samples whose labels match."""

    def __init__(self, text: str) -> None:
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def labels(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name}


async def scrape(daemon: Daemon, token: str | None = None) -> Scrape:
    reply = await Http.to(daemon, token=token).get("/metrics")
    assert reply.status == 200, reply.body
    content_type = reply.headers.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"text/plain; version=")
    return Scrape(reply.body.decode())


async def add_backends(daemon: Daemon, ports: list[int], **fields: Any) -> list[str]:
    admin = Http.to(daemon)
    names = [f"sim{i}" for i in range(len(ports))]
    for name, port in zip(names, ports, strict=True):
        body = {"Identifier": name, "Hostname": "127.0.0.1", "Port": port, **fields}
        assert (await admin.put("/v1.0/backends", body)).status == 201
    body = {"Backends": names, "LoadBalancing": "RoundRobin"}
    assert (await admin.put("/v1.0/frontends/frontend1", body)).status == 200
    await until(lambda: all(daemon.runtime.state(n).healthy for n in names))
    await until(lambda: all(daemon.inventory.known(n) for n in names))
    return names


@pytest_twisted.ensureDeferred
async def test_metrics_after_traffic(daemon: Daemon, simulators: Any) -> None:
    sims = [await simulators(config=SimConfig(tokens_per_second=500)) for _ in range(2)]
    for sim in sims:  # warm on both: round robin runs over warm copies once it knows which
        response = await treq.post(
            f"http://127.0.0.1:{sim.port}/api/generate", json={"model": "llama3"}, persistent=False
        )
        assert (await response.json())["done_reason"] == "load"
    names = await add_backends(daemon, [s.port for s in sims])
    await until(lambda: all(daemon.inventory.is_loaded(n, "llama3") for n in names))
    dead = {"Identifier": "dead", "Hostname": "127.0.0.1", "Port": 1}  # in no frontend
    assert (await Http.to(daemon).put("/v1.0/backends", dead)).status == 201
    client = Http.to(daemon, token=None)
    generate = {"model": "llama3", "prompt": "hi", "stream": False}
    for _ in range(4):
        assert (await client.request("POST", "/api/generate", generate)).status == 200
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.request("POST", "/api/chat", chat)).status == 200
    assert (await client.get("/api/version")).status == 200
    missing = {"model": "nosuchmodel", "prompt": "hi"}
    assert (await client.request("POST", "/api/generate", missing)).status == 404
    pull = {"model": "no-such-model-anywhere", "stream": False}
    await client.request("POST", "/api/pull", pull)
    await until(lambda: daemon.runtime.state("dead").last_check is not None)

    m = await scrape(daemon)
    ok = {"frontend": "frontend1", "model": "llama3:latest", "status": "200"}
    assert m.value("ollamaflow_requests_total", **ok) == 5
    assert m.labels("ollamaflow_requests_total", "backend") >= {"sim0", "sim1"}
    assert m.value("ollamaflow_requests_total", backend="sim0", **ok) == 3  # round robin
    assert m.value("ollamaflow_requests_total", backend="sim1", **ok) == 2
    assert m.value("ollamaflow_requests_total", model="none", status="200") == 1  # /api/version
    refused = {"backend": "none", "model": "other", "status": "404"}  # a model none has
    assert m.value("ollamaflow_requests_total", **refused) == 1
    assert m.value("ollamaflow_ttfb_seconds_count", frontend="frontend1") >= 6
    assert m.value("ollamaflow_request_duration_seconds_count", frontend="frontend1") >= 7
    assert m.value("ollamaflow_request_duration_seconds_bucket", backend="sim0", le="+Inf") >= 3
    assert m.value("ollamaflow_queue_wait_seconds_count", frontend="frontend1") >= 6
    assert m.value("ollamaflow_tokens_generated_total", model="llama3:latest") == 50
    assert m.value("ollamaflow_tokens_per_second_count", model="llama3:latest") == 5
    assert m.value("ollamaflow_tokens_per_second_sum", model="llama3:latest") > 0
    assert m.value("ollamaflow_backend_healthy", backend="sim0") == 1
    assert m.value("ollamaflow_backend_healthy", backend="dead") == 0
    assert m.value("ollamaflow_backend_in_rotation", backend="sim0") == 1
    assert m.value("ollamaflow_backend_in_rotation", backend="dead") == 0
    daemon.runtime.state("sim1").suspected(float("inf"))  # it failed a request just now
    suspect = await scrape(daemon)
    assert suspect.value("ollamaflow_backend_healthy", backend="sim1") == 1
    assert suspect.value("ollamaflow_backend_in_rotation", backend="sim1") == 0
    assert m.value("ollamaflow_in_flight_requests", backend="sim0") == 0
    assert m.value("ollamaflow_queue_depth", frontend="frontend1") == 0
    assert m.value("ollamaflow_health_check_seconds_count", backend="sim0", result="ok") >= 1
    assert m.value("ollamaflow_health_check_seconds_count", backend="dead", result="failure") == 1
    assert m.value("ollamaflow_health_check_seconds_count", backend="dead", result="ok") == 0
    assert m.value("ollamaflow_pulls_total", result="failure") >= 1
    assert m.value("ollamaflow_pulls_total", result="success") == 0
    assert m.value("ollamaflow_retries_total") == 0


@pytest_twisted.ensureDeferred
async def test_in_flight_queue_depth_and_client_disconnects(
    daemon: Daemon, simulators: Any
) -> None:
    sim = await simulators()
    await add_backends(daemon, [sim.port], MaxParallelRequests=1)
    await sim.configure(hang=True)
    url = f"http://127.0.0.1:{daemon.address.port}/api/generate"
    body = b'{"model": "llama3", "prompt": "hi"}'
    first = treq.post(url, data=body, persistent=False)
    await until(lambda: daemon.runtime.state("sim0").active_requests == 1)
    second = treq.post(url, data=body, persistent=False)
    await until(lambda: daemon.gateway.scheduler.depth("frontend1") == 1)

    m = await scrape(daemon)
    assert m.value("ollamaflow_in_flight_requests", backend="sim0") == 1
    assert m.value("ollamaflow_queue_depth", frontend="frontend1") == 1

    for request in (second, first):
        request.cancel()
        with pytest.raises((CancelledError, ResponseNeverReceived)):
            await request
    await until(lambda: daemon.runtime.state("sim0").active_requests == 0)
    await sim.configure(hang=False)
    m = await scrape(daemon)
    assert m.value("ollamaflow_client_disconnects_total", frontend="frontend1") == 2
    assert m.value("ollamaflow_in_flight_requests", backend="sim0") == 0
    assert m.value("ollamaflow_queue_depth", frontend="frontend1") == 0


@pytest_twisted.ensureDeferred
async def test_a_token_protects_metrics(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, {"Metrics": {"BearerToken": "metrics-secret"}})
    try:
        for token in (None, "wrong", TOKEN):
            reply = await Http.to(daemon, token=token).get("/metrics")
            assert reply.status == 401
            assert reply.json["StatusCode"] == 401
            assert reply.headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="metrics"']
        m = await scrape(daemon, token="metrics-secret")
        assert m.value("ollamaflow_backend_healthy", backend="backend1") == 0
    finally:
        await daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_disabled_metrics_leave_the_path_to_the_gateway(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path, {"Metrics": {"Enabled": False}})
    try:
        assert daemon.metrics is None
        reply = await Http.to(daemon, token=None).get("/metrics")
        assert reply.status == 503  # proxied: the seeded backend1 is not there
    finally:
        await daemon.stopService()


def completed(**kw: Any) -> Completed:
    """A request of frontend ``f`` answered by backend ``b``."""
    base = {"request_id": "r", "client": "c", "frontend": "f", "backend": "b", "bytes": 1}
    return any_completed(**{**base, "ttfb": 0.1, "duration": 0.2, **kw})


def test_unknown_models_are_other_and_the_registry_is_private() -> None:
    known = {"llama3:latest": "llama3:latest"}
    metrics = Metrics(known_model=known.get)
    metrics(completed())
    metrics(completed(model="random-1:latest"))
    metrics(completed(model="random-2:latest", retries=2, outcome="client_gone"))
    metrics(completed(model=None, backend=None, ttfb=None, status=429, outcome="refused"))
    m = Scrape(metrics.exposition().decode())
    assert m.labels("ollamaflow_requests_total", "model") == {"llama3:latest", "other", "none"}
    assert m.value("ollamaflow_requests_total", model="other") == 2
    assert m.value("ollamaflow_retries_total", frontend="f") == 2
    assert m.value("ollamaflow_client_disconnects_total", frontend="f") == 1
    assert m.value("ollamaflow_ttfb_seconds_count") == 3
    assert m.value("ollamaflow_queue_wait_seconds_count") == 3  # not the refused one
    assert Scrape(Metrics().exposition().decode()).value("ollamaflow_requests_total") == 0


LATENCY_LE = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0"]
LATENCY_LE += ["10.0", "20.0", "30.0", "60.0", "120.0", "+Inf"]


def series(m: Scrape, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """``label values → value`` of the samples called ``name``."""
    return {tuple(s.labels[k] for k in labels): s.value for s in m.samples if s.name == name}


def buckets(m: Scrape, name: str, **labels: str) -> dict[str, float]:
    """``le → cumulative count`` of one histogram series, in exposition order."""
    wanted = series(m, f"{name}_bucket", *labels, "le")
    return {key[-1]: n for key, n in wanted.items() if key[:-1] == tuple(labels.values())}


def test_an_observation_on_a_bound_lands_in_that_bucket() -> None:
    metrics = Metrics()
    durations = (0.005, 0.0050001, 1.0, 120.0, 121.0, 0.0)
    for seconds in durations:
        metrics(completed(duration=seconds, ttfb=None))
    m = Scrape(metrics.exposition().decode())
    cumulative = buckets(m, "ollamaflow_request_duration_seconds", frontend="f", backend="b")
    assert list(cumulative) == LATENCY_LE
    expected = [2, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 6]
    assert list(cumulative.values()) == expected
    assert m.value("ollamaflow_request_duration_seconds_count") == 6 == cumulative["+Inf"]
    assert m.value("ollamaflow_request_duration_seconds_sum") == sum(durations)
    assert not [s for s in m.samples if s.name.startswith("ollamaflow_ttfb_seconds")]
    queued = buckets(m, "ollamaflow_queue_wait_seconds", frontend="f")
    assert queued["0.005"] == 6 == queued["+Inf"]  # waits of 0.0


def test_counts_by_label_combination() -> None:
    metrics = Metrics(known_model={"llama3:latest": "llama3:latest"}.get)
    metrics(completed())
    metrics(completed(eval_count=30, eval_duration_ns=2 * 10**9))  # 15 tokens/s
    metrics(completed(frontend="g", retries=1))
    metrics(completed(backend="c", status=502, outcome="aborted", retries=2))
    metrics(completed(backend="c", eval_count=10, eval_duration_ns=10**9))  # 10/s: on a bound
    metrics(completed(backend="c", eval_count=7))  # no duration: tokens but no rate
    m = Scrape(metrics.exposition().decode())
    by = ("frontend", "backend", "model", "status")
    assert series(m, "ollamaflow_requests_total", *by) == {
        ("f", "b", "llama3:latest", "200"): 2,
        ("g", "b", "llama3:latest", "200"): 1,
        ("f", "c", "llama3:latest", "502"): 1,
        ("f", "c", "llama3:latest", "200"): 2,
    }
    assert series(m, "ollamaflow_retries_total", "frontend") == {("g",): 1, ("f",): 2}
    durations = series(m, "ollamaflow_request_duration_seconds_count", "frontend", "backend")
    assert durations == {("f", "b"): 2, ("g", "b"): 1, ("f", "c"): 3}
    for frontend, backend in durations:
        inf = buckets(m, "ollamaflow_ttfb_seconds", frontend=frontend, backend=backend)["+Inf"]
        assert inf == durations[frontend, backend]
    created = series(m, "ollamaflow_request_duration_seconds_created", "frontend", "backend")
    assert created.keys() == durations.keys()
    assert all(when > 1.6e9 for when in created.values())
    tokens = series(m, "ollamaflow_tokens_generated_total", "backend", "model")
    assert tokens == {("b", "llama3:latest"): 30, ("c", "llama3:latest"): 17}
    rate = buckets(m, "ollamaflow_tokens_per_second", backend="c", model="llama3:latest")
    assert list(rate.items())[2:4] == [("5.0", 0), ("10.0", 1)]
    assert m.value("ollamaflow_tokens_per_second_count", backend="c") == 1 == rate["+Inf"]
    assert m.value("ollamaflow_tokens_per_second_sum", backend="b") == 15.0
    assert buckets(m, "ollamaflow_tokens_per_second", backend="b")["20.0"] == 1


def test_counts_by_api_key() -> None:
    known = {"llama3:latest": "llama3:latest", "qwen:7b": "qwen:7b"}
    metrics = Metrics(known_model=known.get)
    metrics(completed(api_key="k1", prompt_eval_count=12, eval_count=30))
    metrics(completed(api_key="k1", prompt_eval_count=3))
    metrics(completed(api_key="k1", status=502, outcome="aborted", eval_count=4))
    metrics(completed(api_key="k1", outcome="client_gone"))
    metrics(completed(api_key="k1", model="qwen:7b", status=429, outcome="refused"))
    metrics(completed(api_key="k1", status=429, outcome="refused"))
    metrics(completed(api_key="k1", model="random:latest", status=403, outcome="refused"))
    metrics(completed(api_key="k2", model=None, status=404))  # an error, not a refusal
    metrics(completed(api_key="anonymous", model=None, status=401, outcome="refused"))
    metrics(completed(api_key="admin", model=None, status=503, outcome="refused"))
    m = Scrape(metrics.exposition().decode())
    assert series(m, "ollamaflow_apikey_requests_total", "key", "model") == {
        ("k1", "llama3:latest"): 5,
        ("k1", "qwen:7b"): 1,
        ("k1", "other"): 1,
        ("k2", "none"): 1,
        ("anonymous", "none"): 1,
        ("admin", "none"): 1,
    }
    assert series(m, "ollamaflow_apikey_errors_total", "key", "model") == {
        ("k1", "llama3:latest"): 3,
        ("k1", "qwen:7b"): 1,
        ("k1", "other"): 1,
        ("k2", "none"): 1,
        ("anonymous", "none"): 1,
        ("admin", "none"): 1,
    }
    assert series(m, "ollamaflow_apikey_tokens_total", "key", "model", "kind") == {
        ("k1", "llama3:latest", "prompt"): 15,
        ("k1", "llama3:latest", "completion"): 34,
    }
    assert series(m, "ollamaflow_apikey_refused_total", "key", "reason") == {
        ("k1", "rate_limited"): 2,
        ("k1", "forbidden"): 1,
        ("anonymous", "unauthorized"): 1,
    }
    assert m.value("ollamaflow_apikey_requests_created", key="k1") > 1.6e9


def test_each_key_has_at_most_so_many_models_and_deleted_keys_can_be_forgotten() -> None:
    models = {f"m{i}:latest": f"m{i}:latest" for i in range(MODELS_PER_KEY + 5)}
    metrics = Metrics(known_model=models.get)
    for model in models:
        metrics(completed(api_key="k1", model=model, eval_count=1))
        metrics(completed(api_key="k2", model=model, status=500))
    metrics(completed(api_key="k1", model="m0:latest", eval_count=1))  # an earlier one: kept
    metrics(completed(api_key='a "quoted"\\key\n', model="m0:latest"))
    m = Scrape(metrics.exposition().decode())
    for name in ("ollamaflow_apikey_requests_total", "ollamaflow_apikey_tokens_total"):
        k1 = series(m, name, "key", "model")
        assert {model for key, model in k1 if key == "k1"} == {
            *list(models)[:MODELS_PER_KEY],
            "other",
        }
        assert k1["k1", "other"] == 5
        assert k1["k1", "m0:latest"] == 2
    k2 = series(m, "ollamaflow_apikey_errors_total", "key", "model")
    assert len([key for key, _model in k2 if key == "k2"]) == MODELS_PER_KEY + 1
    assert m.value("ollamaflow_apikey_requests_total", key='a "quoted"\\key\n') == 1

    metrics(completed(api_key="anonymous", status=401, outcome="refused"))
    metrics(completed(api_key="admin"))
    metrics.forget_keys(["k2"])
    m = Scrape(metrics.exposition().decode())
    for name in ("ollamaflow_apikey_requests_total", "ollamaflow_apikey_refused_total"):
        assert m.labels(name, "key") <= {"k2", "admin", "anonymous"}
    assert m.labels("ollamaflow_apikey_requests_total", "key") == {"k2", "admin", "anonymous"}
    assert m.value("ollamaflow_apikey_refused_total", key="anonymous") == 1
    assert not [s for s in m.samples if s.labels.get("key") == "k1"]
    metrics(completed(api_key="k1", model="m104:latest"))  # a new k1 starts afresh
    m = Scrape(metrics.exposition().decode())
    k1 = series(m, "ollamaflow_apikey_requests_total", "key", "model")
    assert k1["k1", "m104:latest"] == 1
    assert m.value("ollamaflow_requests_total") == 2 * len(models) + 5  # untouched


def test_health_checks_and_pulls() -> None:
    metrics = Metrics()
    b1 = Backend(identifier="b1")
    for ok, seconds in ((True, 0.001), (False, 10.0), (False, 11.0)):
        metrics.health_checked(b1, ok, seconds)
    for ok in (True, False, False):
        metrics.pull_done("b1", "llama3", ok)
    metrics.pull_done("b2", "llama3", True)
    m = Scrape(metrics.exposition().decode())
    passed = buckets(m, "ollamaflow_health_check_seconds", backend="b1", result="ok")
    assert list(passed) == [
        *("0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0"),
        *("2.5", "5.0", "10.0", "+Inf"),
    ]
    assert set(passed.values()) == {1}
    failed = buckets(m, "ollamaflow_health_check_seconds", backend="b1", result="failure")
    assert list(failed.values())[-3:] == [0, 1, 2]
    assert m.value("ollamaflow_health_check_seconds_sum", result="failure") == 21.0
    assert series(m, "ollamaflow_pulls_total", "backend", "result") == {
        ("b1", "success"): 1,
        ("b1", "failure"): 2,
        ("b2", "success"): 1,
    }


def test_the_families_keep_their_names_types_and_help() -> None:
    families = {
        f.name: (f.type, f.documentation)
        for f in text_string_to_metric_families(Metrics().exposition().decode())
    }
    assert families == {
        "ollamaflow_requests": (
            "counter",
            "Client requests finished, by frontend, backend, model and status.",
        ),
        "ollamaflow_retries": ("counter", "Attempts retried on another backend."),
        "ollamaflow_client_disconnects": (
            "counter",
            "Requests whose client went away before the answer was complete.",
        ),
        "ollamaflow_ttfb_seconds": (
            "histogram",
            "Seconds from the request's arrival to the first byte of the backend's answer.",
        ),
        "ollamaflow_request_duration_seconds": (
            "histogram",
            "Seconds from the request's arrival to its last byte.",
        ),
        "ollamaflow_queue_wait_seconds": (
            "histogram",
            "Seconds a request waited in its frontend's queue for a backend slot.",
        ),
        "ollamaflow_tokens_generated": (
            "counter",
            "Tokens generated, from the final message of completions (eval_count).",
        ),
        "ollamaflow_tokens_per_second": (
            "histogram",
            "Generation speed of completions (eval_count / eval_duration).",
        ),
        "ollamaflow_health_check_seconds": (
            "histogram",
            "Health check latency, by backend and result (ok or failure).",
        ),
        "ollamaflow_pulls": (
            "counter",
            "Model pulls finished, by backend and result (success or failure).",
        ),
        "ollamaflow_apikey_requests": (
            "counter",
            "Client requests finished, by API key and model.",
        ),
        "ollamaflow_apikey_errors": (
            "counter",
            "Client requests that failed (status 400 or above, or not answered in full), "
            "by API key and model.",
        ),
        "ollamaflow_apikey_tokens": (
            "counter",
            "Tokens the backends reported, by API key, model and kind (prompt or completion).",
        ),
        "ollamaflow_apikey_refused": (
            "counter",
            "Requests the gateway refused, by API key and reason "
            "(unauthorized, forbidden or rate_limited).",
        ),
    }


def test_the_export_matches_prometheus_clients_own_metrics() -> None:
    """The same observations through prometheus_client's Counter and Histogram scrape the same
    (apart from the ``_created`` timestamps)."""
    metrics = Metrics()
    reference = CollectorRegistry()
    requests = Counter(
        "ollamaflow_requests_total",
        "Client requests finished, by frontend, backend, model and status.",
        ["frontend", "backend", "model", "status"],
        registry=reference,
    )
    duration = Histogram(
        "ollamaflow_request_duration_seconds",
        "Seconds from the request's arrival to its last byte.",
        ["frontend", "backend"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    for i, seconds in enumerate((0.3, 0.01, 7.0, 0.0, 500.0, 2.5, 0.011, 0.01)):
        status, backend = (200, 404)[i % 2], ("b", "c", None)[i % 3]
        metrics(completed(duration=seconds, status=status, backend=backend, model=None))
        labels = ("f", backend or "none")
        requests.labels(*labels, "none", str(status)).inc()
        duration.labels(*labels).observe(seconds)

    def scraped(text: bytes) -> dict[str, Any]:
        return {
            f.name: (f.type, f.documentation, [s for s in f.samples if "_created" not in s.name])
            for f in text_string_to_metric_families(text.decode())
            if f.name in {"ollamaflow_requests", "ollamaflow_request_duration_seconds"}
        }

    assert scraped(metrics.exposition()) == scraped(generate_latest(reference))


@attrs.define
class Door:
    """What the listener tells the metrics about client connections."""

    connections: set[object]
    max_connections: int
    refused: int = 0


def test_client_connections_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    door = Door(connections={object(), object()}, max_connections=3)
    metrics.watch_connections(door)
    m = Scrape(metrics.exposition().decode())
    assert m.value("ollamaflow_client_connections") == 2
    assert m.value("ollamaflow_client_connections_limit") == 3
    assert m.value("ollamaflow_connections_refused_total") == 0
    door.connections.add(object())
    door.refused = 5
    m = Scrape(metrics.exposition().decode())
    assert m.value("ollamaflow_client_connections") == 3
    assert m.value("ollamaflow_connections_refused_total") == 5
    assert m.value("ollamaflow_connections_refused_created") > 1.6e9
    families = {
        f.name: (f.type, f.documentation)
        for f in text_string_to_metric_families(metrics.exposition().decode())
        if "connections" in f.name and not f.name.endswith("_created")
    }
    assert families == {
        "ollamaflow_client_connections": (
            "gauge",
            "Client connections open now, idle keep-alive ones included.",
        ),
        "ollamaflow_client_connections_limit": (
            "gauge",
            "Client connections this process accepts at once (Webserver.MaxConnections).",
        ),
        "ollamaflow_connections_refused": (
            "counter",
            "Client connections answered 503 and closed because MaxConnections were open.",
        ),
    }
