"""The lean HTTP/1.1 server and the front door: parsing, routing, response framing, body limits,
backpressure, the idle sweep and drain; in memory over a StringTransport, and over a real
socket."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from harness import TOKEN, Http, start_daemon, until
from recorder import Recorder, start_recorder
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ollamaflow.daemon import Daemon
from ollamaflow.frontdoor import ADMIN_MAX_BODY, OLLAMA_IS_RUNNING, FrontDoor, Root
from ollamaflow.gateway.clienterrors import openai_error_type
from ollamaflow.gateway.headers import to_client
from ollamaflow.http1.rules import MAX_FIELDS, MAX_HEAD
from ollamaflow.server.acceptor import Acceptor, Timeouts
from ollamaflow.server.body import IN_MEMORY_BODY
from ollamaflow.server.connection import HTTPConnection
from ollamaflow.server.interfaces import ClientRequest, RequestHead

#: The clock's time when a test starts: a real date, so the Date header means something.
NOW = 1_700_000_000.0

# -- parsing responses -----------------------------------------------------------------------------


class Incomplete(Exception):
    """The bytes end inside a response."""


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunked: bool = False

    def values(self, name: bytes) -> list[bytes]:
        """Every value of a header field, in order."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def header(self, name: bytes) -> bytes | None:
        """The only value of a header field (None when absent)."""
        found = self.values(name)
        assert len(found) <= 1, f"{name!r} more than once: {found}"
        return found[0] if found else None

    def json(self) -> Any:
        return json.loads(self.body)


def _chunked_body(data: bytes, pos: int) -> tuple[bytes, int]:
    body = b""
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise Incomplete
        size = int(data[pos:end], 16)
        pos = end + 2
        if len(data) < pos + size + 2:
            raise Incomplete
        if size == 0:
            assert data[pos : pos + 2] == b"\r\n", "no trailers expected"
            return body, pos + 2
        body += data[pos : pos + size]
        assert data[pos + size : pos + size + 2] == b"\r\n", "chunk data ends with CRLF"
        pos += size + 2


def _one_response(data: bytes, pos: int, *, head: bool, eof: bool) -> tuple[Response, int]:
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        raise Incomplete
    lines = data[pos:end].split(b"\r\n")
    version, code, _ = lines[0].split(b" ", 2)
    assert version == b"HTTP/1.1"
    response = Response(int(code), [])
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        assert colon and name == name.strip(), f"malformed header line {line!r}"
        response.headers.append((name, value.strip()))
    pos = end + 4
    if head or response.status < 200 or response.status in (204, 304):
        return response, pos
    if response.header(b"transfer-encoding") == b"chunked":
        assert response.header(b"content-length") is None
        response.chunked = True
        response.body, pos = _chunked_body(data, pos)
        return response, pos
    length = response.header(b"content-length")
    if length is not None:
        if len(data) < pos + int(length):
            raise Incomplete
        response.body = data[pos : pos + int(length)]
        return response, pos + int(length)
    if not eof:
        raise Incomplete  # close-delimited: the body ends when the connection does
    response.body = data[pos:]
    return response, len(data)


def parse_responses(data: bytes, *, head: bool = False, eof: bool = False) -> list[Response]:
    """Every response in ``data``, which must hold whole responses and nothing else; ``eof``:
    the connection is closed, so a body without framing ends with the bytes."""
    responses = []
    pos = 0
    while pos < len(data):
        response, pos = _one_response(data, pos, head=head, eof=eof)
        responses.append(response)
    return responses


def complete_responses(data: bytes) -> int:
    """How many whole (framed) responses ``data`` starts with."""
    count = pos = 0
    try:
        while pos < len(data):
            _, pos = _one_response(data, pos, head=False, eof=False)
            count += 1
    except Incomplete:
        pass
    return count


# -- building requests -----------------------------------------------------------------------------


def http(
    method: bytes,
    target: bytes,
    *fields: bytes,
    body: bytes = b"",
    version: bytes = b"HTTP/1.1",
    host: bytes | None = b"flow.example",
) -> bytes:
    """One request's bytes: Host first (unless None), the fields, Content-Length for a body."""
    lines = [b"%s %s %s" % (method, target, version)]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += fields
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def get(target: bytes = b"/api/tags", *fields: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return http(b"GET", target, *fields, version=version)


def chunked_head(target: bytes = b"/api/generate", *fields: bytes) -> bytes:
    return http(b"POST", target, b"Transfer-Encoding: chunked", *fields)


# -- test doubles ----------------------------------------------------------------------------------

Handler = Callable[[ClientRequest], "bytes | int"]


def answer(request: ClientRequest) -> bytes:
    """An immediate answer naming the request, with its Content-Length (as the gateway sets)."""
    body = b"gateway %s %s" % (request.method, request.uri)
    request.setHeader(b"Content-Type", b"text/plain")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def hold(request: ClientRequest) -> int:
    """Keep the request: the test answers it later."""
    return NOT_DONE_YET


def reply(request: ClientRequest, body: bytes, status: int = 200) -> None:
    """Answer a held request in one piece."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


class Gateway:
    """Records each request and the body it had when rendered; answers with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[ClientRequest] = []
        self.bodies: list[bytes] = []

    def render(self, request: ClientRequest) -> bytes | int:
        self.requests.append(request)
        content = request.content
        self.bodies.append(b"" if content is None else content.read())
        return self.handler(request)


class Admin(Resource):
    """The admin API's stand-in: echoes method, path, X-Test and the body as JSON."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        if request.path == b"/v1.0/boom":
            raise RuntimeError("bug in the admin API")
        if request.path == b"/v1.0/stream":
            request.write(b"part one, ")
            request.write(b"part two")
            request.finish()
            return NOT_DONE_YET
        content = request.content
        assert content is not None
        document = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "path": request.path.decode(),
            "x-test": (request.getHeader(b"x-test") or b"").decode(),
            "body": content.read().decode(),
        }
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(document).encode()


@implementer(IPushProducer)
class Producer:
    """A push producer that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


@dataclass
class Conn:
    """One in-memory client connection."""

    proto: HTTPConnection
    transport: StringTransport

    def send(self, *pieces: bytes) -> None:
        """Deliver bytes to the server, one dataReceived per piece."""
        for piece in pieces:
            self.proto.dataReceived(piece)

    @property
    def closed(self) -> bool:
        """Whether the server closed (or is closing) the connection."""
        return bool(self.transport.disconnecting)

    def responses(self, *, head: bool = False) -> list[Response]:
        return parse_responses(self.transport.value(), head=head, eof=self.closed)

    def response(self, *, head: bool = False) -> Response:
        """The one response written so far; the transport is cleared for the next."""
        (only,) = self.responses(head=head)
        self.transport.clear()
        return only

    def lose(self) -> None:
        """The client goes away."""
        self.proto.connectionLost(Failure(ConnectionDone()))


class Server:
    """An Acceptor of a FrontDoor with a gateway double, the Admin resource and a fake
    clock."""

    def __init__(
        self,
        handler: Handler = answer,
        *,
        limit: int = 4 * IN_MEMORY_BODY,
        idle_timeout: float = 10.0,
        read_timeout: float = 5.0,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.gateway = Gateway(handler)
        self.limit = limit
        #: The Host of each client request whose body limit was asked.
        self.limit_calls: list[bytes | None] = []
        self.front_door = FrontDoor(self.gateway, Root(Admin(), metrics=None), self.body_limit)
        #: The path of each request whose body limit the connection asked the front door.
        self.limit_paths: list[bytes] = []
        asked = self.front_door.body_limit

        def body_limit(head: RequestHead) -> int:
            self.limit_paths.append(head.path)
            return asked(head)

        self.front_door.body_limit = body_limit  # type: ignore[method-assign]
        self.acceptor = Acceptor(
            self.front_door, self.clock, timeouts=Timeouts(idle_timeout, read_timeout)
        )

    def body_limit(self, host: bytes | None) -> int:
        self.limit_calls.append(host)
        return self.limit

    def connect(self) -> Conn:
        proto = self.acceptor.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        assert isinstance(proto, HTTPConnection)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 40000))
        proto.makeConnection(transport)
        return Conn(proto, transport)

    @property
    def held(self) -> ClientRequest:
        """The last request the gateway got."""
        return self.gateway.requests[-1]


@pytest.fixture
def sweeping() -> Iterator[Server]:
    """A server whose idle sweep runs on its clock."""
    server = Server()
    server.acceptor.startFactory()
    yield server
    server.acceptor.stopFactory()


def error_message(response: Response, status: int, path: bytes = b"/api/tags") -> str:
    """Check a JSON error in the dialect of ``path``; its message."""
    assert response.status == status
    assert response.header(b"content-type") == b"application/json"
    document = response.json()
    if path.startswith(b"/v1.0"):
        assert set(document) == {"Error", "Message", "StatusCode", "Description"}
        assert document["StatusCode"] == status
        return str(document["Description"])
    if path.startswith(b"/v1/"):
        assert set(document) == {"error"}
        error = document["error"]
        assert isinstance(error, dict) and isinstance(error["message"], str)
        assert error["type"] == openai_error_type(status)
        return error["message"]
    assert set(document) == {"error"} and isinstance(document["error"], str)
    return str(document["error"])


def assert_rejected(server: Server, conn: Conn, status: int, path: bytes = b"/api/tags") -> str:
    """The request got a JSON error, the connection closes, the gateway never saw it."""
    response = conn.response()
    message = error_message(response, status, path)
    assert response.header(b"connection") == b"close"
    assert response.header(b"date"), "dated like every other response"
    assert conn.closed
    assert server.gateway.requests == []
    return message


def assert_rejected_after(conn: Conn, status: int, path: bytes = b"/api/tags") -> None:
    """The connection's next response is a JSON error, and the connection closes."""
    error_message(conn.response(), status, path)
    assert conn.closed


# -- 1. a simple GET, keep-alive -------------------------------------------------------------------


def test_get_reaches_the_gateway_with_its_request_line_fields_and_peer() -> None:
    server = Server()
    conn = server.connect()
    conn.send(
        b"GET /api/tags?x=1&y=2 HTTP/1.1\r\nHost: flow.example\r\nX-Trace: a\r\n"
        b"accept:*/*\r\nX-Trace:  b \r\n\r\n"
    )
    (request,) = server.gateway.requests
    assert request.method == b"GET"
    assert request.uri == b"/api/tags?x=1&y=2"
    assert request.path == b"/api/tags"
    assert request.clientproto == b"HTTP/1.1"
    assert request.headers == [
        (b"Host", b"flow.example"),
        (b"X-Trace", b"a"),
        (b"accept", b"*/*"),
        (b"X-Trace", b"b"),
    ]
    assert request.header(b"host") == b"flow.example"
    assert request.header(b"x-trace") == b"b"
    assert request.header(b"accept") == b"*/*"
    assert request.client_host == "10.0.0.7"
    assert request.secure is False
    assert request.content is None


def test_response_has_status_headers_date_and_length_and_the_connection_stays_open() -> None:
    def rich(request: ClientRequest) -> bytes:
        request.setResponseCode(201)
        request.setHeader(b"X-Custom", b"replaced")
        request.setHeader(b"X-Custom", b"kept")
        request.addHeader(b"Set-Cookie", b"a=1")
        request.addHeader(b"Set-Cookie", b"b=2")
        return answer(request)

    server = Server(rich)
    conn = server.connect()
    conn.send(get(b"/api/tags"))
    response = conn.response()
    assert response.status == 201
    assert conn.transport.value() == b""
    assert response.values(b"set-cookie") == [b"a=1", b"b=2"]
    assert response.header(b"x-custom") == b"kept"
    assert response.header(b"date") == datetimeToString(int(NOW))
    assert response.header(b"content-length") == b"%d" % len(response.body)
    assert response.header(b"connection") is None
    assert response.body == b"gateway GET /api/tags"
    assert not conn.closed

    server.clock.advance(3600)
    conn.send(get(b"/api/ps"))
    second = conn.response()
    assert second.body == b"gateway GET /api/ps"
    assert second.header(b"date") == datetimeToString(int(NOW) + 3600)
    assert len(server.gateway.requests) == 2
    assert not conn.closed


def test_status_line_uses_the_phrase_given_or_the_standard_one() -> None:
    def custom(request: ClientRequest) -> bytes:
        request.setResponseCode(
            299 if request.path == b"/a" else 404, b"Odd" if request.path == b"/a" else None
        )
        return answer(request)

    server = Server(custom)
    conn = server.connect()
    conn.send(get(b"/a"), get(b"/b"))
    value = conn.transport.value()
    assert value.startswith(b"HTTP/1.1 299 Odd\r\n")
    assert b"HTTP/1.1 404 Not Found\r\n" in value


# -- 2. bodies by Content-Length -------------------------------------------------------------------


def test_a_body_in_pieces_is_complete_when_the_gateway_sees_it() -> None:
    server = Server()
    conn = server.connect()
    body = b'{"model": "llama3", "prompt": "why is the sky blue?"}'
    conn.send(http(b"POST", b"/api/generate", body=body)[: -len(body)])
    conn.send(body[:10], body[10:11])
    assert server.gateway.requests == []
    conn.send(body[11:])
    assert server.gateway.bodies == [body]
    assert conn.response().body == b"gateway POST /api/generate"


def test_a_body_larger_than_kept_in_memory_arrives_whole() -> None:
    server = Server()
    conn = server.connect()
    body = bytes(range(256)) * ((IN_MEMORY_BODY + 300_000) // 256)
    assert len(body) > IN_MEMORY_BODY
    conn.send(http(b"POST", b"/api/generate", body=body)[: -len(body)])
    for start in range(0, len(body), 65536):
        assert server.gateway.requests == []
        conn.send(body[start : start + 65536])
    assert len(server.gateway.bodies) == 1
    assert hashlib.sha256(server.gateway.bodies[0]).digest() == hashlib.sha256(body).digest()
    assert conn.response().status == 200


def test_a_body_and_the_next_request_in_one_piece_are_told_apart() -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"POST", b"/api/chat", body=b"0123456789") + get(b"/api/tags"))
    assert server.gateway.bodies == [b"0123456789", b""]
    assert [r.body for r in conn.responses()] == [
        b"gateway POST /api/chat",
        b"gateway GET /api/tags",
    ]


# -- 3. chunked request bodies ---------------------------------------------------------------------

CHUNKED = (
    chunked_head()
    + b'5;a=b\r\nhello\r\n1\r\n,\r\n6;ext="q"\r\n world\r\n'
    + b"0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"
)


def _pieces(how: str) -> list[bytes]:
    if how == "whole":
        return [CHUNKED]
    if how == "bytewise":
        return [CHUNKED[i : i + 1] for i in range(len(CHUNKED))]
    # split between every CR and its LF
    return CHUNKED.replace(b"\r\n", b"\r\x00\n").split(b"\x00")


@pytest.mark.parametrize("how", ["whole", "bytewise", "cr-lf"])
def test_chunked_body_is_decoded(how: str) -> None:
    server = Server()
    conn = server.connect()
    conn.send(*_pieces(how))
    assert server.gateway.bodies == [b"hello, world"]
    assert server.gateway.requests[0].header(b"transfer-encoding") == b"chunked"
    assert conn.response().status == 200
    conn.send(get(b"/after"))
    assert conn.response().body == b"gateway GET /after"


def test_chunked_body_with_only_the_last_chunk() -> None:
    server = Server()
    conn = server.connect()
    conn.send(chunked_head() + b"3\r\nabc\r\n0\r\n\r\n" + get(b"/next"))
    conn.send(chunked_head() + b"0\r\n\r\n")
    assert server.gateway.bodies == [b"abc", b"", b""]
    assert len(conn.responses()) == 3


def test_chunked_body_with_lf_line_ends_is_refused() -> None:
    """Bare LF after a chunk size or chunk data is refused, as h11, Twisted and nginx do (it
    was accepted before issue 15)."""
    server = Server()
    conn = server.connect()
    conn.send(chunked_head() + b"3\nabc\n0\n\n" + get(b"/next"))
    assert_rejected(server, conn, 400)


def test_chunked_body_larger_than_kept_in_memory() -> None:
    server = Server()
    conn = server.connect()
    piece = b"x" * 100_000
    conn.send(chunked_head())
    for _ in range(12):
        conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
    conn.send(b"0\r\n\r\n")
    assert server.gateway.bodies == [piece * 12]


# -- 4. pipelining ---------------------------------------------------------------------------------


def test_pipelined_requests_wait_for_the_response_before_them() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/first") + http(b"POST", b"/second", body=b"data"))
    assert [r.uri for r in server.gateway.requests] == [b"/first"]
    reply(server.gateway.requests[0], b"one")
    assert [r.uri for r in server.gateway.requests] == [b"/first", b"/second"]
    assert server.gateway.bodies[1] == b"data"
    reply(server.gateway.requests[1], b"two")
    assert [r.body for r in conn.responses()] == [b"one", b"two"]
    assert not conn.closed


def test_pipelined_requests_answered_at_once_come_back_in_order() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/a") + get(b"/b") + get(b"/v1.0/c") + get(b"/d"))
    bodies = [r.body for r in conn.responses()]
    assert bodies[0:2] == [b"gateway GET /a", b"gateway GET /b"]
    assert json.loads(bodies[2])["path"] == "/v1.0/c"
    assert bodies[3] == b"gateway GET /d"


def test_bytes_of_the_next_request_arriving_while_busy_are_kept() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/first"))
    following = get(b"/second")
    conn.send(following[:7], following[7:])
    assert len(server.gateway.requests) == 1
    reply(server.held, b"one")
    assert [r.uri for r in server.gateway.requests] == [b"/first", b"/second"]


# -- 5. persistence --------------------------------------------------------------------------------


def test_http10_without_keep_alive_closes_after_the_response() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/api/tags", version=b"HTTP/1.0") + get(b"/never", version=b"HTTP/1.0"))
    response = conn.response()
    assert response.header(b"connection") == b"close"
    assert response.body == b"gateway GET /api/tags"
    assert conn.closed
    assert len(server.gateway.requests) == 1
    assert server.gateway.requests[0].persistent is False


def test_http10_with_keep_alive_stays_open() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/a", b"Connection: Keep-Alive", version=b"HTTP/1.0"))
    response = conn.response()
    assert response.header(b"connection") == b"keep-alive"
    assert not conn.closed
    conn.send(get(b"/b", b"Connection: keep-alive", version=b"HTTP/1.0"))
    assert conn.response().body == b"gateway GET /b"
    assert not conn.closed


def test_http11_connection_close_closes_after_the_response() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/a", b"Connection: foo, close") + get(b"/never"))
    response = conn.response()
    assert response.header(b"connection") == b"close"
    assert conn.closed
    assert [r.uri for r in server.gateway.requests] == [b"/a"]


def test_gateway_can_make_a_response_the_last_on_its_connection() -> None:
    def last(request: ClientRequest) -> bytes:
        request.persistent = False
        return answer(request)

    server = Server(last)
    conn = server.connect()
    conn.send(get(b"/a"))
    assert conn.response().header(b"connection") == b"close"
    assert conn.closed


# -- 6. response framing ---------------------------------------------------------------------------


def test_streaming_response_on_http11_is_chunked_and_finish_writes_the_last_chunk() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate"))
    request = server.held
    request.write(b"abc")
    assert conn.transport.value().endswith(b"\r\n\r\n3\r\nabc\r\n")
    request.write(b"")
    request.write(b"0123456789abcdefg")
    assert conn.transport.value().endswith(b"11\r\n0123456789abcdefg\r\n")
    request.finish()
    assert conn.transport.value().endswith(b"\r\n0\r\n\r\n")
    response = conn.response()
    assert response.chunked
    assert response.header(b"transfer-encoding") == b"chunked"
    assert response.body == b"abc0123456789abcdefg"
    assert not conn.closed
    conn.send(get(b"/next"))
    assert len(server.gateway.requests) == 2


def test_streaming_response_on_http10_ends_at_close() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate", b"Connection: keep-alive", version=b"HTTP/1.0"))
    request = server.held
    request.write(b"abc")
    request.write(b"def")
    assert not conn.closed
    request.finish()
    assert conn.closed
    response = conn.response()
    assert response.header(b"transfer-encoding") is None
    assert response.header(b"content-length") is None
    assert response.header(b"connection") == b"close"
    assert response.body == b"abcdef"


def test_head_response_keeps_its_content_length_and_has_no_body() -> None:
    def head(request: ClientRequest) -> bytes:
        request.setHeader(b"Content-Length", b"42")
        return b"x" * 42

    server = Server(head)
    conn = server.connect()
    conn.send(http(b"HEAD", b"/api/tags"))
    assert conn.transport.value().endswith(b"\r\n\r\n")
    response = conn.response(head=True)
    assert response.header(b"content-length") == b"42"
    assert response.header(b"transfer-encoding") is None
    conn.send(http(b"HEAD", b"/api/ps"))
    assert conn.response(head=True).header(b"content-length") == b"42"
    assert not conn.closed


def test_204_has_no_body_and_the_connection_goes_on() -> None:
    def empty(request: ClientRequest) -> bytes:
        request.setResponseCode(204)
        request.write(b"ignored")
        return b"also ignored"

    server = Server(empty)
    conn = server.connect()
    conn.send(get(b"/a"))
    assert conn.transport.value().endswith(b"\r\n\r\n")
    response = conn.response(head=True)
    assert response.status == 204
    assert response.header(b"content-length") is None
    assert response.header(b"transfer-encoding") is None
    conn.send(get(b"/b"))
    assert conn.response(head=True).status == 204
    assert not conn.closed


def test_finish_without_a_body_sends_content_length_zero() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/a"))
    server.held.finish()
    response = conn.response()
    assert response.header(b"content-length") == b"0"
    assert response.body == b""
    assert not conn.closed


def test_an_immediate_answer_without_content_length_is_still_framed() -> None:
    server = Server(lambda request: b"no length given")
    conn = server.connect()
    conn.send(get(b"/a"), get(b"/b"))
    responses = conn.responses()
    assert [r.body for r in responses] == [b"no length given"] * 2
    assert [r.header(b"content-length") for r in responses] == [b"15"] * 2, "not chunked"
    assert not conn.closed


def test_http10_without_host_is_served() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"GET /api/tags HTTP/1.0\r\n\r\n")
    assert conn.response().status == 200
    assert server.gateway.requests[0].header(b"host") is None


def test_write_after_finish_raises_and_the_watchers_hear_of_the_end() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/a"))
    request = server.held
    heard: list[object] = []
    request.watch(lambda: heard.append("done"), heard.append)
    reply(request, b"ok")
    assert heard == ["done"]
    with pytest.raises(RuntimeError):
        request.write(b"late")
    request.finish()  # a second finish does nothing
    assert conn.response().body == b"ok"


# -- 7. malformed requests -------------------------------------------------------------------------

HOST = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n"
BAD_REQUESTS = [
    ("request line of two words", b"GET /api/tags\r\nHost: x\r\n\r\n", 400),
    ("request line of four words", b"GET /api/tags HTTP/1.1 x\r\n\r\n", 400),
    ("not HTTP", b"GET /api/tags FTP/1.1\r\n\r\n", 400),
    ("method not a token", b"G(T /api/tags HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("relative target", b"GET api/tags HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("field without a colon", HOST + b"NoColonHere\r\n\r\n", 400),
    ("whitespace before the colon", HOST + b"X-Trace : a\r\n\r\n", 400),
    ("obs-fold", HOST + b"X-Trace: a\r\n  continued\r\n\r\n", 400),
    ("obs-fold with a colon", HOST + b"X-Trace: a\r\n\tb: c\r\n\r\n", 400),
    ("empty field name", HOST + b": value\r\n\r\n", 400),
    (
        "Content-Length and Transfer-Encoding",
        HOST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    (
        "two Content-Length values",
        HOST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    ("Content-Length list", HOST + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("non-numeric Content-Length", HOST + b"Content-Length: 1e3\r\n\r\n", 400),
    ("negative Content-Length", HOST + b"Content-Length: -1\r\n\r\n", 400),
    ("huge Content-Length", HOST + b"Content-Length: 9999999999999999999999\r\n\r\n", 400),
    ("Transfer-Encoding gzip", HOST + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("HTTP/2.0", b"GET /api/tags HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ("HTTP/3", b"GET /api/tags HTTP/3\r\n\r\n", 505),
    ("head without its end", HOST + b"X-Big: " + b"a" * MAX_HEAD, 431),
    ("head too large", HOST + b"X-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
    (
        "too many fields",
        HOST + b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_FIELDS)) + b"\r\n",
        431,
    ),
    ("bare CR", HOST + b"X-Trace: a\rb\r\n\r\n", 400),
    ("bare CR in the request line", b"GET /api/tags\r HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("NUL", HOST + b"X-Trace: a\x00b\r\n\r\n", 400),
    ("two Host fields", HOST + b"host: y\r\n\r\n", 400),
    ("HTTP/1.1 without Host", b"GET /api/tags HTTP/1.1\r\nX-Trace: a\r\n\r\n", 400),
    ("invalid chunk size", HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("hex prefix in chunk size", HOST + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\n", 400),
    ("chunk size line too long", HOST + b"Transfer-Encoding: chunked\r\n\r\n1;" + b"e" * 5000, 400),
    ("chunk data too long", HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n", 400),
]


@pytest.mark.parametrize(
    ("data", "status"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_a_malformed_request_is_answered_with_json_and_closed(data: bytes, status: int) -> None:
    server = Server()
    conn = server.connect()
    conn.send(data)
    assert_rejected(server, conn, status)
    conn.send(get(b"/after/close"))
    assert server.gateway.requests == []


def test_exactly_the_maximum_number_of_fields_is_accepted() -> None:
    server = Server()
    conn = server.connect()
    conn.send(HOST + b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_FIELDS - 1)) + b"\r\n")
    assert len(server.gateway.requests[0].headers) == MAX_FIELDS
    assert conn.response().status == 200


def test_two_equal_content_length_fields_are_refused() -> None:
    """llhttp refuses a repeated Content-Length even with the same value (RFC 9112 6.3 allows
    either); it was accepted as one before issue 15."""
    server = Server()
    conn = server.connect()
    conn.send(HOST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc")
    assert_rejected(server, conn, 400)


@pytest.mark.parametrize(
    "path", [b"/api/chat", b"/v1/chat/completions", b"/v1.0/backends", b"/other"]
)
@pytest.mark.parametrize(
    ("fields", "status"),
    [
        (b"Content-Length: 3\r\nContent-Length: 4\r\n", 400),
        (b"Transfer-Encoding: gzip\r\n", 501),
        (b"Content-Length: %d\r\n" % (ADMIN_MAX_BODY + 1), 413),  # over either limit
    ],
)
def test_errors_are_in_the_dialect_of_the_path(path: bytes, fields: bytes, status: int) -> None:
    server = Server(limit=10)
    conn = server.connect()
    conn.send(b"POST " + path + b"?q=1 HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert_rejected(server, conn, status, path)


def test_a_malformed_request_after_a_good_one_closes_the_connection() -> None:
    server = Server()
    conn = server.connect()
    conn.send(
        get(b"/ok") + b"GET /bad HTTP/1.1\r\nHost: x\r\nBad Field: 1\r\n\r\n" + get(b"/never")
    )
    good, bad = conn.responses()
    assert good.body == b"gateway GET /ok"
    assert error_message(bad, 400, b"/bad")
    assert conn.closed
    assert [r.uri for r in server.gateway.requests] == [b"/ok"]


def test_a_field_name_without_a_colon_is_refused_even_when_seen_before() -> None:
    """The acceptor remembers valid field names; that must not skip the colon check."""
    server = Server()
    first = server.connect()
    first.send(get(b"/a", b"X-Trace: 1"))
    assert first.response().status == 200
    second = server.connect()
    second.send(b"GET /b HTTP/1.1\r\nHost: x\r\nX-Trace\r\n\r\n")
    assert [r.uri for r in server.gateway.requests] == [b"/a"], "the gateway got /b"
    assert_rejected_after(second, 400)


def test_a_host_line_without_a_colon_is_refused() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/a"))  # "Host" is now a known field name
    conn.response()
    conn.send(b"GET /b HTTP/1.1\r\nHost\r\n\r\n")
    assert [r.uri for r in server.gateway.requests] == [b"/a"], "the gateway got /b"
    assert_rejected_after(conn, 400)


def test_an_error_before_the_path_is_known_is_not_in_the_previous_requests_dialect() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/v1/models"))
    assert conn.response().status == 200
    conn.send(b"NOT A REQUEST LINE\r\n\r\n")
    response = conn.response()
    assert conn.closed
    assert response.status == 400
    assert isinstance(response.json()["error"], str), response.body


def test_a_408_before_the_path_is_known_is_not_in_the_previous_requests_dialect(
    sweeping: Server,
) -> None:
    conn = sweeping.connect()
    conn.send(get(b"/v1/models"))
    assert conn.response().status == 200
    conn.send(b"GET /api/t")
    sweeping.clock.advance(7)
    response = conn.response()
    assert conn.closed
    assert response.status == 408
    assert isinstance(response.json()["error"], str), response.body


def test_an_unsupported_coding_before_chunked_is_refused() -> None:
    """``gzip, chunked``: the gzip coding cannot be removed, so the body cannot be read."""
    server = Server()
    conn = server.connect()
    conn.send(chunked_head(b"/api/generate").replace(b"chunked", b"gzip, chunked") + b"0\r\n\r\n")
    assert server.gateway.requests == [], "the gateway got a body still gzip-coded"
    assert_rejected_after(conn, 501)


def test_a_head_with_lf_line_ends_is_refused_even_if_its_body_holds_crlf_crlf() -> None:
    """Bare LF line ends in a head are refused (llhttp's strictness; they were read before
    issue 15): nothing can be smuggled behind a CRLF CRLF in the body either."""
    server = Server()
    conn = server.connect()
    body = b"ab\r\n\r\ncd"
    conn.send(b"POST /api/generate HTTP/1.1\nHost: x\nContent-Length: %d\n\n" % len(body) + body)
    assert_rejected(server, conn, 400, b"/api/generate")


def test_a_head_with_lf_line_ends_is_refused() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"GET /api/tags HTTP/1.1\nHost: x\nX-A: 1\n\n")
    assert_rejected(server, conn, 400)


# -- 8. body limits --------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_413_before_any_body_byte() -> None:
    server = Server(limit=100)
    conn = server.connect()
    conn.send(http(b"POST", b"/api/generate?x=1", host=b"big.example", body=b"x" * 101)[:-101])
    message = assert_rejected(server, conn, 413)
    assert "100" in message
    assert (server.limit_paths, server.limit_calls) == ([b"/api/generate"], [b"big.example"])


def test_content_length_at_the_limit_is_served() -> None:
    server = Server(limit=100)
    conn = server.connect()
    conn.send(http(b"POST", b"/api/generate", body=b"x" * 100))
    assert server.gateway.bodies == [b"x" * 100]
    assert (server.limit_paths, server.limit_calls) == ([b"/api/generate"], [b"flow.example"])


def test_the_admin_apis_limit_is_the_front_doors_own_and_the_gateways_is_not_asked() -> None:
    server = Server(limit=10)
    conn = server.connect()
    conn.send(http(b"PUT", b"/v1.0/x/../backends/a", body=b"x" * ADMIN_MAX_BODY))
    assert json.loads(conn.response().body)["body"] == "x" * ADMIN_MAX_BODY
    conn.send(http(b"PUT", b"/v1.0/backends/a", body=b"x" * (ADMIN_MAX_BODY + 1))[:-100])
    assert_rejected(server, conn, 413, b"/v1.0/backends/a")
    assert server.limit_calls == []


def test_chunked_body_growing_past_the_limit_is_413() -> None:
    """413 as soon as the bytes of the body so far pass the limit (llhttp does not tell a
    chunk's declared size, so the byte that passes it decides, not the chunk-size line)."""
    server = Server(limit=10)
    conn = server.connect()
    conn.send(chunked_head(b"/v1/chat/completions"), b"6\r\nabcdef\r\n")
    assert conn.transport.value() == b""
    conn.send(b"5\r\nabcd")
    assert conn.transport.value() == b"", "at the limit"
    conn.send(b"e")
    assert_rejected(server, conn, 413, b"/v1/chat/completions")
    assert server.limit_paths == [b"/v1/chat/completions"]
    assert server.limit_calls == [b"flow.example"]


def test_chunked_body_at_the_limit_is_served() -> None:
    server = Server(limit=10)
    conn = server.connect()
    conn.send(chunked_head() + b"6\r\nabcdef\r\n4\r\nghij\r\n0\r\n\r\n")
    assert server.gateway.bodies == [b"abcdefghij"]


def test_the_limit_is_asked_for_each_client_request_with_its_host() -> None:
    """Once a request, of the gateway's limit by Host; the admin API's is the front door's."""
    server = Server()
    conn = server.connect()
    conn.send(
        get(b"/v1.0/backends?x=1"), http(b"POST", b"/api/chat", host=b"b.example", body=b"{}")
    )
    conn.send(b"GET /nohost HTTP/1.0\r\n\r\n")
    assert server.limit_calls == [b"b.example", None]
    assert server.limit_paths == [b"/v1.0/backends", b"/api/chat", b"/nohost"]


# -- 9. Expect: 100-continue -----------------------------------------------------------------------


def test_100_continue_is_sent_before_the_body_is_read() -> None:
    server = Server()
    conn = server.connect()
    body = b'{"model": "m"}'
    conn.send(http(b"POST", b"/api/chat", b"Expect: 100-Continue", body=body)[: -len(body)])
    assert conn.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.send(body)
    interim, final = conn.responses()
    assert interim.status == 100
    assert final.status == 200 and final.body == b"gateway POST /api/chat"
    assert server.gateway.bodies == [body]


def test_100_continue_for_a_chunked_body() -> None:
    server = Server()
    conn = server.connect()
    conn.send(chunked_head(b"/api/chat", b"Expect: 100-continue"))
    assert conn.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.send(b"2\r\nhi\r\n0\r\n\r\n")
    assert [r.status for r in conn.responses()] == [100, 200]


def test_no_100_continue_without_a_body_or_on_http10() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/a", b"Expect: 100-continue"))
    conn.send(
        http(
            b"POST",
            b"/b",
            b"Expect: 100-continue",
            b"Connection: keep-alive",
            body=b"x",
            version=b"HTTP/1.0",
        )
    )
    assert [r.status for r in conn.responses()] == [200, 200]


def test_100_continue_over_the_limit_is_413_without_100() -> None:
    server = Server(limit=5)
    conn = server.connect()
    conn.send(http(b"POST", b"/api/chat", b"Expect: 100-continue", body=b"too long")[:-8])
    assert b"100 Continue" not in conn.transport.value()
    assert_rejected(server, conn, 413, b"/api/chat")


# -- 10. twisted.web requests on the same connection -----------------------------------------------


def test_admin_request_goes_to_twisted_web_with_fields_and_body() -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"PUT", b"/v1.0/backends/a?x=1", b"X-Test: yes", body=b'{"Port": 1}'))
    response = conn.response()
    assert response.status == 200
    assert response.header(b"content-length") == b"%d" % len(response.body)
    assert response.header(b"connection") is None
    assert response.json() == {
        "method": "PUT",
        "uri": "/v1.0/backends/a?x=1",
        "path": "/v1.0/backends/a",
        "x-test": "yes",
        "body": '{"Port": 1}',
    }
    assert server.gateway.requests == []
    assert not conn.closed


def test_admin_request_with_a_chunked_body() -> None:
    server = Server()
    conn = server.connect()
    conn.send(
        chunked_head(b"/v1.0/frontends", b"X-Test: c"), b"3\r\nabc\r\n", b"2\r\nde\r\n0\r\n\r\n"
    )
    document = conn.response().json()
    assert document["body"] == "abcde" and document["x-test"] == "c"


def test_admin_request_with_a_large_body_in_pieces() -> None:
    server = Server()
    conn = server.connect()
    body = b"y" * 300_000
    conn.send(http(b"POST", b"/v1.0/x", body=body)[: -len(body)], body[:1000], body[1000:])
    assert conn.response().json()["body"] == body.decode()


def test_admin_then_gateway_requests_share_a_connection() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/v1.0/backends"))
    assert conn.response().json()["path"] == "/v1.0/backends"
    conn.send(http(b"POST", b"/api/generate", body=b"{}"))
    assert conn.response().body == b"gateway POST /api/generate"
    conn.send(get(b"/v1.0"))
    assert conn.response().json()["path"] == "/v1.0"
    assert [r.uri for r in server.gateway.requests] == [b"/api/generate"]
    assert not conn.closed


def test_root_get_and_head_are_answered_by_twisted_web() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/"))
    response = conn.response()
    assert response.body == OLLAMA_IS_RUNNING
    assert response.header(b"content-type") == b"text/plain; charset=utf-8"
    conn.send(http(b"HEAD", b"/"))
    assert conn.transport.value().endswith(b"\r\n\r\n")
    head = conn.response(head=True)
    assert head.status == 200
    assert head.header(b"content-length") == b"%d" % len(OLLAMA_IS_RUNNING)
    conn.send(get(b"/api/tags"))
    assert conn.response().body == b"gateway GET /api/tags"
    assert not conn.closed


@pytest.mark.parametrize(
    ("method", "path"),
    [
        (b"POST", b"/"),
        (b"DELETE", b"/"),
        (b"GET", b"/metrics"),
        (b"GET", b"/v1/backends"),
        (b"GET", b"/v1.1/backends"),
        (b"GET", b"/v10/backends"),
    ],
)
def test_other_requests_go_to_the_gateway(method: bytes, path: bytes) -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(method, path, body=b"{}" if method == b"POST" else b""))
    assert [(r.method, r.path) for r in server.gateway.requests] == [(method, path)]


def test_a_streamed_admin_response_is_chunked_and_persistent() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/v1.0/stream"), get(b"/api/tags"))
    streamed, after = conn.responses()
    assert streamed.chunked and streamed.body == b"part one, part two"
    assert after.body == b"gateway GET /api/tags"
    assert not conn.closed


def test_a_streamed_admin_response_on_http10_ends_at_close() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/v1.0/stream", b"Connection: keep-alive", version=b"HTTP/1.0"))
    assert conn.closed
    response = conn.response()
    assert response.header(b"connection") == b"close"
    assert response.header(b"transfer-encoding") is None
    assert response.body == b"part one, part two"


def test_admin_keep_alive_on_http10_and_close_on_http11() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/v1.0/a", b"Connection: keep-alive", version=b"HTTP/1.0"))
    assert conn.response().header(b"connection") == b"keep-alive"
    assert not conn.closed
    conn.send(get(b"/v1.0/b", b"Connection: close"))
    response = conn.response()
    assert response.header(b"connection") == b"close"
    assert response.json()["path"] == "/v1.0/b"
    assert conn.closed


def test_an_admin_bug_is_a_json_500_in_the_admin_dialect() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/v1.0/boom"))
    response = conn.response()
    assert "internal error" in error_message(response, 500, b"/v1.0/boom")
    assert b"<html" not in response.body.lower()
    assert not conn.closed


def test_client_leaving_during_an_admin_request_body() -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"POST", b"/v1.0/x", body=b"abcdef")[:-3])
    conn.lose()
    assert server.acceptor.connections == set()
    assert conn.transport.value() == b""


# -- 11. a bug in the gateway ----------------------------------------------------------------------


def flaky(request: ClientRequest) -> bytes:
    if b"boom" in request.uri:
        request.setHeader(b"Content-Type", b"text/html")
        raise RuntimeError("bug in the gateway")
    return answer(request)


@pytest.mark.parametrize("path", [b"/api/boom", b"/v1/boom", b"/boom"])
def test_a_gateway_bug_is_a_json_500_and_the_connection_goes_on(path: bytes) -> None:
    server = Server(flaky)
    conn = server.connect()
    conn.send(get(path))
    response = conn.response()
    assert "internal error" in error_message(response, 500, path)
    assert not conn.closed
    conn.send(get(b"/api/tags"))
    assert conn.response().body == b"gateway GET /api/tags"


def test_a_gateway_bug_after_the_response_started_cuts_the_connection() -> None:
    def half(request: ClientRequest) -> bytes:
        request.write(b"partial")
        raise RuntimeError("bug in the gateway")

    server = Server(half)
    conn = server.connect()
    conn.send(get(b"/a"))
    assert conn.transport.disconnected  # aborted, not closed gracefully
    assert not conn.transport.value().endswith(b"0\r\n\r\n")


# -- 12. the client leaves -------------------------------------------------------------------------


def test_client_leaving_tells_every_watcher_and_stops_the_producer() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate"))
    request = server.held
    failures: list[Failure] = []
    finished: list[str] = []
    request.watch(lambda: finished.append("first"), failures.append)
    request.watch(lambda: finished.append("second"), failures.append)
    producer = Producer()
    request.registerProducer(producer, True)
    request.write(b"some")
    written = conn.transport.value()
    conn.lose()
    assert request.disconnected
    assert [f.check(ConnectionDone) for f in failures] == [ConnectionDone, ConnectionDone]
    assert finished == [], "a response the client never got is not finished"
    assert producer.calls == ["stop"]
    assert server.acceptor.connections == set()
    request.write(b"more")
    request.finish()
    request.unregisterProducer()
    assert conn.transport.value() == written
    assert not request.finished


def test_client_leaving_before_the_response_started() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate"))
    request = server.held
    lost: list[Failure] = []
    request.watch(lambda: None, lost.append)
    conn.lose()
    assert len(lost) == 1
    reply(request, b"late")
    assert conn.transport.value() == b""


def test_client_leaving_while_the_body_arrives() -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"POST", b"/api/chat", body=b"x" * (IN_MEMORY_BODY + 10))[:-5])
    conn.lose()
    assert server.gateway.requests == []
    assert server.acceptor.connections == set()


# -- 13. backpressure ------------------------------------------------------------------------------


def test_transport_pausing_pauses_and_resumes_the_registered_producer() -> None:
    server = Server(hold)
    conn = server.connect()
    assert conn.transport.producer is conn.proto and conn.transport.streaming
    conn.send(get(b"/api/generate"))
    producer = Producer()
    server.held.registerProducer(producer, True)
    conn.proto.pauseProducing()
    assert producer.calls == ["pause"]
    conn.proto.resumeProducing()
    assert producer.calls == ["pause", "resume"]
    conn.proto.stopProducing()
    assert producer.calls == ["pause", "resume", "stop"]


def test_a_producer_registered_while_paused_is_paused_at_once() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate"))
    conn.proto.pauseProducing()
    producer = Producer()
    server.held.registerProducer(producer, True)
    assert producer.calls == ["pause"]
    conn.proto.resumeProducing()
    assert producer.calls == ["pause", "resume"]


def test_a_pull_producer_is_refused() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate"))
    with pytest.raises(TypeError):
        server.held.registerProducer(Producer(), False)


def test_a_second_producer_is_refused_until_the_first_is_unregistered() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate"))
    request = server.held
    first, second = Producer(), Producer()
    request.registerProducer(first, True)
    with pytest.raises(RuntimeError):
        request.registerProducer(second, True)
    request.unregisterProducer()
    request.registerProducer(second, True)
    conn.proto.pauseProducing()
    assert (first.calls, second.calls) == ([], ["pause"])


def test_the_producer_is_forgotten_when_the_response_ends() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate"))
    producer = Producer()
    server.held.registerProducer(producer, True)
    reply(server.held, b"done")
    conn.proto.pauseProducing()
    conn.lose()
    assert producer.calls == []


# -- 14. the idle sweep ----------------------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(sweeping: Server) -> None:
    conn = sweeping.connect()
    conn.send(get(b"/a"))
    conn.response()
    sweeping.clock.advance(9)
    assert not conn.closed
    sweeping.clock.advance(3)
    assert conn.closed
    assert conn.transport.value() == b""


def test_a_new_connection_that_sends_nothing_is_closed_after_idle_timeout(
    sweeping: Server,
) -> None:
    conn = sweeping.connect()
    sweeping.clock.advance(9)
    assert not conn.closed
    sweeping.clock.advance(3)
    assert conn.closed and conn.transport.value() == b""


def test_a_head_that_stops_halfway_gets_408_after_read_timeout(sweeping: Server) -> None:
    conn = sweeping.connect()
    conn.send(b"GET /api/tags HTTP/1.1\r\nHo")
    sweeping.clock.advance(4)
    assert conn.transport.value() == b""
    sweeping.clock.advance(3)
    error_message(conn.response(), 408, b"/api/tags")
    assert conn.closed
    assert sweeping.gateway.requests == []


def test_a_body_that_stops_halfway_gets_408_after_read_timeout(sweeping: Server) -> None:
    conn = sweeping.connect()
    conn.send(http(b"POST", b"/api/chat", body=b"x" * 10)[:-5])
    sweeping.clock.advance(3)
    conn.send(b"xx")  # bytes arriving keep the request alive
    sweeping.clock.advance(4)
    assert conn.transport.value() == b""
    sweeping.clock.advance(3)
    error_message(conn.response(), 408, b"/api/chat")
    assert conn.closed
    assert sweeping.gateway.requests == []


def test_a_request_being_served_is_left_alone_however_long_it_takes(sweeping: Server) -> None:
    sweeping.gateway.handler = hold
    conn = sweeping.connect()
    conn.send(get(b"/api/generate"), get(b"/pipelined"))
    sweeping.clock.pump([5.0] * 200)
    assert not conn.closed and conn.transport.value() == b""
    reply(sweeping.gateway.requests[0], b"slow")
    reply(sweeping.gateway.requests[1], b"next")
    assert [r.body for r in conn.responses()] == [b"slow", b"next"]
    sweeping.clock.advance(9)
    assert not conn.closed, "idle time counts from the end of the last response"
    sweeping.clock.advance(3)
    assert conn.closed


def test_stop_factory_stops_the_sweep(sweeping: Server) -> None:
    conn = sweeping.connect()
    sweeping.acceptor.stopFactory()
    sweeping.clock.advance(100)
    assert not conn.closed
    assert sweeping.clock.getDelayedCalls() == []


# -- 15. drain -------------------------------------------------------------------------------------


def test_drain_closes_idle_connections_at_once() -> None:
    server = Server()
    fresh, used = server.connect(), server.connect()
    used.send(get(b"/a"))
    used.response()
    server.acceptor.drain()
    assert fresh.closed and used.closed
    assert fresh.transport.value() == used.transport.value() == b""


def test_drain_closes_a_busy_connection_after_its_response() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate"), get(b"/pipelined"))
    server.acceptor.drain()
    assert not conn.closed
    reply(server.held, b"last")
    response = conn.response()
    assert response.header(b"connection") == b"close"
    assert response.body == b"last"
    assert conn.closed
    assert len(server.gateway.requests) == 1


def test_drain_during_a_streamed_response_closes_after_it() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/generate"))
    server.held.write(b"started")
    server.acceptor.drain()
    server.held.write(b" and done")
    assert not conn.closed
    server.held.finish()
    assert conn.response().body == b"started and done"
    assert conn.closed


def test_drain_during_an_admin_request_answers_with_connection_close() -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"POST", b"/v1.0/x", body=b"abcd")[:-2])
    server.acceptor.drain()
    assert not conn.closed
    conn.send(b"cd")
    response = conn.response()
    assert response.header(b"connection") == b"close"
    assert response.json()["body"] == "abcd"
    assert conn.closed


# -- 16. absolute-form targets ---------------------------------------------------------------------


def test_an_absolute_form_target_gives_path_uri_and_host() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"GET http://flow.example/api/tags?x=1 HTTP/1.1\r\nHost: other.example\r\n\r\n")
    (request,) = server.gateway.requests
    assert request.path == b"/api/tags"
    assert request.uri == b"/api/tags?x=1"
    assert request.header(b"host") == b"flow.example"
    assert (server.limit_paths, server.limit_calls) == ([b"/api/tags"], [b"flow.example"])
    assert conn.response().body == b"gateway GET /api/tags?x=1"


def test_an_absolute_form_target_without_a_path_is_the_root() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"GET HTTPS://flow.example HTTP/1.1\r\n\r\n")
    assert conn.response().body == OLLAMA_IS_RUNNING
    conn.send(b"POST http://flow.example:8080 HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    (request,) = server.gateway.requests
    assert (request.uri, request.header(b"host")) == (b"/", b"flow.example:8080")


def test_an_absolute_form_target_with_a_query_and_no_path() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"POST http://flow.example?x=1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    (request,) = server.gateway.requests
    assert (request.path, request.uri) == (b"/", b"/?x=1")


def test_an_absolute_form_admin_target_goes_to_twisted_web() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"GET http://flow.example/v1.0/backends HTTP/1.1\r\n\r\n")
    assert conn.response().json()["uri"] == "/v1.0/backends"


# -- 17. empty lines before a request --------------------------------------------------------------


def test_empty_lines_before_a_request_are_ignored() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"\r\n\r\n\n" + get(b"/a"))
    conn.send(b"\r", b"\n", b"\r\n" + get(b"/b")[:5], get(b"/b")[5:])
    assert [r.uri for r in server.gateway.requests] == [b"/a", b"/b"]
    assert len(conn.responses()) == 2


def test_empty_lines_alone_leave_the_connection_idle(sweeping: Server) -> None:
    conn = sweeping.connect()
    conn.send(b"\r\n\r\n")
    assert conn.proto.idle()
    sweeping.clock.advance(7)
    assert conn.transport.value() == b"", "no 408 for empty lines"


# -- 18. pipelined bytes while busy ----------------------------------------------------------------


def test_too_many_pipelined_bytes_pause_reading_until_the_response_ends() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/first"))
    body = b"z" * (300 * 1024)
    pipelined = http(b"POST", b"/second", body=body)
    for start in range(0, 200 * 1024, 50 * 1024):
        conn.send(pipelined[start : start + 50 * 1024])
    assert conn.transport.producerState == "producing"
    conn.send(pipelined[200 * 1024 : 280 * 1024])
    assert conn.transport.producerState == "paused"
    reply(server.held, b"one")
    assert conn.transport.producerState == "producing"
    assert len(server.gateway.requests) == 1, "the second body is not all here yet"
    conn.send(pipelined[280 * 1024 :])
    assert [r.uri for r in server.gateway.requests] == [b"/first", b"/second"]
    assert server.gateway.bodies[1] == body


# -- 19. headers.to_client -------------------------------------------------------------------------


def test_to_client_copies_every_field_it_is_given() -> None:
    """What the backend client hands over (hop-by-hop fields already gone, tested with the
    client in test_backendhttp) reaches the client whole: repeated fields, the backend's Date."""
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/api/chat"))
    backend = Headers()
    for name, value in [
        (b"Content-Type", b"application/x-ndjson"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Date", b"d"),
    ]:
        backend.addRawHeader(name, value)
    to_client(backend, server.held)
    reply(server.held, b"ok")
    response = conn.response()
    assert response.values(b"set-cookie") == [b"a=1", b"b=2"]
    assert response.header(b"content-type") == b"application/x-ndjson"
    assert response.header(b"date") == b"d", "the backend's Date is kept"
    assert response.header(b"content-length") == b"2"


# -- 20. the path every layer sees: decoded and normalised (issue #14) -----------------------------

DECODED = [
    ("encoded letter", b"/api/%63hat", b"/api/chat", b"/api/chat"),
    (
        "encoded letter, query as received",
        b"/v1/chat/%63ompletions?stream=%74rue&a=b//c/../d",
        b"/v1/chat/completions",
        b"/v1/chat/completions?stream=%74rue&a=b//c/../d",
    ),
    ("encoded letter, embed", b"/api/%65mbed", b"/api/embed", b"/api/embed"),
    ("encoded slash", b"/api%2Fgenerate", b"/api/generate", b"/api/generate"),
    ("double slashes", b"//api//generate", b"/api/generate", b"/api/generate"),
    ("dot segments", b"/x/../api/./show?n=1", b"/api/show", b"/api/show?n=1"),
    ("UTF-8 re-encoded", b"/api/blobs/caf%c3%a9", b"/api/blobs/caf%C3%A9", b"/api/blobs/caf%C3%A9"),
    ("escape kept", b"/api/a%25b/%2e", b"/api/a%25b/", b"/api/a%25b/"),
]


@pytest.mark.parametrize(
    ("target", "path", "uri"), [c[1:] for c in DECODED], ids=[c[0] for c in DECODED]
)
def test_the_gateway_sees_the_decoded_normalised_path_and_the_query_as_received(
    target: bytes, path: bytes, uri: bytes
) -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"POST", target, body=b"{}"))
    (request,) = server.gateway.requests
    assert (request.path, request.uri) == (path, uri)
    assert (server.limit_paths, server.limit_calls) == ([path], [b"flow.example"])
    assert conn.response().body == b"gateway POST " + uri
    assert not conn.closed


def test_an_absolute_form_target_is_normalised_too() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"GET http://flow.example//api/%74ags?x=%2F HTTP/1.1\r\n\r\n")
    (request,) = server.gateway.requests
    assert (request.path, request.uri) == (b"/api/tags", b"/api/tags?x=%2F")
    assert request.header(b"host") == b"flow.example"


#: Paths that cannot be decoded, or climb above the root; the path whose dialect the 400 is in.
UNDECODABLE = [
    ("malformed escape", b"/api/%zz", b"/api/"),
    ("truncated escape", b"/api/chat%4", b"/api/"),
    ("NUL", b"/api/chat%00", b"/api/"),
    ("DEL", b"/api/chat%7F", b"/api/"),
    ("not UTF-8", b"/api/%ff", b"/api/"),
    ("above the root", b"/..", b"/"),
    ("above the root, encoded", b"/api/%2e%2e/%2E%2E/..", b"/api/"),
    ("openai, not UTF-8", b"/v1/chat/%ff?stream=true", b"/v1/"),
    ("openai, above the root", b"/v1/../../v1.0/backends", b"/v1/"),
    ("admin, not UTF-8", b"/v1.0/backends/%ff", b"/v1.0/"),
    ("admin, malformed escape", b"/v1.0/backends/%zz", b"/v1.0/"),
    ("admin after a double slash", b"//v1.0/backends/%ff", b"/v1.0/"),
    ("admin, mistyped", b"/v1.0x/%zz", b"/v1.0x"),
]


@pytest.mark.parametrize(
    ("target", "dialect"), [c[1:] for c in UNDECODABLE], ids=[c[0] for c in UNDECODABLE]
)
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_a_path_that_cannot_be_normalised_is_400_in_the_dialect_of_its_raw_prefix(
    method: bytes, target: bytes, dialect: bytes
) -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(method, target, body=b"{}" if method == b"POST" else b""))
    assert_rejected(server, conn, 400, dialect)
    assert server.limit_calls == [], "nothing is asked about a path that cannot be served"


def test_a_path_error_after_a_good_request_closes_the_connection() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/api/%74ags") + get(b"/api/%zz") + get(b"/never"))
    good, bad = conn.responses()
    assert good.body == b"gateway GET /api/tags"
    assert "percent" in error_message(bad, 400, b"/api/")
    assert conn.closed
    assert [r.uri for r in server.gateway.requests] == [b"/api/tags"]


#: Targets the admin side answers (never the gateway): the path and uri it sees.
ADMIN_TARGETS = [
    ("double slash", b"//v1.0/backends", b"/v1.0/backends", b"/v1.0/backends"),
    ("typo after the version", b"/v1.0x/backends", b"/v1.0x/backends", b"/v1.0x/backends"),
    ("version alone", b"/v1.0", b"/v1.0", b"/v1.0"),
    ("longer version", b"/v1.00", b"/v1.00", b"/v1.00"),
    ("encoded", b"/%761.0/backends?x=%2F", b"/v1.0/backends", b"/v1.0/backends?x=%2F"),
    ("encoded slash", b"/v1.0%2Fbackends", b"/v1.0/backends", b"/v1.0/backends"),
    ("dot segments", b"/api/../v1.0/./frontends", b"/v1.0/frontends", b"/v1.0/frontends"),
]


@pytest.mark.parametrize(
    ("target", "path", "uri"), [c[1:] for c in ADMIN_TARGETS], ids=[c[0] for c in ADMIN_TARGETS]
)
@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE"])
def test_every_path_that_normalises_under_v1_0_goes_to_the_admin_side(
    method: bytes, target: bytes, path: bytes, uri: bytes
) -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(method, target, body=b"{}" if method == b"PUT" else b""))
    document = conn.response().json()
    assert (document["method"], document["path"], document["uri"]) == (
        method.decode(),
        path.decode(),
        uri.decode(),
    )
    assert server.gateway.requests == []
    assert (server.limit_paths, server.limit_calls) == ([path], []), "the admin API's limit"


@pytest.mark.parametrize("target", [b"//", b"/./", b"/a/..", b"/%2e/"])
def test_a_path_that_normalises_to_the_root_is_answered_like_the_root(target: bytes) -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(target))
    assert conn.response().body == OLLAMA_IS_RUNNING
    assert server.gateway.requests == []


# -- 21. memory fed by clients is bounded in count and in bytes ------------------------------------


def test_only_short_header_names_are_remembered() -> None:
    server = Server()
    conn = server.connect()
    short = b"X-" + b"s" * 62
    long = b"X-" + b"l" * 63
    huge = b"X-" + b"h" * 60_000
    conn.send(get(b"/api/tags", short + b": 1", long + b": 2", huge + b": 3"))
    (request,) = server.gateway.requests
    assert [value for _, value in request.headers[1:]] == [b"1", b"2", b"3"]
    assert request.header(long.lower()) == b"2"
    assert request.header(huge.lower()) == b"3"
    assert conn.response().status == 200
    names = server.acceptor.header_names
    assert names[short] == short.lower()
    assert long not in names and huge not in names


def test_header_names_remembered_stay_within_count_and_bytes() -> None:
    server = Server()
    conn = server.connect()
    for i in range(1200):
        conn.send(get(b"/a", b"X-%d-%s: 1" % (i, b"n" * 58), b"X-%d-%s: 1" % (i, b"n" * 900)))
    assert len(conn.responses()) == 1200
    names = server.acceptor.header_names
    assert len(names) <= 1000
    assert all(len(name) <= 64 for name in names)
    assert sum(len(name) + len(lower) for name, lower in names.items()) <= 1000 * 2 * 64


# -- 22. deadlines like nginx's: the head's from its first byte, the body's from its last (#15) ---


def test_a_head_trickling_in_gets_408_read_timeout_after_its_first_byte(sweeping: Server) -> None:
    """A byte now and then does not keep a head alive (slowloris): the whole head must come
    within the read timeout of its first byte, as nginx's client_header_timeout."""
    conn = sweeping.connect()
    head = get(b"/api/tags", b"X-Slow: " + b"s" * 40)
    conn.send(head[:1])
    for i in range(1, 6):
        sweeping.clock.advance(1)
        assert conn.transport.value() == b"", "not more than 5 s after the first byte yet"
        conn.send(head[i : i + 1])
    sweeping.clock.advance(1.5)  # bytes keep coming, but 6.5 s after the first one
    error_message(conn.response(), 408, b"/api/tags")
    assert conn.closed
    assert sweeping.gateway.requests == []


def test_a_request_line_stuck_before_its_target_gets_408_too(sweeping: Server) -> None:
    """Bytes llhttp takes without a callback yet (a method, spaces) count as a head begun."""
    conn = sweeping.connect()
    conn.send(b"GET")
    for _ in range(6):
        sweeping.clock.advance(1)
        conn.send(b" ")
    sweeping.clock.advance(0.5)
    assert conn.response().status == 408
    assert conn.closed


def test_a_head_is_timed_afresh_for_each_request(sweeping: Server) -> None:
    conn = sweeping.connect()
    conn.send(b"GET /a HTTP/1.1\r\n")
    sweeping.clock.advance(4)
    conn.send(b"Host: x\r\n\r\n")
    assert conn.response().status == 200
    conn.send(b"GET /b HTTP/1.1\r\n")
    sweeping.clock.advance(4)
    conn.send(b"Host: x\r\n\r\n")
    assert conn.response().status == 200
    assert not conn.closed


def test_a_body_that_keeps_coming_is_never_cut_off(sweeping: Server) -> None:
    """Each body byte restarts the body's clock (nginx's client_body_timeout), whatever the
    body's total time."""
    conn = sweeping.connect()
    body = b"x" * 20
    conn.send(http(b"POST", b"/api/chat", body=body)[: -len(body)])
    for byte in body[:-1]:
        sweeping.clock.advance(4)
        conn.send(bytes([byte]))
    assert conn.transport.value() == b"", "76 s of body, never 5 s without a byte"
    conn.send(body[-1:])
    assert conn.response().status == 200
    assert sweeping.gateway.bodies == [body]


def test_a_chunked_body_whose_bytes_stop_gets_408(sweeping: Server) -> None:
    conn = sweeping.connect()
    conn.send(chunked_head(b"/v1/chat/completions"), b"3\r\nabc\r\n")
    sweeping.clock.advance(4)
    conn.send(b"2\r\n")
    sweeping.clock.advance(4)
    assert conn.transport.value() == b""
    sweeping.clock.advance(2)
    error_message(conn.response(), 408, b"/v1/chat/completions")
    assert conn.closed


# -- 23. requests parsed ahead of their turn (#15) ------------------------------------------------


def test_100_continue_waits_until_its_request_is_the_current_one() -> None:
    """A request parsed behind the one being answered gets its 100 Continue once it is the
    current one, never before that answer (which would be a response out of order)."""
    server = Server(hold)
    conn = server.connect()
    body = b'{"model": "m"}'
    expecting = http(b"POST", b"/api/chat", b"Expect: 100-continue", body=body)[: -len(body)]
    conn.send(get(b"/first") + expecting)
    assert conn.transport.value() == b"", "no 100 Continue while /first is answered"
    reply(server.held, b"one")
    assert conn.transport.value().endswith(b"\r\n\r\none" + b"HTTP/1.1 100 Continue\r\n\r\n")
    conn.send(body)
    reply(server.held, b"two")
    assert [r.status for r in conn.responses()] == [200, 100, 200]
    assert server.gateway.bodies == [b"", body]


def test_no_100_continue_once_the_body_came_anyway() -> None:
    server = Server(hold)
    conn = server.connect()
    body = b'{"model": "m"}'
    conn.send(get(b"/first") + http(b"POST", b"/api/chat", b"Expect: 100-continue", body=body))
    reply(server.held, b"one")
    reply(server.held, b"two")
    assert [r.status for r in conn.responses()] == [200, 200]


def test_a_refused_request_behind_one_in_progress_is_answered_in_its_turn() -> None:
    server = Server(hold)
    conn = server.connect()
    conn.send(get(b"/first") + b"GET /second HTTP/1.1\r\nHost: a b\r\n\r\n" + get(b"/never"))
    assert conn.transport.value() == b"", "nothing before the first response"
    assert not conn.closed
    reply(server.held, b"one")
    first, refused = conn.responses()
    assert first.body == b"one"
    assert "Host" in error_message(refused, 400, b"/second")
    assert conn.closed
    assert [r.uri for r in server.gateway.requests] == [b"/first"]


def test_a_read_of_many_pipelined_requests_is_parsed_a_slice_at_a_time() -> None:
    """llhttp parses all it is given: a 64 KiB read of tiny requests must not become 1,500
    queued requests at once. The rest waits, unparsed, and each is answered in order."""
    server = Server(hold)
    made: list[bytes] = []
    receiver = server.front_door.receiver

    def counting(connection: Any, head: RequestHead) -> Any:
        made.append(head.target)
        return receiver(connection, head)

    server.front_door.receiver = counting  # type: ignore[method-assign]
    conn = server.connect()
    count = 1500
    conn.send(b"".join(get(b"/r%d" % i) for i in range(count)))
    assert len(made) <= 16 * 1024 // len(get(b"/r0")) + 2, len(made)
    for i in range(count):
        assert server.held.uri == b"/r%d" % i
        reply(server.held, b"%d" % i)
    assert [r.body for r in conn.responses()] == [b"%d" % i for i in range(count)]
    assert len(made) == count


def test_an_upgrade_request_with_a_body_is_read_whole_and_the_next_request_found() -> None:
    """llhttp skips the body of a request asking to upgrade (curl --http2 sends h2c to a POST);
    we never upgrade, and that body must neither be lost nor read as the next request."""
    server = Server()
    conn = server.connect()
    smuggled = get(b"/smuggled")
    upgrade = http(
        b"POST",
        b"/api/chat",
        b"Connection: Upgrade, HTTP2-Settings",
        b"Upgrade: h2c",
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        body=smuggled,
    )
    conn.send(upgrade + get(b"/next"))
    assert [r.uri for r in server.gateway.requests] == [b"/api/chat", b"/next"]
    assert server.gateway.bodies[0] == smuggled
    chunked = chunked_head(b"/api/generate", b"Connection: upgrade", b"Upgrade: websocket")
    conn.send(chunked + b"4\r\nbody\r\n0\r\n\r\n" + get(b"/after"))
    assert [r.uri for r in server.gateway.requests][2:] == [b"/api/generate", b"/after"]
    assert server.gateway.bodies[2] == b"body"
    assert len(conn.responses()) == 4


def test_an_upgrade_request_without_a_body_is_served_as_any_other() -> None:
    server = Server()
    conn = server.connect()
    upgrade = get(b"/api/tags", b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c")
    conn.send(upgrade + get(b"/b"))
    assert [r.uri for r in server.gateway.requests] == [b"/api/tags", b"/b"]
    assert len(conn.responses()) == 2
    assert not conn.closed


# -- 24. closing with a response still queued (#15) ----------------------------------------------


def test_a_connection_closed_by_a_drain_while_paused_stops_being_the_producer() -> None:
    """Twisted resumes a paused producer when the send buffer drains instead of closing: a
    drain closes through the connection, which lets go of the transport first."""
    server = Server()
    conn = server.connect()
    conn.send(get(b"/a"))
    conn.response()
    conn.proto.pauseProducing()  # the last response filled the send buffer
    server.acceptor.drain()
    assert conn.closed
    assert conn.transport.producer is None


def test_a_response_that_ends_the_connection_unregisters_it_as_the_producer() -> None:
    server = Server()
    conn = server.connect()
    conn.send(get(b"/a", b"Connection: close"))
    assert conn.closed
    assert conn.transport.producer is None


# -- over a real socket ----------------------------------------------------------------------------


class RawClient(Protocol):
    """A client that collects what it receives and can wait for a condition on it."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[Callable[[bytes], bool], Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for entry in list(self._waiting):
            if entry[0](self.data):
                self._waiting.remove(entry)
                entry[1].callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)

    def until(self, check: Callable[[bytes], bool]) -> Deferred[None]:
        waiting: Deferred[None] = Deferred()
        if check(self.data):
            waiting.callback(None)
        else:
            self._waiting.append((check, waiting))
        return waiting.addTimeout(5, reactor)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def gone(acceptor: Acceptor) -> None:
    """Wait (on the reactor, at most 5 s) until the server saw its connections close."""
    for _ in range(500):
        if not acceptor.connections:
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("server connections still open")


async def connect_raw(port: Any) -> RawClient:
    client = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    await connectProtocol(endpoint, client).addTimeout(5, reactor)
    return client


async def close(port: Any, client: RawClient | None) -> None:
    """Drop the client's connection (if still open) and stop listening."""
    if client is not None and client.transport is not None:
        client.transport.loseConnection()
    await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_over_a_socket_keep_alive_gateway_admin_and_chunked_requests() -> None:
    server = Server()
    port = reactor.listenTCP(0, server.acceptor, interface="127.0.0.1")
    client = None
    try:
        client = await connect_raw(port)
        client.send(get(b"/api/tags", b"X-Test: 1"))
        await client.until(lambda data: complete_responses(data) == 1)
        client.send(get(b"/v1.0/backends", b"X-Test: admin"))
        client.send(chunked_head() + b"4\r\nbody\r\n0\r\n\r\n")
        await client.until(lambda data: complete_responses(data) == 3)
        first, admin, chunked = parse_responses(client.data)
        assert first.body == b"gateway GET /api/tags"
        assert admin.json()["x-test"] == "admin"
        assert chunked.body == b"gateway POST /api/generate"
        assert server.gateway.bodies == [b"", b"body"]
        (request,) = {r.client_host for r in server.gateway.requests}
        assert request == "127.0.0.1"
        assert len(server.acceptor.connections) == 1
        assert client.transport is not None
        client.transport.loseConnection()
        await client.closed
        await gone(server.acceptor)
    finally:
        await close(port, client)


@pytest_twisted.ensureDeferred
async def test_over_a_socket_a_large_body_after_100_continue_and_a_streamed_answer() -> None:
    def stream(request: ClientRequest) -> int:
        digest = hashlib.sha256(server.gateway.bodies[-1]).hexdigest().encode()

        def later(left: int) -> None:
            if left:
                request.write(b"%d " % left)
                reactor.callLater(0, later, left - 1)
            else:
                request.write(digest)
                request.finish()

        reactor.callLater(0, later, 3)
        return NOT_DONE_YET

    server = Server(stream)
    port = reactor.listenTCP(0, server.acceptor, interface="127.0.0.1")
    client = None
    try:
        client = await connect_raw(port)
        body = bytes(range(256)) * (2 * IN_MEMORY_BODY // 256)
        client.send(
            http(
                b"POST", b"/api/generate", b"Expect: 100-continue", b"Connection: close", body=body
            )[: -len(body)]
        )
        await client.until(lambda data: data.endswith(b"\r\n\r\n"))
        assert client.data == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(body)
        await client.closed.addTimeout(5, reactor)
        interim, final = parse_responses(client.data, eof=True)
        assert interim.status == 100
        assert final.chunked
        assert final.header(b"connection") == b"close"
        assert final.body == b"3 2 1 " + hashlib.sha256(body).hexdigest().encode()
        await gone(server.acceptor)
    finally:
        await close(port, client)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["connection-close", "http10", "drain"])
async def test_over_a_socket_a_last_response_larger_than_the_send_buffer_closes(how: str) -> None:
    """A response that ends its connection, finishing with megabytes still queued for a client
    that reads slowly: once they are sent the connection closes (it used to stay registered as
    the transport's producer, which Twisted resumed instead of closing: CLOSE-WAIT, forever)."""
    big = bytes(range(256)) * (16 * 1024 * 1024 // 256)

    def large(request: ClientRequest) -> bytes:
        request.setHeader(b"Content-Length", b"%d" % len(big))
        return big

    server = Server(large)
    port = reactor.listenTCP(0, server.acceptor, interface="127.0.0.1")
    client = None
    try:
        client = await connect_raw(port)
        assert IPushProducer.providedBy(client.transport)  # a TCP connection is one
        transport = cast(IPushProducer, client.transport)
        transport.pauseProducing()  # the client reads nothing for now
        if how == "http10":
            client.send(get(b"/api/tags", version=b"HTTP/1.0"))
        elif how == "connection-close":
            client.send(get(b"/api/tags", b"Connection: close"))
        else:
            client.send(get(b"/api/tags"))
        await until(lambda: len(server.gateway.requests) == 1, what="request served")
        await task.deferLater(reactor, 0.2, lambda: None)
        (connection,) = server.acceptor.connections
        if how == "drain":
            # The response was whole, the connection kept: a drain closes it as idle.
            assert connection.idle()
            server.acceptor.drain()
        transport.resumeProducing()
        await client.closed.addTimeout(10, reactor)
        (response,) = parse_responses(client.data, eof=True)
        assert hashlib.sha256(response.body).digest() == hashlib.sha256(big).digest()
        assert response.header(b"connection") == (None if how == "drain" else b"close")
        await gone(server.acceptor)
    finally:
        await close(port, client)


# -- over a real socket, against the daemon: the admin API and a recording backend -----------------


@dataclass
class Guarded:
    """A daemon whose frontend1 sends client traffic to a recording backend (no completions)."""

    daemon: Daemon
    recorder: Recorder

    async def send(self, data: bytes) -> Response:
        """One request's bytes on a new connection (the request closes it); its response."""
        client = await connect_raw(self.daemon.listening)
        client.send(data)
        await client.closed.addTimeout(5, reactor)
        (response,) = parse_responses(client.data, eof=True)
        return response

    def forwarded(self) -> list[bytes]:
        """The targets of what the recorder got, less its health checks and model reads."""
        return [s.uri for s in self.recorder.seen if s.uri not in (b"/", b"/api/tags", b"/api/ps")]

    def saw_the_token(self) -> bool:
        return any(f"Bearer {TOKEN}" in s.header("authorization") for s in self.recorder.seen)


@pytest_twisted.async_yield_fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Guarded]:
    daemon = await start_daemon(tmp_path)
    recorder = start_recorder(reactor)
    try:
        admin = Http.to(daemon)
        host, port = recorder.address
        record = {"Identifier": "recorder", "Hostname": host, "Port": port}
        assert (await admin.put("/v1.0/backends", record)).status == 201
        frontend = {"Backends": ["recorder"], "AllowCompletions": False}
        assert (await admin.put("/v1.0/frontends/frontend1", frontend)).status == 200
        await until(lambda: daemon.runtime.state("recorder").healthy, what="recorder healthy")
        yield Guarded(daemon, recorder)
    finally:
        assert recorder.port is not None
        await maybeDeferred(recorder.port.stopListening)
        await daemon.stopService()


def request_bytes(method: bytes, target: bytes, *fields: bytes, body: bytes = b"") -> bytes:
    return http(method, target, b"Connection: close", *fields, body=body, host=b"localhost")


ADMIN = b"Authorization: Bearer " + TOKEN.encode()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("target", "status"), [(b"//v1.0/backends", 200), (b"/v1.0x/backends", 404)]
)
async def test_over_a_socket_a_mistyped_admin_url_reaches_the_admin_api_never_a_backend(
    guarded: Guarded, target: bytes, status: int
) -> None:
    anonymous = await guarded.send(request_bytes(b"GET", target))
    assert error_message(anonymous, 401, b"/v1.0") == (
        "a valid 'Authorization: Bearer <token>' is required"
    )
    authorized = await guarded.send(request_bytes(b"GET", target, ADMIN))
    assert authorized.status == status, authorized.body
    if status == 200:
        identifiers = {record["Identifier"] for record in authorized.json()}
        assert "recorder" in identifiers
    else:
        assert "no route /v1.0x/backends" in error_message(authorized, 404, b"/v1.0")
    assert guarded.forwarded() == []
    assert not guarded.saw_the_token()
    control = await guarded.send(request_bytes(b"GET", b"/api/%76ersion", ADMIN))
    assert control.status == 200
    assert guarded.forwarded() == [b"/api/version"], "the recorder does get client traffic"


@pytest_twisted.ensureDeferred
async def test_over_a_socket_a_path_that_is_not_utf_8_is_a_json_400_of_the_admin_api(
    guarded: Guarded,
) -> None:
    for fields in [(), (ADMIN,)]:
        response = await guarded.send(request_bytes(b"GET", b"/v1.0/backends/%ff", *fields))
        assert response.status == 400
        assert response.header(b"content-type") == b"application/json"
        document = response.json()
        assert set(document) == {"Error", "Message", "StatusCode", "Description"}
        assert (document["Error"], document["StatusCode"]) == ("BadRequest", 400)
        assert "UTF-8" in document["Description"]
    assert guarded.forwarded() == []


@pytest_twisted.ensureDeferred
async def test_over_a_socket_an_encoded_path_gets_the_policy_of_the_path_it_decodes_to(
    guarded: Guarded,
) -> None:
    body = b'{"model": "llama3", "messages": []}'
    for target in [b"/api/%63hat", b"/v1/chat/%63ompletions", b"/api%2Fgenerate", b"//api/chat"]:
        response = await guarded.send(request_bytes(b"POST", target, body=body))
        assert response.status == 403, (target, response.body)
    assert guarded.forwarded() == []
    response = await guarded.send(request_bytes(b"GET", b"/api/%73tatus?x=%2F"))
    assert response.status == 200
    assert guarded.forwarded() == [b"/api/status?x=%2F"], "forwarded decoded, query as sent"


@pytest_twisted.ensureDeferred
async def test_over_a_socket_a_mistyped_admin_url_has_the_admin_body_limit(
    guarded: Guarded,
) -> None:
    big = b"x" * (2 << 20)
    head = request_bytes(b"PUT", b"/v1.0x/backends", ADMIN, body=big)[: -len(big)]
    response = await guarded.send(head)
    assert "1048576" in error_message(response, 413, b"/v1.0")
    assert guarded.forwarded() == []
