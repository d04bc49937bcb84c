"""The streaming gateway end to end: real sockets, simulated Ollama backends, the real clients."""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import ollama
import openai
import pytest
import pytest_twisted
import treq
from harness import Collect, Http, start_daemon, until
from listening import listen_local, port_number, stop_listening
from recorder import Recorder, start_recorder
from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseFailed

from ollamaflow.daemon import Daemon
from ollamaflow.gateway.balancer import Balancer
from ollamaflow.records import Backend
from ollamaflow.sim.config import SimConfig
from ollamaflow.sim.service import RunningSimulator, start_simulator


@attrs.define
class Cluster:
    daemon: Daemon
    sims: list[RunningSimulator]
    http: Http
    url: str

    async def backend(self, identifier: str, port: int, **fields: Any) -> None:
        body = {"Identifier": identifier, "Hostname": "127.0.0.1", "Port": port, **fields}
        reply = await self.http.put("/v1.0/backends", body)
        assert reply.status == 201, reply.body
        self.healthy(identifier)

    async def frontend(
        self, backends: list[str], identifier: str = "frontend1", **fields: Any
    ) -> None:
        body = {"Backends": backends, "LoadBalancing": "RoundRobin", **fields}
        if identifier == "frontend1":
            reply = await self.http.put(f"/v1.0/frontends/{identifier}", body)
        else:
            reply = await self.http.put("/v1.0/frontends", {"Identifier": identifier, **body})
        assert reply.status in (200, 201), reply.body

    def healthy(self, *identifiers: str) -> None:
        for identifier in identifiers:
            state = self.daemon.runtime.state(identifier)
            if not state.healthy:
                state.succeeded(self.daemon.now(), threshold=1)

    def unhealthy(self, identifier: str) -> None:
        state = self.daemon.runtime.state(identifier)
        state.healthy = False

    def client(self, **kw: Any) -> ollama.Client:
        return ollama.Client(host=self.url, **kw)

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        return await treq.request(method, self.url + path, persistent=False, **kw)


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    daemon = await start_daemon(tmp_path)
    sims = [await start_simulator(reactor, config=SimConfig(num_parallel=8)) for _ in range(3)]
    http = Http.to(daemon)
    made = Cluster(daemon, sims, http, f"http://127.0.0.1:{daemon.address.port}")
    for i, sim in enumerate(sims):
        await made.backend(f"sim{i}", sim.port)
    await made.frontend(["sim0", "sim1", "sim2"])
    yield made
    for sim in sims:
        await sim.stop()
    await daemon.stopService()


def in_thread(fn: Callable[[], Any]) -> Deferred[Any]:
    """Run a blocking client call off the reactor thread."""
    return threads.deferToThread(fn)


# -- the official clients, unchanged ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_ollama_client_works_unchanged_through_the_gateway(cluster: Cluster) -> None:
    # One backend: a pull and the delete after it must meet the same box (fan-out is issue 5's).
    await cluster.frontend(["sim0"])
    client = cluster.client(timeout=30)

    def session() -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["list"] = [m.model for m in client.list().models]
        out["show"] = client.show("llama3").modelinfo
        out["chat"] = client.chat("llama3", messages=[{"role": "user", "content": "hi"}])
        out["chat_stream"] = list(
            client.chat("llama3", messages=[{"role": "user", "content": "hi"}], stream=True)
        )
        out["generate"] = client.generate("llama3", "hi")
        out["generate_stream"] = list(client.generate("llama3", "hi", stream=True))
        out["embed"] = client.embed("all-minilm", ["a", "b"])
        out["pull"] = list(client.pull("mistral", stream=True))
        out["delete"] = client.delete("mistral")
        return out

    out = await in_thread(session)
    assert "llama3:latest" in out["list"]
    assert out["show"]
    assert out["chat"].done and out["chat"].message.content
    assert out["chat_stream"][-1].done and len(out["chat_stream"]) > 2
    assert out["generate"].done and out["generate"].response
    assert out["generate_stream"][-1].done
    assert len(out["embed"].embeddings) == 2
    assert out["pull"][-1].status == "success"
    assert out["delete"].status == "success"


@pytest_twisted.ensureDeferred
async def test_an_openai_chat_stream_works_unchanged(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=30)

    def stream() -> list[Any]:
        chunks = client.chat.completions.create(
            model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return list(chunks)

    chunks = await in_thread(stream)
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- streaming ----------------------------------------------------------------------------


class Arrivals(Protocol):
    """Records when each chunk of a response body arrives."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((reactor.seconds(), data))

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_chunks_reach_the_client_one_by_one_as_the_backend_sends_them(
    cluster: Cluster,
) -> None:
    for sim in cluster.sims:
        await sim.configure(tokens=10, tokens_per_second=20)
    started = reactor.seconds()
    response = await cluster.request(
        "POST", "/api/generate", json={"model": "llama3", "prompt": "count"}
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/x-ndjson"]
    arrivals = Arrivals()
    response.deliverBody(arrivals)
    await arrivals.done
    first, last = arrivals.chunks[0][0] - started, arrivals.chunks[-1][0] - started
    assert first < 0.25, "the first token is not held back"
    assert last > 0.4, "the stream took as long as the backend took"
    lines = b"".join(c for _, c in arrivals.chunks).splitlines()
    assert len(lines) == 11 and json.loads(lines[-1])["done"] is True
    assert len(arrivals.chunks) >= 10, "chunks arrive one by one, not coalesced"


class Paused(Protocol):
    """A client that stops reading until told to resume."""

    def __init__(self) -> None:
        self.received = 0
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.received:
            # Not in connectionMade: the response resumes its transport after that.
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self.received += len(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_pauses_the_backend(cluster: Cluster) -> None:
    await cluster.frontend(["sim0"])
    await cluster.sims[0].configure(tokens=400_000, tokens_per_second=0)
    response = await cluster.request(
        "POST", "/api/generate", json={"model": "llama3", "prompt": "long"}, unbuffered=True
    )
    reader = Paused()
    response.deliverBody(reader)
    exchange = next(iter(cluster.daemon.gateway.exchanges))
    previous = -1
    while exchange.relayed != previous:
        previous = exchange.relayed
        await task.deferLater(reactor, 0.2, lambda: None)
    stalled_at = exchange.relayed
    assert 0 < stalled_at < 20_000_000, "the gateway stopped reading when the client did"
    reader.transport.resumeProducing()  # type: ignore[union-attr]
    await reader.done
    assert reader.received > stalled_at * 1.5
    assert exchange.relayed > stalled_at * 1.5


@pytest_twisted.ensureDeferred
async def test_a_client_disconnect_cancels_the_backend_request(cluster: Cluster) -> None:
    await cluster.frontend(["sim0"])
    sim = cluster.sims[0]
    await sim.configure(tokens=200, tokens_per_second=20)
    response = await cluster.request(
        "POST",
        "/api/chat",
        json={"model": "llama3", "messages": [{"role": "user", "content": "x"}]},
    )
    arrivals = Arrivals()
    response.deliverBody(arrivals)
    await until(lambda: len(arrivals.chunks) > 0)
    assert sim.counters.in_flight == 1
    arrivals.transport.loseConnection()  # type: ignore[union-attr]
    await until(lambda: sim.counters.client_disconnects == 1 and sim.counters.in_flight == 0)
    await until(lambda: cluster.daemon.runtime.state("sim0").active_requests == 0)
    assert not cluster.daemon.gateway.exchanges


@pytest_twisted.ensureDeferred
async def test_a_disconnect_before_the_response_cancels_too(cluster: Cluster) -> None:
    await cluster.frontend(["sim0"])
    sim = cluster.sims[0]
    await sim.configure(ttft=5.0)
    attempt = treq.post(cluster.url + "/api/generate", json={"model": "llama3", "prompt": "x"})
    await until(lambda: sim.counters.in_flight == 1)
    attempt.cancel()
    with pytest.raises(Exception):  # noqa: B017 - treq's error for a cancelled request
        await attempt
    await until(lambda: sim.counters.client_disconnects == 1 and sim.counters.in_flight == 0)
    await until(lambda: cluster.daemon.runtime.state("sim0").active_requests == 0)


@pytest_twisted.ensureDeferred
async def test_a_backend_dying_mid_stream_aborts_the_client_response(cluster: Cluster) -> None:
    await cluster.frontend(["sim0"])
    await cluster.sims[0].configure(tokens=50, tokens_per_second=100, drop_mid_stream_after=3)
    response = await cluster.request(
        "POST", "/api/generate", json={"model": "llama3", "prompt": "x"}
    )
    assert response.code == 200
    with pytest.raises(ResponseFailed):
        await response.content()

    def through_client() -> None:
        list(cluster.client(timeout=10).generate("llama3", "x", stream=True))

    with pytest.raises(Exception):  # noqa: B017 - the client's own error type for a torn stream
        await in_thread(through_client)


# -- routing ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_round_robin_spreads_exactly_evenly(cluster: Cluster) -> None:
    served = []
    for _ in range(30):
        response = await cluster.request("GET", "/api/version")
        await response.content()
        served.extend(response.headers.getRawHeaders("x-ollamaflow-backend"))
        assert len(response.headers.getRawHeaders("x-ollamaflow-request")[0]) == 36
    assert {s: served.count(s) for s in set(served)} == {"sim0": 10, "sim1": 10, "sim2": 10}
    assert [sim.counters.requests.get("/api/version") for sim in cluster.sims] == [10, 10, 10]


@pytest_twisted.ensureDeferred
async def test_a_label_keeps_only_backends_with_it(cluster: Cluster) -> None:
    reply = await cluster.http.put(
        "/v1.0/backends/sim2",
        {"Hostname": "127.0.0.1", "Port": cluster.sims[2].port, "Labels": ["big"]},
    )
    assert reply.status == 200
    for _ in range(4):
        response = await cluster.request("GET", "/api/tags", headers={"X-OllamaFlow-Label": "big"})
        await response.content()
        assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["sim2"]
    response = await cluster.request("GET", "/api/tags", headers={"X-OllamaFlow-Label": "tiny"})
    assert response.code == 503
    assert "label 'tiny'" in (await response.json())["error"]
    huge = "x" * 50_000
    response = await cluster.request("GET", "/api/tags", headers={"X-OllamaFlow-Label": huge})
    error = (await response.json())["error"]
    assert response.code == 503 and len(error) < 400, "a client's label is quoted, cut short"


@pytest_twisted.ensureDeferred
async def test_sticky_sessions_pin_and_fail_over(cluster: Cluster) -> None:
    await cluster.frontend(["sim0", "sim1", "sim2"], UseStickySessions=True)

    async def served(conversation: str) -> str:
        response = await cluster.request(
            "GET", "/api/version", headers={"X-Conversation-Id": conversation}
        )
        await response.content()
        return str(response.headers.getRawHeaders("x-ollamaflow-backend")[0])

    first = await served("c1")
    assert {await served("c1") for _ in range(5)} == {first}
    others = {await served(f"other{i}") for i in range(6)}
    assert len(others) == 3, "other clients still spread"
    cluster.unhealthy(first)
    moved = await served("c1")
    assert moved != first
    cluster.healthy(first)
    assert await served("c1") == moved, "the replacement pin holds after the old one recovers"
    # Without a sticky header the client IP is the client id.
    by_ip = await served("")
    assert {await served("") for _ in range(3)} == {by_ip}


@pytest_twisted.ensureDeferred
async def test_frontend_by_host_then_catch_all_else_404(cluster: Cluster) -> None:
    await cluster.frontend(["sim2"], identifier="special", Hostname="special.example")
    response = await cluster.request("GET", "/api/version", headers={"Host": "SPECIAL.example:80"})
    await response.content()
    assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["sim2"]
    response = await cluster.request("GET", "/api/version", headers={"Host": "other.example"})
    await response.content()
    assert response.headers.getRawHeaders("x-ollamaflow-backend")[0] in {"sim0", "sim1", "sim2"}
    assert (await cluster.http.delete("/v1.0/frontends/frontend1")).status == 204
    response = await cluster.request("GET", "/api/version", headers={"Host": "other.example"})
    assert response.code == 404
    assert "other.example" in (await response.json())["error"]
    response = await cluster.request("GET", "/v1/models", headers={"Host": "other.example"})
    assert (await response.json())["error"]["message"].startswith("no frontend for host")


@pytest_twisted.ensureDeferred
async def test_allow_flags_refuse_with_403_and_skip_backends(cluster: Cluster) -> None:
    await cluster.frontend(["sim0", "sim1"], AllowEmbeddings=False)
    response = await cluster.request(
        "POST", "/api/embed", json={"model": "all-minilm", "input": "x"}
    )
    assert response.code == 403
    assert "embeddings" in (await response.json())["error"]
    response = await cluster.request(
        "POST", "/v1/embeddings", json={"model": "all-minilm", "input": "x"}
    )
    body = await response.json()
    assert response.code == 403 and body["error"]["type"] == "invalid_request_error"

    await cluster.frontend(["sim0", "sim1"])
    reply = await cluster.http.put(
        "/v1.0/backends/sim0",
        {"Hostname": "127.0.0.1", "Port": cluster.sims[0].port, "AllowCompletions": False},
    )
    assert reply.status == 200
    for _ in range(4):
        response = await cluster.request(
            "POST", "/api/generate", json={"model": "llama3", "prompt": "x", "stream": False}
        )
        await response.content()
        assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["sim1"]


@pytest_twisted.ensureDeferred
async def test_nothing_healthy_is_503_with_retry_after_in_the_clients_dialect(
    cluster: Cluster,
) -> None:
    for sim in ["sim0", "sim1", "sim2"]:
        cluster.unhealthy(sim)
    response = await cluster.request("POST", "/api/chat", json={"model": "llama3"})
    assert response.code == 503 and response.headers.getRawHeaders("retry-after") == ["1"]
    body = await response.json()
    assert body == {"error": "frontend 'frontend1': none of its 3 backends is healthy"}
    response = await cluster.request("POST", "/v1/chat/completions", json={"model": "llama3"})
    body = await response.json()
    assert response.code == 503
    assert body["error"]["message"].startswith("frontend 'frontend1'")
    assert body["error"]["param"] is None and body["error"]["code"] is None


@pytest_twisted.ensureDeferred
async def test_non_json_body_on_a_model_path_is_400(cluster: Cluster) -> None:
    response = await cluster.request("POST", "/api/chat", data=b"{nope")
    assert response.code == 400
    assert "not valid JSON" in (await response.json())["error"]


@pytest_twisted.ensureDeferred
async def test_http_1_0_is_served_whatever_block_http10_says(cluster: Cluster) -> None:
    """As in 1.2, which stores BlockHttp10 (true) and never enforces it (tests/test_http10.py)."""
    port = cluster.daemon.address.port
    for block in (True, False):
        await cluster.frontend(["sim0"], BlockHttp10=block)
        answer = await _raw(port, b"GET /api/version HTTP/1.0\r\nHost: x\r\n\r\n")
        assert b" 200 " in answer.split(b"\r\n")[0]


async def _raw(port: int, payload: bytes) -> bytes:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    proto = Collect(payload)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    return await proto.done


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_frontend_limit_is_413_without_reading_it(cluster: Cluster) -> None:
    await cluster.frontend(["sim0"], MaxRequestBodySize=1000)
    port = cluster.daemon.address.port
    announced = (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n"
        b"Content-Type: application/json\r\n\r\n" + b"{" * 100
    )
    answer = await _raw(port, announced)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "1000 bytes" in json.loads(body)["error"]
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"200\r\n" + b"x" * 512 + b"\r\n" for _ in range(4))
    )
    answer = await _raw(port, chunked)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["message"].startswith("the request body is larger")
    assert cluster.sims[0].counters.requests.get("/api/chat") is None


# -- retries and timeouts -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_refusing_backend_is_retried_on_the_next(cluster: Cluster) -> None:
    await cluster.sims[0].configure(refuse=True)
    for _ in range(6):
        response = await cluster.request(
            "POST", "/api/generate", json={"model": "llama3", "prompt": "x", "stream": False}
        )
        assert response.code == 200
        await response.content()
        assert response.headers.getRawHeaders("x-ollamaflow-backend")[0] in {"sim1", "sim2"}
    state = cluster.daemon.runtime.state("sim0")
    assert not state.in_rotation, "passive health: a refused connection took it out at once"
    await until(lambda: not state.healthy, what="the check it called for confirms it")
    assert "refused" in (state.last_error or "").lower()
    await cluster.frontend(["sim0"], AllowRetries=False)
    state.succeeded(cluster.daemon.now(), threshold=1)
    state.succeeded(cluster.daemon.now(), threshold=1)
    response = await cluster.request("GET", "/api/version")
    assert response.code == 502
    assert "sim0" in (await response.json())["error"]


class _Remembering(Balancer):
    """The daemon's balancer, noting which backends it is told finished a request."""

    told: list[str]

    def finished(self, frontend: str, backend: Backend) -> None:
        self.told.append(backend.identifier)
        super().finished(frontend, backend)


@pytest_twisted.ensureDeferred
async def test_only_a_backend_that_answered_is_remembered_for_the_next_request(
    cluster: Cluster,
) -> None:
    """Power of two choices' memory sends the next request where one just succeeded; a backend
    that failed must not be lent to it."""
    balancer = cluster.daemon.gateway.router.balancer = _Remembering()
    balancer.told = []
    await cluster.sims[0].configure(refuse=True)
    await cluster.frontend(["sim0", "sim1"], LoadBalancing="LeastOutstanding")
    response = await cluster.request(
        "POST", "/api/generate", json={"model": "llama3", "prompt": "x", "stream": False}
    )
    assert response.code == 200
    await response.content()
    assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["sim1"]
    assert cluster.daemon.runtime.state("sim0").consecutive_failures >= 1, "sim0 was tried"
    assert balancer.told == ["sim1"]


@pytest_twisted.ensureDeferred
async def test_a_503_from_a_backend_is_retried_and_each_backend_tried_once(
    cluster: Cluster,
) -> None:
    busy = [start_recorder(reactor, status=503, body=b'{"error":"busy"}') for _ in range(2)]
    try:
        for i, recorder in enumerate(busy):
            await cluster.backend(f"busy{i}", recorder.address[1])
        await cluster.frontend(["busy0", "busy1", "sim0"])
        for _ in range(3):
            response = await cluster.request("GET", "/api/version")
            assert response.code == 200
            await response.content()
        assert len(busy[0].seen) + len(busy[1].seen) <= 6
        await cluster.frontend(["busy0", "busy1"])
        response = await cluster.request("GET", "/api/version")
        assert response.code == 503, "the last backend's answer is relayed"
        assert len(busy[0].seen) + len(busy[1].seen) <= 8
    finally:
        for recorder in busy:
            assert recorder.port is not None
            await stop_listening(recorder.port)


@pytest_twisted.ensureDeferred
async def test_a_hanging_backend_times_out_and_the_next_one_answers(cluster: Cluster) -> None:
    await cluster.sims[0].configure(hang=True)
    await cluster.frontend(["sim0", "sim1"], TimeoutMs=300)
    response = await cluster.request("GET", "/api/version")
    assert response.code == 200
    await response.content()
    assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["sim1"]
    await cluster.frontend(["sim0"], TimeoutMs=300)
    response = await cluster.request("GET", "/api/version")
    assert response.code == 504
    assert "no response within 300 ms" in (await response.json())["error"]
    await until(lambda: cluster.daemon.runtime.state("sim0").active_requests == 0)


# -- what the backend sees ------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def recorded(cluster: Cluster) -> AsyncIterator[Recorder]:
    recorder = start_recorder(reactor)
    await cluster.backend(
        "rec",
        recorder.address[1],
        BearerToken="backend-secret",
        Headers={"X-Tenant": "blue"},
        Querystring="tenant=blue",
        PinnedCompletionsProperties={"options": {"num_ctx": 8192}, "keep_alive": -1},
    )
    await cluster.frontend(
        ["rec"],
        PinnedCompletionsProperties={"options": {"temperature": 0.1, "num_ctx": 2048}},
        PinnedEmbeddingsProperties={"truncate": True},
    )
    yield recorder
    assert recorder.port is not None
    await stop_listening(recorder.port)


@pytest_twisted.ensureDeferred
async def test_headers_as_the_backend_sees_them(cluster: Cluster, recorded: Recorder) -> None:
    response = await cluster.request(
        "GET",
        "/api/tags?verbose=1",
        headers={
            "Host": "flow.example:43411",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "X-Forwarded-For": "10.9.9.9",
            "Authorization": "Bearer client-token",
            "X-App": "mine",
        },
    )
    await response.content()
    seen = recorded.seen[-1]
    host, port = recorded.address
    assert seen.header("host") == [f"{host}:{port}"]
    assert seen.header("x-forwarded-for") == ["10.9.9.9, 127.0.0.1"]
    assert seen.header("x-forwarded-host") == ["flow.example:43411"]
    assert seen.header("x-forwarded-proto") == ["http"]
    assert seen.header("authorization") == ["Bearer backend-secret"]
    assert seen.header("x-tenant") == ["blue"] and seen.header("x-app") == ["mine"]
    assert seen.header("x-hop") == [] and seen.header("keep-alive") == []
    assert seen.uri == b"/api/tags?verbose=1&tenant=blue"
    assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["rec"]


@pytest_twisted.ensureDeferred
async def test_pinned_properties_are_merged_frontend_then_backend(
    cluster: Cluster, recorded: Recorder
) -> None:
    body = {"model": "llama3", "options": {"temperature": 0.9, "seed": 4}, "keep_alive": "5m"}
    response = await cluster.request("POST", "/api/chat", json=body)
    await response.content()
    sent = json.loads(recorded.seen[-1].body)
    assert sent == {
        "model": "llama3",
        "options": {"temperature": 0.1, "seed": 4, "num_ctx": 8192},
        "keep_alive": -1,
    }
    response = await cluster.request("POST", "/api/embed", json={"model": "m", "input": "x"})
    await response.content()
    assert json.loads(recorded.seen[-1].body) == {"model": "m", "input": "x", "truncate": True}
    response = await cluster.request("POST", "/api/show", data=b"raw body, not touched")
    await response.content()
    assert recorded.seen[-1].body == b"raw body, not touched"
    response = await cluster.request("POST", "/api/show", data=b'{"model": "llama3"}')
    await response.content()
    assert recorded.seen[-1].body == b'{"model": "llama3"}', "pins are for completions only"


# -- model management across the frontend ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_delete_reaches_every_backend_and_leaves_required_models(
    cluster: Cluster,
) -> None:
    await cluster.frontend(["sim0", "sim1", "sim2"], RequiredModels=["llama3", "all-minilm"])
    await in_thread(lambda: cluster.client(timeout=10).delete("llama3:latest"))
    for sim in cluster.sims:
        response = await treq.get(sim.url + "/api/tags")
        names = [m["name"] for m in (await response.json())["models"]]
        assert names == ["all-minilm:latest"], sim.url
    frontend = (await cluster.http.get("/v1.0/frontends/frontend1")).json
    assert frontend["RequiredModels"] == ["all-minilm"]
    response = await cluster.request("DELETE", "/api/delete", json={"name": "llama3"})
    assert response.code == 404
    assert await response.json() == {"error": "model 'llama3' not found"}
    response = await cluster.request("DELETE", "/api/delete", data=b"nope")
    assert response.code == 400


@pytest_twisted.ensureDeferred
async def test_a_delete_that_fails_somewhere_names_the_backend(cluster: Cluster) -> None:
    await cluster.sims[1].configure(error500=True)
    response = await cluster.request("DELETE", "/api/delete", json={"model": "llama3"})
    assert response.code == 502
    assert "sim1" in (await response.json())["error"]


@pytest_twisted.ensureDeferred
async def test_a_bug_in_the_gateway_is_a_json_500_not_an_html_page(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ollamaflow.gateway.proxy import Gateway

    def broken(self: Gateway, request: Any) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(Gateway, "render", broken)
    response = await cluster.request("POST", "/api/chat", json={"model": "llama3"})
    assert response.code == 500
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    body = await response.json()
    assert body["error"].startswith("internal error; see the log, reference ")
    response = await cluster.request("GET", "/v1/models")
    assert (await response.json())["error"]["type"] == "api_error"


@pytest_twisted.ensureDeferred
async def test_the_backends_content_length_is_kept(cluster: Cluster) -> None:
    await cluster.frontend(["sim0"])
    body = b'{"model": "llama3", "prompt": "x", "stream": false}'
    answer = await _raw(
        cluster.daemon.address.port,
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    head, _, payload = answer.partition(b"\r\n\r\n")
    lengths = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    assert lengths == [b"%d" % len(payload)], head
    assert b"transfer-encoding" not in head.lower()
    assert json.loads(payload)["done"] is True


@pytest_twisted.ensureDeferred
async def test_a_backend_that_goes_quiet_mid_stream_is_cut_off_after_the_idle_timeout(
    cluster: Cluster,
) -> None:
    await cluster.frontend(["sim0"], TimeoutMs=300)
    await cluster.sims[0].configure(tokens=10, stall_after=2, stall_seconds=30)
    started = reactor.seconds()
    response = await cluster.request(
        "POST", "/api/generate", json={"model": "llama3", "prompt": "x"}
    )
    assert response.code == 200
    with pytest.raises(ResponseFailed):
        await response.content()
    assert reactor.seconds() - started < 5, "not left hanging for the backend's 30 s stall"
    await until(lambda: cluster.daemon.runtime.state("sim0").active_requests == 0)


class _HeadFirst(Protocol):
    """A backend that answers every request with its status and headers at once, and its body
    (one chunk, then the end) only when the test releases it."""

    waiting: list[_HeadFirst]

    def dataReceived(self, data: bytes) -> None:
        if not data.startswith(b"GET /v1/stream "):  # a health check or an inventory read
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")  # type: ignore[union-attr]
            return
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.waiting.append(self)

    def release(self) -> None:
        self.transport.write(b"6\r\ndata:1\r\n0\r\n\r\n")  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_streams_status_reaches_the_client_before_its_first_chunk(
    cluster: Cluster,
) -> None:
    from twisted.internet.protocol import ServerFactory

    waiting: list[_HeadFirst] = []

    def build() -> _HeadFirst:
        backend = _HeadFirst()
        backend.waiting = waiting
        return backend

    port = listen_local(ServerFactory.forProtocol(build))
    try:
        await cluster.backend("early", port_number(port))
        await cluster.frontend(["early"])
        responding = Deferred.fromCoroutine(cluster.request("GET", "/v1/stream"))
        await until(lambda: waiting)
        response = await responding  # the head came through while the body is held back
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
        waiting[0].release()
        assert await response.content() == b"data:1"
    finally:
        await stop_listening(port)


# -- the hot path ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_proxied_requests_never_touch_the_database(cluster: Cluster) -> None:
    """Routing reads the configuration the daemon holds in memory: plain, streamed, refused
    and catalog requests run no database interaction at all."""
    pool = cluster.daemon.store._pool
    interactions: list[object] = []
    run = pool.runInteraction

    def counted(*args: Any, **kw: Any) -> Any:
        interactions.append(args[0])
        return run(*args, **kw)

    pool.runInteraction = counted  # type: ignore[method-assign]
    try:
        chat = {"model": "llama3", "messages": [{"role": "user", "content": "x"}]}
        for body in ({**chat, "stream": False}, chat, {**chat, "model": "nope"}):
            response = await cluster.request("POST", "/api/chat", json=body)
            await response.content()
        for path in ("/api/tags", "/api/version", "/v1/models"):
            response = await cluster.request("GET", path)
            assert response.code == 200
            await response.content()
    finally:
        pool.runInteraction = run  # type: ignore[method-assign]
    assert interactions == []


# -- memory -------------------------------------------------------------------------------

#: The modules whose objects a proxied request creates.
_HOT_PATH = (
    "ollamaflow.gateway",
    "ollamaflow.server",
    "ollamaflow.upstream",
    "ollamaflow.frontdoor",
    "ollamaflow.tcp",
)


@pytest_twisted.ensureDeferred
async def test_a_finished_request_leaves_nothing_for_the_garbage_collector(
    cluster: Cluster,
) -> None:
    """Everything a request made is freed by reference counting as it ends: garbage in cycles
    made the collector's full passes grow with traffic and with the number of backends."""
    await cluster.frontend(["sim0"])
    sim = cluster.sims[0]
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "x"}]}
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for stream in (False, True, False, True):
            response = await cluster.request("POST", "/api/chat", json={**chat, "stream": stream})
            assert response.code == 200
            await response.content()
        refused = await cluster.request("POST", "/api/chat", json={**chat, "model": "nope"})
        assert refused.code == 404
        await refused.content()
        await sim.configure(tokens=200, tokens_per_second=20)
        response = await cluster.request("POST", "/api/chat", json=chat)
        arrivals = Arrivals()
        response.deliverBody(arrivals)
        await until(lambda: arrivals.chunks)
        arrivals.transport.loseConnection()  # type: ignore[union-attr]
        await until(lambda: sim.counters.in_flight == 0 and not cluster.daemon.gateway.exchanges)
        await until(lambda: cluster.daemon.runtime.state("sim0").active_requests == 0)
        gc.collect()
        left = Counter(
            type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith(_HOT_PATH)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not left, f"objects freed only by the garbage collector: {dict(left)}"


@pytest_twisted.ensureDeferred
async def test_a_head_answer_keeps_the_length_the_get_would_have(cluster: Cluster) -> None:
    got = await cluster.request("GET", "/api/version")
    body = await got.content()
    head = await cluster.request("HEAD", "/api/version")
    assert head.code == 200 and await head.content() == b""
    assert head.headers.getRawHeaders("content-length") == [str(len(body))]
