"""Ollama conformance details clients trip over: methods, OpenAI error types, names as asked,
HEAD lengths, pinned models, and one access-log line per client request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from harness import until
from listening import stop_listening
from recorder import Recorder, start_recorder
from test_gateway import Cluster, _raw, cluster, in_thread
from twisted.internet import reactor

from ollamaflow.gateway.classify import allowed_methods
from ollamaflow.gateway.clienterrors import error_body
from ollamaflow.gateway.completed import Completed

__all__ = ["cluster"]  # a fixture, shared by import


def _head_and_body(answer: bytes) -> tuple[bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def _header(head: bytes, name: bytes) -> list[bytes]:
    return [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")[1:]
        if line.split(b":", 1)[0].strip().lower() == name
    ]


async def inventories_read(cluster: Cluster) -> None:
    """Read every backend's models now (the daemon's refresh loop ran before they existed)."""
    for identifier in cluster.daemon.registry.catalog.backends:
        await cluster.daemon.inventory.refresh_now(identifier)
    assert all(cluster.daemon.inventory.known(f"sim{i}") for i in range(3))


# -- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        (b"GET", b"/api/chat", b"POST"),
        (b"PUT", b"/api/generate", b"POST"),
        (b"POST", b"/api/tags", b"GET, HEAD"),
        (b"GET", b"/api/delete", b"DELETE"),
        (b"GET", b"/v1/chat/completions", b"POST"),
        (b"DELETE", b"/v1/models", b"GET, HEAD"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_known_path_with_the_wrong_method_is_405_as_ollama_answers(
    cluster: Cluster, method: bytes, path: bytes, allowed: bytes
) -> None:
    key = path.decode()
    before = [sim.state.counters.requests.get(key, 0) for sim in cluster.sims]
    answer = await _raw(
        cluster.daemon.address.port,
        method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: 0\r\n\r\n",
    )
    head, body = _head_and_body(answer)
    assert head.startswith(b"HTTP/1.1 405 "), head
    assert _header(head, b"allow") == [allowed]
    document = json.loads(body)
    if path.startswith(b"/v1/"):
        assert document["error"]["type"] == "invalid_request_error"
    else:
        assert document == {"error": "405 method not allowed"}
    after = [sim.state.counters.requests.get(key, 0) for sim in cluster.sims]
    assert after == before, "a wrong method never reaches a backend"


def test_unknown_paths_and_blobs_are_left_to_the_backend() -> None:
    assert allowed_methods(b"/api/nothing-like-it") is None
    assert allowed_methods(b"/api/blobs/sha256:" + b"0" * 64) == (b"HEAD", b"POST")
    assert allowed_methods(b"/api/chat/") == (b"POST",)


# -- OpenAI's error types, as Ollama names them ------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (403, "invalid_request_error"),
        (404, "not_found_error"),
        (413, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "api_error"),
    ],
)
def test_openai_dialect_errors_use_ollamas_types(status: int, kind: str) -> None:
    document = json.loads(error_body(b"/v1/chat/completions", status, "why"))
    assert document == {"error": {"message": "why", "type": kind, "param": None, "code": None}}


@pytest_twisted.ensureDeferred
async def test_an_unknown_openai_model_is_a_not_found_error(cluster: Cluster) -> None:
    await inventories_read(cluster)
    response = await cluster.request("GET", "/v1/models/no-such-model")
    assert response.code == 404
    assert (await response.json())["error"]["type"] == "not_found_error"


@pytest_twisted.ensureDeferred
async def test_an_openai_model_is_echoed_as_asked(cluster: Cluster) -> None:
    await inventories_read(cluster)
    for asked in ("LLAMA3", "llama3:latest", "library/llama3"):
        response = await cluster.request("GET", "/v1/models/" + asked)
        assert response.code == 200
        assert (await response.json())["id"] == asked


# -- HEAD ------------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def lone_recorder(cluster: Cluster) -> AsyncIterator[Recorder]:
    recorder = start_recorder(reactor, body=b'{"version": "0.0.0-recorded-and-padded"}')
    await cluster.backend("rec", recorder.address[1])
    await cluster.frontend(["rec"])
    yield recorder
    assert recorder.port is not None
    await stop_listening(recorder.port)


@pytest_twisted.ensureDeferred
async def test_a_proxied_head_keeps_the_backends_content_length(
    cluster: Cluster, lone_recorder: Recorder
) -> None:
    length = b"%d" % len(lone_recorder.body)
    port = cluster.daemon.address.port
    request = b"HEAD /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
    # Twice on one connection: a HEAD answer has no body, so the second must parse cleanly.
    answer = await _raw(port, request + request[:-2] + b"Connection: close\r\n\r\n")
    first, _, second = answer.partition(b"\r\n\r\n")
    assert _header(first, b"content-length") == [length], first
    assert second.startswith(b"HTTP/1.1 200"), answer
    assert _header(second, b"content-length") == [length]
    asked = [seen.method for seen in lone_recorder.seen if seen.uri == b"/api/version"]
    assert asked == [b"HEAD", b"HEAD"]


# -- pinned properties route --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_pinned_model_is_what_the_request_is_routed_by(cluster: Cluster) -> None:
    await inventories_read(cluster)
    await cluster.frontend(
        ["sim0", "sim1", "sim2"], PinnedCompletionsProperties={"model": "llama3"}
    )
    response = await cluster.request(
        "POST",
        "/api/generate",
        json={"model": "no-backend-has-this", "prompt": "hi", "stream": False},
    )
    assert response.code == 200, await response.text()
    assert (await response.json())["model"] == "llama3"


# -- one access-log line per client request --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_client_request_is_reported_once_with_its_model(cluster: Cluster) -> None:
    await inventories_read(cluster)
    seen: list[Completed] = []
    cluster.daemon.gateway.observers.append(seen.append)
    client = cluster.client(timeout=30)

    def session() -> None:
        client.list()
        client.ps()
        client.pull("mistral")
        client.delete("mistral")
        with pytest.raises(Exception, match="not found"):
            client.show("unknown-model")

    await in_thread(session)
    for path in ("/v1/models", "/"):
        await (await cluster.request("GET", path)).content()
    await until(lambda: len(seen) >= 6)
    by_path = [(c.method, c.path, c.status, c.model) for c in seen]
    assert by_path == [
        ("GET", "/api/tags", 200, None),
        ("GET", "/api/ps", 200, None),
        ("POST", "/api/pull", 200, "mistral:latest"),
        ("DELETE", "/api/delete", 200, "mistral:latest"),
        ("POST", "/api/show", 404, "unknown-model:latest"),
        ("GET", "/v1/models", 200, None),
    ], "one line each; GET / is ours, not client traffic"
    fleet_wide = {c.path: c for c in seen[:4]}
    for path in ("/api/tags", "/api/ps", "/api/pull", "/api/delete"):
        assert fleet_wide[path].backends == ("sim0", "sim1", "sim2"), path
        assert fleet_wide[path].backend is None
    assert seen[4].outcome == "refused"


@pytest_twisted.ensureDeferred
async def test_a_model_route_naming_no_valid_model_is_404_not_500(cluster: Cluster) -> None:
    """Found by the hostile-input property test: ``/v1/models/llama3/..`` normalises to
    ``/v1/models/``, whose empty name broke the access-log record of the refusal."""
    await inventories_read(cluster)
    seen: list[Completed] = []
    cluster.daemon.gateway.observers.append(seen.append)
    for path in (b"/%76%31/%6D%6F%64%65%6C%73/%6C%6C%61%6D%61%33/..", b"/v1/models/a%20b"):
        answer = await _raw(
            cluster.daemon.address.port,
            b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        head, body = _head_and_body(answer)
        assert head.startswith(b"HTTP/1.1 404 "), head
        assert json.loads(body)["error"]["type"] == "not_found_error"
    await until(lambda: len(seen) == 2)
    assert [c.model for c in seen] == [None, None]
