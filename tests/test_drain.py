"""Graceful drain: of the whole daemon on shutdown, and of one backend through the admin API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from harness import Collect, DaemonUnderTest, Http, start_daemon, until
from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.web.client import ResponseFailed

from ollamaflow.daemon import Daemon
from ollamaflow.sim.service import RunningSimulator, start_simulator


def responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (head, body) of each response in ``data``, as one connection carried them in turn
    (bodies framed by Content-Length or chunked); a cut-off last one is left out."""
    found: list[tuple[bytes, bytes]] = []
    while b"\r\n\r\n" in data:
        head, _, data = data.partition(b"\r\n\r\n")
        fields = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        if fields.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                if len(data) < size + 2:
                    return found
                body, data = body + data[:size], data[size + 2 :]
                if size == 0:
                    break
        else:
            size = int(fields.get(b"content-length", b"0"))
            if len(data) < size:
                return found
            body, data = data[:size], data[size:]
        found.append((head, body))
    return found


GENERATE = json.dumps({"model": "llama3", "prompt": "x"}).encode()
STREAM_REQUEST = (
    b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(GENERATE), GENERATE)
)
NEXT_REQUEST = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"


async def serving(
    tmp_path: Path, settings: dict[str, Any], **sim: Any
) -> tuple[Daemon, RunningSimulator]:
    fleet = DaemonUnderTest(await start_daemon(tmp_path, settings))
    simulator = await fleet.add("s", **sim)
    await fleet.serve("s")
    return fleet.daemon, simulator


async def stream(daemon: Daemon) -> tuple[Any, Collect]:
    url = f"http://127.0.0.1:{daemon.address.port}/api/generate"
    response = await treq.post(url, json={"model": "llama3", "prompt": "x"}, unbuffered=True)
    lines = Collect()
    response.deliverBody(lines)
    return response, lines


@pytest_twisted.ensureDeferred
async def test_shutdown_lets_a_running_stream_finish_and_refuses_new_work(tmp_path: Path) -> None:
    daemon, sim = await serving(tmp_path, {}, tokens=20, tokens_per_second=40)
    port = daemon.address.port
    try:
        _, lines = await stream(daemon)
        await until(lambda: lines.data.count(b"\n") >= 2)
        stopping = daemon.stopService()
        await task.deferLater(reactor, 0.05, lambda: None)
        with pytest.raises(ConnectionRefusedError):
            await treq.get(f"http://127.0.0.1:{port}/api/version", persistent=False)
        assert not stopping.called, "the stream is still running"
        await lines.done
        assert lines.reason is not None
        assert lines.reason.check(ResponseFailed) is None, "the stream ended normally"
        last = json.loads(lines.data.splitlines()[-1])
        assert last["done"] is True and len(lines.data.splitlines()) == 21
        await stopping
    finally:
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_shutdown_cuts_off_what_outlives_the_drain_timeout(tmp_path: Path) -> None:
    daemon, sim = await serving(tmp_path, {"DrainTimeoutMs": 200}, tokens=200, tokens_per_second=20)
    try:
        _, lines = await stream(daemon)
        await until(lambda: lines.data.count(b"\n") >= 1)
        started = reactor.seconds()
        await daemon.stopService()
        assert reactor.seconds() - started < 2
        await lines.done
        assert lines.reason is not None
        assert lines.reason.check(ResponseFailed) is not None, (
            "cut off, never made to look complete"
        )
    finally:
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_a_new_request_on_an_open_connection_during_drain_is_503_and_closed(
    tmp_path: Path,
) -> None:
    daemon, sim = await serving(tmp_path, {}, tokens=20, tokens_per_second=40)
    try:
        daemon.gateway.draining = True
        raw = Collect()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.address.port), raw)
        raw.transport.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[union-attr]
        await raw.done  # the daemon closed the connection after answering
        head, _, body = raw.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert b"Connection: close" in head
        assert "shutting down" in json.loads(body)["error"]
    finally:
        daemon.gateway.draining = False
        await sim.stop()
        await daemon.stopService()


@pytest.mark.parametrize("sent", ["with the stream", "while it streams"])
@pytest_twisted.ensureDeferred
async def test_a_request_pipelined_behind_a_stream_during_drain_is_503_after_it(
    tmp_path: Path, sent: str
) -> None:
    """A request queued behind a stream still running when the drain starts is answered in its
    turn, 503 with Retry-After and Connection: close, never dropped unanswered; whether it came
    in the stream's read (parsed, waiting) or after it (bytes waiting unparsed)."""
    daemon, sim = await serving(tmp_path, {}, tokens=20, tokens_per_second=40)
    try:
        raw = Collect()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.address.port), raw)
        transport: Any = raw.transport
        if sent == "with the stream":
            transport.write(STREAM_REQUEST + NEXT_REQUEST)
        else:
            transport.write(STREAM_REQUEST)
        await until(lambda: raw.data.count(b'"done":') >= 2, what="the stream has begun")
        if sent == "while it streams":
            transport.write(NEXT_REQUEST)
            await until(
                lambda: any(c._waiting for c in daemon.acceptor.connections),
                what="the next request's bytes wait at the daemon",
            )
        stopping = daemon.stopService()
        await raw.done  # the daemon closed the connection after answering both
        answered = responses(raw.data)
        assert len(answered) == 2, (
            f"{len(answered)} response(s) to 2 requests: ...{raw.data[-120:]!r}"
        )
        (stream_head, stream_body), (head, body) = answered
        assert stream_head.startswith(b"HTTP/1.1 200"), stream_head
        assert b"Connection: close" not in stream_head, "its head went out before the drain"
        assert json.loads(stream_body.splitlines()[-1])["done"] is True
        assert len(stream_body.splitlines()) == 21, "the stream ran to its end"
        assert head.startswith(b"HTTP/1.1 503"), raw.data
        assert b"\r\nRetry-After: 1\r\n" in head
        assert b"\r\nConnection: close\r\n" in head
        assert "shutting down" in json.loads(body)["error"]
        await stopping
    finally:
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_draining_a_backend_stops_new_requests_and_lets_running_ones_finish(
    tmp_path: Path,
) -> None:
    daemon, sim = await serving(tmp_path, {}, tokens=20, tokens_per_second=40)
    other = await start_simulator(reactor)
    http = Http.to(daemon)
    try:
        await http.put(
            "/v1.0/backends", {"Identifier": "o", "Hostname": "127.0.0.1", "Port": other.port}
        )
        await http.put(
            "/v1.0/frontends/frontend1", {"Backends": ["s", "o"], "LoadBalancing": "RoundRobin"}
        )
        await until(lambda: daemon.runtime.state("o").healthy)
        await http.put("/v1.0/frontends/frontend1", {"Backends": ["s"]})
        _, lines = await stream(daemon)
        await until(lambda: lines.data.count(b"\n") >= 1)
        await http.put("/v1.0/frontends/frontend1", {"Backends": ["s", "o"]})
        reply = await http.request("POST", "/v1.0/backends/s/drain")
        assert reply.status == 200
        assert reply.json == {
            "Identifier": "s",
            "Active": False,
            "ActiveRequests": 1,
            "Drained": False,
        }
        for _ in range(4):
            response = await treq.get(f"http://127.0.0.1:{daemon.address.port}/api/version")
            await response.content()
            assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["o"]
        await lines.done
        assert lines.reason is not None
        assert lines.reason.check(ResponseFailed) is None
        assert json.loads(lines.data.splitlines()[-1])["done"] is True
        health = (await http.get("/v1.0/backends/s/health")).json
        assert health["ActiveRequests"] == 0
        drained = (await http.request("POST", "/v1.0/backends/s/drain")).json
        assert drained["Drained"] is True
        assert (await http.delete("/v1.0/backends/s?force=true")).status == 204
        assert (await http.request("POST", "/v1.0/backends/nope/drain")).status == 404
    finally:
        await other.stop()
        await sim.stop()
        await daemon.stopService()
