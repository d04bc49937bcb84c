"""HTTP/1.0 clients (ApacheBench, HAProxy's default health check) are served, as OllamaFlow
1.2 serves them: its BlockHttp10 is stored (true by default) and never enforced, so a migrated
database has it true everywhere. End to end, over real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from harness import Collect, DaemonUnderTest, start_daemon
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol


@pytest_twisted.async_yield_fixture
async def fleet(tmp_path: Path) -> AsyncIterator[DaemonUnderTest]:
    made = DaemonUnderTest(await start_daemon(tmp_path, {"HealthCheckIntervalMs": 60000}))
    await made.add("sim", tokens=3)
    await made.serve("sim", BlockHttp10=True)  # as 1.2 stores it, explicitly
    assert (await made.http.get("/v1.0/frontends/frontend1")).json["BlockHttp10"] is True
    yield made
    await made.stop()


async def exchange(fleet: DaemonUnderTest, payload: bytes) -> tuple[list[bytes], bytes]:
    """Send ``payload`` on a new connection; the response's head lines and body, once the
    server has closed the connection (HTTP/1.0 without keep-alive ends there)."""
    proto = Collect(payload)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", fleet.daemon.address.port)
    await connectProtocol(endpoint, proto)
    answer = await proto.done
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def field(head: list[bytes], name: bytes) -> bytes | None:
    for line in head[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


@pytest_twisted.ensureDeferred
async def test_get_api_tags_over_http_1_0_is_served(fleet: DaemonUnderTest) -> None:
    head, body = await exchange(fleet, b"GET /api/tags HTTP/1.0\r\nHost: x\r\n\r\n")
    assert head[0].split(b" ")[1] == b"200", head
    assert field(head, b"transfer-encoding") is None, "an HTTP/1.0 client knows no chunks"
    names = [m["name"] for m in json.loads(body)["models"]]
    assert "llama3:latest" in names


@pytest_twisted.ensureDeferred
async def test_post_api_generate_over_http_1_0_is_served_whole_and_streamed(
    fleet: DaemonUnderTest,
) -> None:
    whole = json.dumps({"model": "llama3", "prompt": "hi", "stream": False}).encode()
    head, body = await exchange(
        fleet,
        b"POST /api/generate HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(whole), whole),
    )
    assert head[0].split(b" ")[1] == b"200", head
    answer = json.loads(body)
    assert answer["done"] is True and answer["model"] == "llama3"
    assert field(head, b"x-ollamaflow-backend") == b"sim"

    streamed = json.dumps({"model": "llama3", "prompt": "hi"}).encode()
    head, body = await exchange(
        fleet,
        b"POST /api/generate HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(streamed), streamed),
    )
    assert head[0].split(b" ")[1] == b"200", head
    assert field(head, b"transfer-encoding") is None
    lines = [json.loads(line) for line in body.splitlines()]
    assert len(lines) >= 2 and lines[-1]["done"] is True, "every line, ended by the close"


@pytest_twisted.ensureDeferred
async def test_haproxys_default_health_check_is_not_refused(fleet: DaemonUnderTest) -> None:
    """``option httpchk`` sends ``OPTIONS / HTTP/1.0`` and wants a 2xx or 3xx."""
    head, _ = await exchange(fleet, b"OPTIONS / HTTP/1.0\r\n\r\n")
    assert head[0].split(b" ")[1][:1] in (b"2", b"3"), head
    head, body = await exchange(fleet, b"GET / HTTP/1.0\r\n\r\n")
    assert head[0].split(b" ")[1] == b"200" and body == b"Ollama is running"
