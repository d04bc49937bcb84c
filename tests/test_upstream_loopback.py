"""The backend client (``ollamaflow.upstream``) against real loopback servers (twisted.web and
scripted raw ones), and its parser and pool driven directly where timing must be exact; the
in-memory tests of every path are in test_upstream."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import pytest_twisted
from harness import until
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectError, ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    PotentialDataLoss,
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from ollamaflow import tcp
from ollamaflow.http1.rules import MAX_HEAD, BadMessage
from ollamaflow.records import Backend
from ollamaflow.upstream import Attempt, BackendClient
from ollamaflow.upstream.connection import Connection

# -- loopback servers -----------------------------------------------------------------------


@attrs.define
class Seen:
    """One request as a scripted server received it."""

    server: ScriptedConnection
    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def header(self, name: bytes) -> list[bytes]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                out.append(value.strip())
        return out


Handler = Callable[[Seen], None]


class ScriptedConnection(Protocol):
    """Reads whole requests (Content-Length or chunked) and lets the test's handler answer."""

    def __init__(self, backend: Scripted) -> None:
        self.backend = backend
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()
        self.first_read = b""

    def connectionMade(self) -> None:
        self.backend.connections.append(self)
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.first_read:
            self.first_read = data
        self.buffer += data
        while True:
            request = _take_request(self.buffer)
            if request is None:
                return
            head, body, self.buffer = request
            seen = Seen(self, head, body)
            self.backend.requests.append(seen)
            self.backend.handler(seen)

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.backend.lost += 1
        self.closed.callback(None)


def _take_request(buffer: bytes) -> tuple[bytes, bytes, bytes] | None:
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head, rest = buffer[:end], buffer[end + 4 :]
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        body = b""
        while True:
            line_end = rest.find(b"\r\n")
            if line_end < 0:
                return None
            size = int(rest[:line_end].split(b";")[0], 16)
            if len(rest) < line_end + 2 + size + 2:
                return None
            if size == 0:
                return head, body, rest[line_end + 4 :]
            body += rest[line_end + 2 : line_end + 2 + size]
            rest = rest[line_end + 2 + size + 2 :]
    length = 0
    for line in lowered.split(b"\r\n")[1:]:
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if len(rest) < length:
        return None
    return head, rest[:length], rest[length:]


class Scripted:
    """A raw TCP backend on loopback; ``handler`` writes each answer by hand."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections: list[ScriptedConnection] = []
        self.requests: list[Seen] = []
        self.lost = 0
        self.stopped = False
        factory = Factory.forProtocol(lambda: ScriptedConnection(self))
        factory.noisy = False
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]

    @property
    def backend(self) -> Backend:
        number = self.port.getHost().port  # type: ignore[attr-defined]
        return Backend(identifier="scripted", hostname="127.0.0.1", port=number)

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for connection in self.connections:
            if connection.transport is not None and connection.transport.connected:  # type: ignore[attr-defined]
                connection.transport.abortConnection()  # type: ignore[attr-defined]
        await maybeDeferred(self.port.stopListening)


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + extra
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


class Echo(resource.Resource):
    """twisted.web: answers with what it got (method, Host, body) and the headers it was sent."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        request.setHeader(b"X-Method", request.method)
        request.setHeader(b"X-Host", request.getHeader(b"host") or b"")
        request.setHeader(b"X-Connection", request.getHeader(b"connection") or b"-")
        request.setHeader(b"X-Length", request.getHeader(b"content-length") or b"-")
        request.setHeader(b"X-Chunked", request.getHeader(b"transfer-encoding") or b"-")
        if request.path == b"/chunked":
            request.write(b"part one;")
            request.write(b"part two")
            request.finish()
            return server.NOT_DONE_YET  # type: ignore[return-value]
        return b"echo:" + body


@attrs.define
class Env:
    client: BackendClient
    servers: list[Scripted]
    sites: list[Any]

    def serve(self, handler: Handler) -> Scripted:
        scripted = Scripted(handler)
        self.servers.append(scripted)
        return scripted

    def site(self) -> Backend:
        factory = server.Site(Echo())
        factory.noisy = False
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.sites.append(port)
        number = port.getHost().port  # type: ignore[attr-defined]
        return Backend(identifier="site", hostname="127.0.0.1", port=number)

    def idle(self, backend: Backend) -> list[Connection]:
        return self.client.pool.idle((backend.hostname, backend.port, backend.ssl))


@pytest_twisted.async_yield_fixture
async def env() -> AsyncIterator[Env]:
    made = Env(BackendClient(reactor, 5.0), [], [])
    yield made
    await made.client.close()
    for scripted in made.servers:
        await scripted.stop()
    for port in made.sites:
        await maybeDeferred(port.stopListening)


def headers(backend: Backend, **more: str) -> list[tuple[bytes, bytes]]:
    out = [(b"Host", f"{backend.hostname}:{backend.port}".encode())]
    for name, value in more.items():
        out.append((name.replace("_", "-").encode(), value.encode()))
    return out


class Collect(Protocol):
    """Gathers a response body and how it ended."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        #: Fires with None at the end (a Failure as a result would be an error).
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def received(self) -> int:
        return sum(len(c) for c in self.chunks)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(None)

    async def ended(self) -> Failure:
        await self.done
        assert self.reason is not None
        return self.reason


async def read(response: IResponse) -> tuple[bytes, Failure]:
    collect = Collect()
    response.deliverBody(collect)
    reason = await collect.ended()
    return collect.body, reason


def request(
    client: BackendClient, backend: Any, method: bytes, target: bytes, fields: Any, body: Any
) -> Deferred[IResponse]:
    """``client.send`` as a Deferred, as the tests wait on it; cancelling it cancels the send."""
    sent: list[Attempt] = []
    outcome: Deferred[IResponse] = Deferred(lambda _: sent[0].cancel())
    try:
        sent.append(
            client.send(backend, method, target, fields, body, outcome.callback, outcome.errback)
        )
    except ValueError as e:
        return fail(RequestGenerationFailed([Failure(e)]))
    return outcome


async def get(
    env: Env, backend: Backend, method: bytes = b"GET", target: bytes = b"/", body: Any = None
) -> tuple[IResponse, bytes, Failure]:
    response = await request(env.client, backend, method, target, headers(backend), body)
    data, reason = await read(response)
    return response, data, reason


# -- requests and responses against twisted.web ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_post_with_a_bytes_body_round_trips_against_twisted_web(env: Env) -> None:
    backend = env.site()
    response, body, reason = await get(env, backend, b"POST", b"/api/chat?x=1", b'{"a": 1}')
    assert (response.code, response.phrase, response.version) == (200, b"OK", (b"HTTP", 1, 1))
    assert body == b'echo:{"a": 1}'
    assert reason.check(ResponseDone)
    assert response.length == len(body)
    seen = response.headers
    assert seen.getRawHeaders(b"x-method") == [b"POST"]
    assert seen.getRawHeaders(b"x-host") == [f"127.0.0.1:{backend.port}".encode()]
    assert seen.getRawHeaders(b"x-length") == [b"8"]
    assert seen.getRawHeaders(b"x-connection") == [b"-"], "keep-alive is the default: not sent"
    for control in (b"content-length", b"connection", b"transfer-encoding", b"keep-alive"):
        assert not seen.hasHeader(control)
    assert IResponse.providedBy(response)


@pytest_twisted.ensureDeferred
async def test_a_post_without_a_body_says_content_length_zero(env: Env) -> None:
    backend = env.site()
    response, body, _ = await get(env, backend, b"POST", b"/", None)
    assert body == b"echo:"
    assert response.headers.getRawHeaders(b"x-length") == [b"0"]
    response, _, _ = await get(env, backend, b"GET", b"/", None)
    assert response.headers.getRawHeaders(b"x-length") == [b"-"]


@pytest_twisted.ensureDeferred
async def test_a_chunked_response_is_decoded_and_the_connection_reused(env: Env) -> None:
    backend = env.site()
    response, body, reason = await get(env, backend, b"GET", b"/chunked")
    assert body == b"part one;part two"
    assert response.length is UNKNOWN_LENGTH
    assert reason.check(ResponseDone)
    first = env.idle(backend)[-1]
    await get(env, backend)
    assert env.idle(backend) == [first], "one keep-alive connection served both"


@implementer(IBodyProducer)
class UnknownLength:
    """A producer of unknown length (sent chunked) that writes its pieces one by one."""

    length = UNKNOWN_LENGTH

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        for piece in self.pieces:
            consumer.write(piece)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_producer_bodies_stream_with_content_length_or_chunked(env: Env) -> None:
    backend = env.site()
    big = bytes(range(256)) * 8192  # 2 MiB, streamed by FileBodyProducer
    response, body, _ = await get(env, backend, b"PUT", b"/", FileBodyProducer(io.BytesIO(big)))
    assert body == b"echo:" + big
    assert response.headers.getRawHeaders(b"x-length") == [str(len(big)).encode()]
    response, body, _ = await get(env, backend, b"POST", b"/", UnknownLength([b"ab", b"", b"cd"]))
    assert body == b"echo:abcd"
    assert response.headers.getRawHeaders(b"x-chunked") == [b"chunked"]


@pytest_twisted.ensureDeferred
async def test_an_in_memory_body_is_sent_with_the_head_in_one_write(env: Env) -> None:
    scripted = env.serve(lambda seen: seen.server.write(ok()))
    await get(env, scripted.backend, b"POST", b"/api/chat", b'{"model": "m"}')
    await get(env, scripted.backend, b"POST", b"/api/chat", b'{"model": "n"}')
    assert [r.body for r in scripted.requests] == [b'{"model": "m"}', b'{"model": "n"}']
    assert scripted.connections[0].first_read.endswith(b'\r\n\r\n{"model": "m"}')


# -- framing, against scripted backends ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_response_split_into_single_bytes_over_the_wire(env: Env) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n"
    )

    def dribble(seen: Seen) -> None:
        async def go() -> None:
            for i in range(len(answer)):
                seen.server.write(answer[i : i + 1])
                await task.deferLater(reactor, 0.001, lambda: None)

        Deferred.fromCoroutine(go())

    scripted = env.serve(dribble)
    response, body, reason = await get(env, scripted.backend)
    assert body == b"hello!"
    assert reason.check(ResponseDone)
    assert response.headers.getRawHeaders(b"x-a") == [b"1"]
    assert not response.headers.hasHeader(b"x-trailer")
    assert len(env.idle(scripted.backend)) == 1


@pytest_twisted.ensureDeferred
async def test_a_close_delimited_body_ends_with_potential_data_loss(env: Env) -> None:
    def answer(seen: Seen) -> None:
        seen.server.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        seen.server.close()

    scripted = env.serve(answer)
    response, body, reason = await get(env, scripted.backend)
    assert body == b"until the end"
    assert response.length is UNKNOWN_LENGTH
    assert reason.check(PotentialDataLoss)
    assert env.idle(scripted.backend) == []


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (ok(extra=b"Connection: close\r\n"), False),
        (ok().replace(b"HTTP/1.1", b"HTTP/1.0"), False),
        (ok(extra=b"Connection: Keep-Alive\r\n").replace(b"HTTP/1.1", b"HTTP/1.0"), True),
        (ok(extra=b"Connection: keep-alive\r\n"), True),
    ],
)
@pytest_twisted.ensureDeferred
async def test_keep_alive_follows_what_the_server_says(
    env: Env, answer: bytes, reused: bool
) -> None:
    scripted = env.serve(lambda seen: seen.server.write(answer))
    response, body, reason = await get(env, scripted.backend)
    assert body == b"hello" and reason.check(ResponseDone)
    assert response.version[2] == (0 if b"HTTP/1.0" in answer else 1)
    if reused:
        assert len(env.idle(scripted.backend)) == 1
    else:
        await until(lambda: scripted.lost == 1)
        assert env.idle(scripted.backend) == []


@pytest.mark.parametrize(("method", "code"), [(b"HEAD", 200), (b"GET", 204), (b"GET", 304)])
@pytest_twisted.ensureDeferred
async def test_head_204_and_304_have_no_body(env: Env, method: bytes, code: int) -> None:
    def answer(seen: Seen) -> None:
        # A HEAD answer's Content-Length describes the GET's body: none follows.
        seen.server.write(b"HTTP/1.1 %d Whatever\r\nContent-Length: 42\r\n\r\n" % code)

    scripted = env.serve(answer)
    response, body, reason = await get(env, scripted.backend, method)
    assert (response.code, response.length, body) == (code, 0, b"")
    assert reason.check(ResponseDone)
    head_length = response.headers.getRawHeaders(b"content-length")
    assert head_length == ([b"42"] if method == b"HEAD" else None)
    await get(env, scripted.backend, method)
    assert len(scripted.connections) == 1, "the connection was reused"


@pytest_twisted.ensureDeferred
async def test_interim_100_continue_is_skipped(env: Env) -> None:
    def answer(seen: Seen) -> None:
        seen.server.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        seen.server.write(b"HTTP/1.1 102 Processing\r\nX-Interim: 1\r\n\r\n" + ok(b"final"))

    scripted = env.serve(answer)
    response, body, _ = await get(env, scripted.backend, b"POST", b"/", b"x")
    assert (response.code, body) == (200, b"final")
    assert not response.headers.hasHeader(b"x-interim")


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * MAX_HEAD,  # never ends
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_broken_response_head_fails_the_request(env: Env, answer: bytes) -> None:
    scripted = env.serve(lambda seen: seen.server.write(answer))
    with pytest.raises(ResponseFailed) as raised:
        await request(env.client, scripted.backend, b"GET", b"/", headers(scripted.backend), None)
    assert not isinstance(raised.value, ResponseNeverReceived), "bytes did come back"
    await until(lambda: scripted.lost == 1)
    assert env.idle(scripted.backend) == []


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",  # not hex
        b"0x5\r\nhello\r\n0\r\n\r\n",  # int() would take it; HTTP does not
        b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the data
        b"5" * 5000,  # a chunk-size line that never ends
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_chunk_framing_fails_the_body(env: Env, body: bytes) -> None:
    scripted = env.serve(
        lambda seen: seen.server.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        )
    )
    response, _, reason = await get(env, scripted.backend)
    assert response.code == 200
    assert reason.check(ResponseFailed)
    await until(lambda: scripted.lost == 1)


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_mid_body_fails_the_body(env: Env) -> None:
    def answer(seen: Seen) -> None:
        seen.server.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        seen.server.close()

    scripted = env.serve(answer)
    response, body, reason = await get(env, scripted.backend)
    assert (response.length, body) == (100, b"only part")
    assert reason.check(ResponseFailed)


# -- connections -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_a_connect_error(env: Env) -> None:
    scripted = env.serve(lambda seen: None)
    backend = scripted.backend
    await scripted.stop()
    with pytest.raises(ConnectError):
        await request(env.client, backend, b"GET", b"/", headers(backend), None)


@pytest_twisted.ensureDeferred
async def test_an_ip_address_is_dialled_directly_and_a_host_name_through_an_endpoint(
    env: Env,
) -> None:
    """Both ways reach the backend and pool the connection; only the direct one has the
    transport that sends at once (an endpoint wraps the protocol and picks its own)."""
    scripted = env.serve(lambda seen: seen.server.write(ok()))
    by_address = scripted.backend
    by_name = attrs.evolve(by_address, hostname="localhost")
    for backend in (by_address, by_name):
        _, body, _ = await get(env, backend)
        assert body == b"hello"
    assert isinstance(env.idle(by_address)[0].transport, tcp.Client)
    assert not isinstance(env.idle(by_name)[0].transport, tcp.Client)
    assert len(scripted.connections) == 2


class Outcomes:
    """What an Attempt reported, in order."""

    def __init__(self) -> None:
        self.seen: list[object] = []
        self.done: Deferred[None] = Deferred()

    def response(self, response: IResponse) -> None:
        self.seen.append(response.code)
        self.done.callback(None)

    def failure(self, failure: Failure) -> None:
        self.seen.append(failure.type)
        self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_send_reports_the_response_or_the_failure_once(env: Env) -> None:
    scripted = env.serve(lambda seen: seen.server.write(ok()))
    backend = scripted.backend
    answered = Outcomes()
    attempt = env.client.send(
        backend, b"GET", b"/", headers(backend), None, answered.response, answered.failure
    )
    await answered.done
    attempt.cancel()  # too late: nothing more is reported
    assert answered.seen == [200]

    cancelled = Outcomes()
    attempt = env.client.send(
        backend, b"GET", b"/", headers(backend), None, cancelled.response, cancelled.failure
    )
    attempt.cancel()  # before the response head
    attempt.cancel()
    assert cancelled.seen == [CancelledError]

    await scripted.stop()
    refused = Outcomes()
    env.client.send(
        backend, b"GET", b"/", headers(backend), None, refused.response, refused.failure
    )
    await refused.done
    assert len(refused.seen) == 1 and issubclass(refused.seen[0], ConnectError)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        env.client.send(backend, b"G T", b"/", headers(backend), None, print, print)


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_the_server_closes_leaves_the_pool(env: Env) -> None:
    scripted = env.serve(lambda seen: seen.server.write(ok()))
    await get(env, scripted.backend)
    assert len(env.idle(scripted.backend)) == 1
    scripted.connections[0].close()
    await until(lambda: not env.idle(scripted.backend))
    _, body, _ = await get(env, scripted.backend)
    assert body == b"hello" and len(scripted.connections) == 2


@pytest_twisted.ensureDeferred
async def test_bytes_on_an_idle_connection_close_it(env: Env) -> None:
    scripted = env.serve(lambda seen: seen.server.write(ok()))
    await get(env, scripted.backend)
    scripted.connections[0].write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    await until(lambda: scripted.lost == 1)
    assert env.idle(scripted.backend) == []
    _, body, _ = await get(env, scripted.backend)
    assert body == b"hello"


def test_empty_lines_on_an_idle_connection_are_skipped() -> None:
    """As llhttp skips them after a response in the same read: where reads split must not
    decide whether the connection is kept."""
    client = BackendClient(task.Clock(), 5.0)
    ((connection, transport),) = _pooled(client, 1)
    connection.dataReceived(b"\r\n\r\n")
    assert not transport.disconnecting
    assert client.pool.idle(("10.0.0.1", 80, False)) == [connection]
    connection.dataReceived(b"\r\nHTTP/1.1 408 Request Timeout\r\n\r\n")
    assert transport.disconnecting and len(client.pool) == 0


@pytest_twisted.ensureDeferred
async def test_fields_the_backend_names_in_connection_are_dropped(env: Env) -> None:
    """The client sees the backend's Connection field, so it drops what that names, and every
    other hop-by-hop field (README: dropped both ways); the gateway's to_client copies the
    rest as it is."""
    answer = ok(
        extra=b"Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Connection: X-Other\r\nX-Other: 2\r\nX-Kept: 3\r\nTrailer: X-T\r\n"
        b"Proxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
    )
    scripted = env.serve(lambda seen: seen.server.write(answer))
    response, body, reason = await get(env, scripted.backend)
    assert body == b"hello" and reason.check(ResponseDone)
    assert sorted(response.headers.getAllRawHeaders()) == [
        (b"Content-Type", [b"text/plain"]),
        (b"X-Kept", [b"3"]),
    ]
    assert len(env.idle(scripted.backend)) == 1, "keep-alive: the connection is reused"


@pytest_twisted.ensureDeferred
async def test_a_reused_connection_found_dead_is_retried_once_on_a_fresh_one(env: Env) -> None:
    def answer(seen: Seen) -> None:
        if len(seen.server.backend.requests) == 2:
            seen.server.close()  # closed "as we wrote": the request goes unanswered
        else:
            seen.server.write(ok(b"%d" % len(seen.server.backend.requests)))

    scripted = env.serve(answer)
    await get(env, scripted.backend)
    _, body, _ = await get(env, scripted.backend, b"POST", b"/", b"again")
    assert body == b"3"
    assert len(scripted.connections) == 2
    assert [r.body for r in scripted.requests] == [b"", b"again", b"again"]


@pytest_twisted.ensureDeferred
async def test_a_fresh_connection_closed_unanswered_is_response_never_received(env: Env) -> None:
    def answer(seen: Seen) -> None:
        if len(seen.server.backend.requests) == 1:
            seen.server.write(ok())
        else:
            seen.server.close()

    scripted = env.serve(answer)
    await get(env, scripted.backend)
    with pytest.raises(ResponseNeverReceived):
        await request(env.client, scripted.backend, b"GET", b"/", headers(scripted.backend), None)
    assert len(scripted.requests) == 3, "the first attempt, then exactly one retry"


@pytest_twisted.ensureDeferred
async def test_cancelling_before_the_head_aborts_the_connection(env: Env) -> None:
    scripted = env.serve(lambda seen: None)  # never answers
    attempt = request(env.client, scripted.backend, b"GET", b"/", headers(scripted.backend), None)
    await until(lambda: len(scripted.requests) == 1)
    attempt.cancel()
    with pytest.raises(CancelledError):
        await attempt
    await until(lambda: scripted.lost == 1)
    assert env.idle(scripted.backend) == []


@pytest_twisted.ensureDeferred
async def test_cancelling_while_connecting(env: Env) -> None:
    scripted = env.serve(lambda seen: seen.server.write(ok()))
    attempt = request(env.client, scripted.backend, b"GET", b"/", headers(scripted.backend), None)
    attempt.cancel()
    with pytest.raises(CancelledError):
        await attempt
    _, body, _ = await get(env, scripted.backend)
    assert body == b"hello"


class Slow(Collect):
    """Pauses its transport from the first byte on (connectionMade: pause before any byte)."""

    def __init__(self, pause_at_once: bool = False) -> None:
        super().__init__()
        self.pause_at_once = pause_at_once

    def connectionMade(self) -> None:
        if self.pause_at_once:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.chunks:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        super().dataReceived(data)


@pytest_twisted.ensureDeferred
async def test_pausing_the_body_stops_reading_the_backend(env: Env) -> None:
    size = 20_000_000

    def answer(seen: Seen) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
        seen.server.write(head + b"x" * size)

    scripted = env.serve(answer)
    response = await request(
        env.client, scripted.backend, b"GET", b"/", headers(scripted.backend), None
    )
    reader = Slow()
    response.deliverBody(reader)
    previous = -1
    while reader.received != previous:
        previous = reader.received
        await task.deferLater(reactor, 0.1, lambda: None)
    assert 0 < reader.received < size // 4, "reading stopped while paused"
    reader.transport.resumeProducing()  # type: ignore[union-attr]
    reason = await reader.ended()
    assert reason.check(ResponseDone) and reader.received == size


@pytest_twisted.ensureDeferred
async def test_a_pause_in_connection_made_holds_every_byte(env: Env) -> None:
    scripted = env.serve(lambda seen: seen.server.write(ok(b"a" * 1000)))
    response = await request(
        env.client, scripted.backend, b"GET", b"/", headers(scripted.backend), None
    )
    reader = Slow(pause_at_once=True)
    response.deliverBody(reader)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert reader.received == 0
    reader.transport.resumeProducing()  # type: ignore[union-attr]
    await reader.done
    assert reader.body == b"a" * 1000


@pytest_twisted.ensureDeferred
async def test_stop_producing_mid_body_aborts_the_backend_connection(env: Env) -> None:
    def answer(seen: Seen) -> None:
        seen.server.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")

    scripted = env.serve(answer)
    response = await request(
        env.client, scripted.backend, b"GET", b"/", headers(scripted.backend), None
    )

    class Stopper(Collect):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            self.transport.stopProducing()  # type: ignore[union-attr]

    stopper = Stopper()
    response.deliverBody(stopper)
    reason = await stopper.ended()
    assert stopper.body == b"first"
    assert isinstance(reason.value, ResponseFailed)
    assert reason.value.reasons[0].check(ConnectionAborted)
    await until(lambda: scripted.lost == 1)
    assert env.idle(scripted.backend) == []


@pytest_twisted.ensureDeferred
async def test_the_body_is_kept_until_deliver_body(env: Env) -> None:
    scripted = env.serve(lambda seen: seen.server.write(ok(b"b" * 5000)))
    response = await request(
        env.client, scripted.backend, b"GET", b"/", headers(scripted.backend), None
    )
    await task.deferLater(reactor, 0.05, lambda: None)  # the whole body has arrived by now
    assert len(env.idle(scripted.backend)) == 1, "complete: the connection went back already"
    body, reason = await read(response)
    assert body == b"b" * 5000 and reason.check(ResponseDone)
    with pytest.raises(RuntimeError):
        response.deliverBody(Collect())


@pytest_twisted.ensureDeferred
async def test_forget_and_close_close_idle_connections(env: Env) -> None:
    first = env.serve(lambda seen: seen.server.write(ok()))
    second = env.serve(lambda seen: seen.server.write(ok()))
    await get(env, first.backend)
    await get(env, second.backend)
    b = second.backend
    env.client.forget({(b.hostname, b.port, b.ssl)})
    await until(lambda: first.lost == 1)
    assert len(env.idle(second.backend)) == 1
    await env.client.close()
    await until(lambda: second.lost == 1)
    assert len(env.client.pool) == 0


# -- the pool and the parser, driven directly ---------------------------------------------------


class Where:
    hostname, port, ssl = "10.0.0.1", 80, False


def _pooled(client: BackendClient, count: int) -> list[tuple[Connection, StringTransport]]:
    """Connections on in-memory transports, as if connected, in the client's pool."""
    where = (Where.hostname, Where.port, Where.ssl)
    client.pool.dialled(where)
    out = []
    for _ in range(count):
        connection = Connection(client.pool, where)
        transport = StringTransport()
        connection.makeConnection(transport)
        client.pool.release(connection)
        out.append((connection, transport))
    return out


def test_idle_connections_expire_in_one_periodic_sweep() -> None:
    clock = task.Clock()
    client = BackendClient(clock, 5.0, idle_seconds=10.0)  # a sweep every 5 s
    old = _pooled(client, 2)
    clock.pump([1] * 6)
    new = _pooled(client, 1)
    assert len(clock.getDelayedCalls()) == 1, "one sweep for the client, not one per connection"
    clock.pump([1] * 6)  # t=12: the sweep at 10 closed the two idle since 0
    assert all(t.disconnecting for _, t in old)
    assert not new[0][1].disconnecting
    assert client.pool.idle(("10.0.0.1", 80, False)) == [new[0][0]]
    clock.pump([1] * 4)  # t=16: idle for 10 s, closed by the sweep at 20 at the latest
    assert not new[0][1].disconnecting
    clock.pump([1] * 4)
    assert new[0][1].disconnecting and len(client.pool) == 0
    assert clock.getDelayedCalls() == [], "no sweep while nothing is idle"


def test_at_most_max_idle_connections_are_kept() -> None:
    client = BackendClient(task.Clock(), 5.0, max_idle_per_backend=2)
    made = _pooled(client, 3)
    assert [t.disconnecting for _, t in made] == [False, False, True]


def _exchange(answer_pieces: list[bytes], method: bytes = b"GET") -> dict[str, Any]:
    """Send one request on an in-memory connection and feed the answer piece by piece."""
    client = BackendClient(task.Clock(), 5.0)
    ((connection, transport),) = _pooled(client, 1)
    out: dict[str, Any] = {"writes": 0}
    original = transport.write

    def counting(data: bytes) -> None:
        out["writes"] += 1
        original(data)

    transport.write = counting  # type: ignore[method-assign]
    attempt = request(client, Where, method, b"/x", [(b"Host", b"h")], b"body")
    collect = Collect()
    attempt.addCallback(lambda response: (out.update(response=response), response)[1])
    attempt.addCallback(lambda response: response.deliverBody(collect))
    attempt.addErrback(lambda failure: out.update(failure=failure))
    for piece in answer_pieces:
        connection.dataReceived(piece)
    out.update(
        sent=transport.value(),
        body=collect.body,
        reason=collect.reason,
        chunks=collect.chunks,
        pooled=client.pool.idle(("10.0.0.1", 80, False)) == [connection],
    )
    return out


WIRE_ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a=b\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
]
#: Leniencies of the hand-written parser that llhttp refuses: bare LF line ends (head, chunk
#: lines, trailers) and obsolete line folding (which was unfolded into one value).
REFUSED_WIRE_ANSWERS = [
    b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n5\nhello\n0\nTrailer: x\n\n",
    b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\nContent-Length: 5\r\n\r\nhello",
]


def _splits(answer: bytes) -> list[list[bytes]]:
    """The answer whole, a byte at a time, and cut in two at every place."""
    return [
        [answer],
        [answer[i : i + 1] for i in range(len(answer))],
        *([answer[:cut], answer[cut:]] for cut in range(1, len(answer))),
    ]


@pytest.mark.parametrize("answer", WIRE_ANSWERS)
def test_every_split_of_the_answer_parses_the_same(answer: bytes) -> None:
    whole = _exchange([answer])
    assert whole["body"] == b"hello" and whole["reason"].check(ResponseDone) and whole["pooled"]
    for pieces in _splits(answer):
        split = _exchange(pieces)
        assert split["body"] == b"hello", pieces
        assert split["pooled"], pieces


@pytest.mark.parametrize("answer", REFUSED_WIRE_ANSWERS)
def test_every_split_of_a_lenient_answer_is_refused(answer: bytes) -> None:
    for pieces in _splits(answer):
        out = _exchange(pieces)
        assert "response" not in out, pieces
        assert out["failure"].check(ResponseFailed), pieces
        assert out["failure"].value.reasons[0].check(BadMessage), pieces
        assert not out["pooled"], pieces


def test_the_request_is_one_write_with_framing_and_no_connection_header() -> None:
    out = _exchange([WIRE_ANSWERS[0]], method=b"POST")
    assert out["writes"] == 1
    assert out["sent"] == b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nHost: h\r\n\r\nbody"


def test_chunks_are_delivered_as_decoded_without_waiting() -> None:
    out = _exchange(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
            b"c\r\n2\r\nde\r\n",
            b"0\r\n\r\n",
        ]
    )
    assert out["chunks"] == [b"ab", b"c", b"de"]


def test_bytes_after_a_complete_response_close_the_connection() -> None:
    out = _exchange([WIRE_ANSWERS[0] + b"HTTP/1.1 200 OK\r\n"])
    assert out["body"] == b"hello" and not out["pooled"]


def test_a_body_before_deliver_body_pauses_reading_until_then() -> None:
    client = BackendClient(task.Clock(), 5.0)
    ((connection, transport),) = _pooled(client, 1)
    responses: list[IResponse] = []
    request(client, Where, b"GET", b"/", [(b"Host", b"h")], None).addCallback(responses.append)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    assert transport.producerState == "paused"
    collect = Collect()
    responses[0].deliverBody(collect)
    assert collect.body == b"01234" and transport.producerState == "producing"
    connection.dataReceived(b"56789")
    assert collect.reason is not None and collect.reason.check(ResponseDone)
    assert client.pool.idle(("10.0.0.1", 80, False)) == [connection]


@implementer(IBodyProducer)
class Endless:
    """A streaming body that never finishes."""

    length = 1000

    def __init__(self) -> None:
        self.stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(b"a" * 10)
        return Deferred()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


def test_a_response_before_the_request_body_is_sent_closes_the_connection() -> None:
    client = BackendClient(task.Clock(), 5.0)
    ((connection, transport),) = _pooled(client, 1)
    producer = Endless()
    responses: list[IResponse] = []
    request(client, Where, b"PUT", b"/", [(b"Host", b"h")], producer).addCallback(responses.append)
    assert transport.value().endswith(b"Content-Length: 1000\r\nHost: h\r\n\r\naaaaaaaaaa")
    connection.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert responses[0].code == 413
    assert producer.stopped and transport.disconnecting
    assert len(client.pool) == 0


def test_a_body_that_came_with_its_head_is_complete_when_the_caller_sees_it() -> None:
    """A small answer is whole at the callback: the connection is back in the pool and the
    body and its end reach the reader inside ``deliverBody`` (no timer needed to wait)."""
    client = BackendClient(task.Clock(), 5.0)
    ((connection, _transport),) = _pooled(client, 1)
    seen: list[object] = []

    class Reader(Protocol):
        def dataReceived(self, data: bytes) -> None:
            seen.append(data)

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            seen.append(reason.type)

    def responded(response: IResponse) -> None:
        seen.append(("pooled", connection in client.pool.idle(where)))
        response.deliverBody(Reader())
        seen.append("delivered")

    where = (Where.hostname, Where.port, Where.ssl)
    request(client, Where, b"GET", b"/", [(b"Host", b"h")], None).addCallback(responded)
    connection.dataReceived(ok(b"whole"))
    assert seen == [("pooled", True), b"whole", ResponseDone, "delivered"]


# -- parity with Twisted's own client -----------------------------------------------------------

PARITY_ANSWERS = [
    ok(b'{"done": true}', extra=b"X-Custom: a\r\nX-Custom: b\r\nKeep-Alive: timeout=5\r\n"),
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    b"4\r\nabcd\r\n3;ext\r\nefg\r\n0\r\n\r\n",
    b"HTTP/1.1 500 \r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nclose-delimited",
]


async def parity_views(backend: Backend, lean: BackendClient, method: bytes) -> list[Any]:
    """What Twisted's Agent and the lean client each make of one request to ``backend``:
    status, phrase, headers, length, body and how the body ended."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)
    url = f"http://{backend.hostname}:{backend.port}/".encode()
    views = []
    for attempt in (
        agent.request(method, url, Headers()),
        request(lean, backend, method, b"/", headers(backend), None),
    ):
        response = await attempt
        body, reason = await read(response)
        views.append(
            (
                response.code,
                response.phrase,
                sorted(response.headers.getAllRawHeaders()),
                response.length,
                body,
                type(reason.value),
            )
        )
    await pool.closeCachedConnections()
    return views


@pytest.mark.parametrize("answer", PARITY_ANSWERS)
@pytest_twisted.ensureDeferred
async def test_parity_with_twisteds_client(env: Env, answer: bytes) -> None:
    def write(seen: Seen) -> None:
        seen.server.write(answer)
        if b"HTTP/1.0" in answer:
            seen.server.close()

    scripted = env.serve(write)
    twisted_view, lean_view = await parity_views(scripted.backend, env.client, b"GET")
    assert lean_view == twisted_view
