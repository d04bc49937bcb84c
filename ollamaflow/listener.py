"""The main listener: which requests go where, and the connections it keeps.

Requests are routed on their normalised path (:mod:`ollamaflow.server.target`). Every path that
starts with ``/v1.0`` is the admin API's, even ``/v1.0x``, so that a mistyped admin URL is
refused by it instead of carrying its token to a backend. ``GET /metrics`` and ``GET /`` are ours
too; those are twisted.web resources under :class:`Root`. Everything else is client traffic for
the gateway, served on the lean path of :mod:`ollamaflow.server`, over the same connections.

Every ``OPTIONS`` is answered here, and so is a request from an origin browsers may not let
call (:mod:`ollamaflow.cors`): neither reaches the gateway, the admin API or a backend.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ollamaflow import cors
from ollamaflow.admin.errors import error_body as admin_error_body
from ollamaflow.gateway.clienterrors import error_body as gateway_error_body
from ollamaflow.server.connection import GatewayExchange, HTTPConnection, error_response
from ollamaflow.server.request import ClientRequest
from ollamaflow.server.web import WebStream
from ollamaflow.settings import DEFAULT_MAX_CONNECTIONS
from ollamaflow.twisted_internals import request_disconnected

#: Every path that starts with this is the admin API's (its routes are under ``/v1.0/``).
ADMIN_PREFIX = b"/v1.0"
#: The admin API's records are small; anything larger is a mistake or an attack.
ADMIN_MAX_BODY = 1 << 20
OLLAMA_IS_RUNNING = b"Ollama is running"
METRICS_PATH = b"/metrics"
#: A keep-alive connection with no request for this long is closed.
IDLE_TIMEOUT = 75.0
#: A request head not whole this long after its first byte, or a body that pauses for this
#: long, is answered 408 and closed (nginx's client_header_timeout and client_body_timeout).
READ_TIMEOUT = 60.0

log = Logger()


class Renderer(Protocol):
    def render(self, request: server.Request) -> Any: ...


class GatewayLike(Protocol):
    def render(self, request: ClientRequest) -> bytes | int: ...


def is_web(method: bytes, path: bytes, metrics: bool) -> bool:
    """Whether a request is for the admin API or a page of ours, not for the gateway;
    ``path`` is normalised."""
    if path.startswith(ADMIN_PREFIX):
        return True
    if method not in (b"GET", b"HEAD"):
        return False
    return path == b"/" or (metrics and path == METRICS_PATH)


class Root(Resource):
    """The twisted.web side: anything under ``/v1.0`` to the admin API, ``/metrics``, and
    ``/`` answered here."""

    isLeaf = True

    def __init__(self, admin: Renderer, *, metrics: Renderer | None = None) -> None:
        super().__init__()
        self.admin = admin
        self.metrics = metrics

    def render(self, request: server.Request) -> Any:
        path = request.path
        if path.startswith(ADMIN_PREFIX):
            return self.admin.render(request)
        if path == METRICS_PATH and self.metrics is not None:
            return self.metrics.render(request)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return OLLAMA_IS_RUNNING


class WebRequest(server.Request):
    """A twisted.web request that answers a bug below it with a JSON 500, never an HTML page."""

    def processingFailed(self, reason: Failure) -> None:
        body = internal_error(self.path, reason)
        if self.finished or request_disconnected(self):
            return
        if self.startedWriting:
            # Too late for a status: cut the response off so it cannot look complete.
            self.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.setResponseCode(500)
        self.setHeader(b"Content-Type", b"application/json")
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()


class WebSite(server.Site):
    """The site of the twisted.web side; it never logs a line per request (the gateway's
    access log covers client traffic)."""

    requestFactory = WebRequest
    noisy = False
    displayTracebacks = False

    def __init__(self, root: Resource) -> None:
        # Neither the admin API nor the pages read form submissions; parsing them would also
        # parse the Content-Type of every POST with the email package.
        super().__init__(root, parsePOSTFormSubmission=False)

    def log(self, request: http.Request) -> None:
        pass


def error_body(path: bytes, status: int, message: str) -> bytes:
    """An error in the dialect of the path: the admin API's, OpenAI's or Ollama's (a path that
    could not be normalised is given raw: its prefix still tells)."""
    if path.startswith(ADMIN_PREFIX):
        return admin_error_body(status, message)
    return gateway_error_body(path, status, message)


def internal_error(path: bytes, reason: Failure) -> bytes:
    """Log a bug below the listener with a reference; the JSON 500 body that names it."""
    reference = uuid.uuid4().hex
    log.failure("request failed ({reference})", reason, reference=reference)
    return error_body(path, 500, f"internal error; see the log, reference {reference}")


#: The body size limit for a request, from its path and Host header.
BodyLimit = Callable[[bytes, bytes | None], int]

#: After answering a connection over the cap, what its client still sends is read and dropped
#: for up to this long, so that closing it never resets it (nor loses the answer).
LINGER_SECONDS = 5.0
#: A connection over the cap is answered 503 with this error, in Ollama's shape.
REFUSAL_BODY = gateway_error_body(b"/", 503, "too many connections; retry in a second")
#: Refused connections lingering at once, at most (a client that never closes holds one for
#: LINGER_SECONDS); beyond, the answer is followed by an orderly close at once.
MAX_LINGERING = 128
#: How often at most a refusal is logged (each one is counted in /metrics).
REFUSAL_LOG_SECONDS = 60.0


def refusal_response(date: bytes) -> bytes:
    """The whole answer to a connection over ``MaxConnections``: 503, retry in a second, and
    the connection closes (its request, never read, may not even have been sent)."""
    return error_response(503, REFUSAL_BODY, date, b"Retry-After: 1\r\n")


class Refusal(TwistedProtocol):
    """A connection over the cap: answered at once, then closed as nginx's lingering close
    does, so the kernel never resets it: half-close, then read and drop whatever still comes
    until the client closes, or for :data:`LINGER_SECONDS` at most. ``lingering`` holds the
    refusals doing so, at most :data:`MAX_LINGERING`."""

    def __init__(self, clock: IReactorTime, answer: bytes, lingering: set[Refusal]) -> None:
        self.clock = clock
        self.answer = answer
        self.lingering = lingering
        self._linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.answer)
        if len(self.lingering) >= MAX_LINGERING:
            transport.loseConnection()
            return
        self.lingering.add(self)
        transport.loseWriteConnection()
        self._linger = self.clock.callLater(LINGER_SECONDS, transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        """Dropped: the answer does not depend on the request."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lingering.discard(self)
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()


class Answer:
    """A request the listener answers itself once it is whole (an ``OPTIONS``, a refused
    origin): ``status``, ``fields`` and ``body``; whatever body the request has is dropped."""

    __slots__ = ("body_bytes", "fields", "request", "status")

    def __init__(
        self, request: ClientRequest, status: int, fields: cors.Fields, body: bytes = b""
    ) -> None:
        self.request = request
        self.status = status
        self.fields = fields
        self.body_bytes = body

    def body(self, data: bytes) -> None:
        """Dropped: the answer does not depend on it."""

    def complete(self) -> None:
        request = self.request
        request.setResponseCode(self.status)
        for name, value in self.fields:
            request.setHeader(name, value)
        body = self.body_bytes
        if body:
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
        request.finish()

    def connection_lost(self, reason: Failure) -> None:
        self.request.connection_lost(reason)


class Listener(ServerFactory):
    """Builds a :class:`HTTPConnection` per client; routes each request it parses."""

    protocol = HTTPConnection  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        gateway: GatewayLike,
        root: Root,
        body_limit: BodyLimit,
        clock: IReactorTime,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        cors_policy: cors.Policy = cors.DEFAULT_POLICY,
    ) -> None:
        """``max_connections``: client connections open at once (``Webserver.MaxConnections``);
        one more is answered 503 and closed (see :meth:`buildProtocol`). ``cors_policy``: the
        origins browsers may call from (``Cors``)."""
        self.max_connections = max_connections
        self.cors = cors_policy
        #: Connections refused since start, for ``/metrics``.
        self.refused = 0
        #: Refused connections still lingering (see :class:`Refusal`).
        self.lingering: set[Refusal] = set()
        self._refusal_logged = -REFUSAL_LOG_SECONDS
        self.gateway = gateway
        self.site = WebSite(root)
        self.metrics = root.metrics is not None
        self.body_limit = body_limit
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.connections: set[HTTPConnection] = set()
        #: Header field names seen and found valid, with their lower-case form.
        self.header_names: dict[bytes, bytes] = {}
        self._date = (0, b"")
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> TwistedProtocol | None:
        """An :class:`HTTPConnection`, or a :class:`Refusal` when ``max_connections`` are open
        (:attr:`connections`: each HTTPConnection is in it from connectionMade to
        connectionLost, and Twisted calls connectionMade right after this)."""
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            now = self.clock.seconds()
            if now - self._refusal_logged >= REFUSAL_LOG_SECONDS:
                self._refusal_logged = now
                log.warn(
                    "Webserver.MaxConnections ({limit}) client connections are open: new ones "
                    "are answered 503 ({refused} since start; this line once a minute at most)",
                    limit=self.max_connections,
                    refused=self.refused,
                )
            return Refusal(self.clock, refusal_response(self.date()), self.lingering)
        return cast(HTTPConnection, super().buildProtocol(addr))

    def startFactory(self) -> None:
        self._sweeper.start(min(self.idle_timeout, self.read_timeout) / 4, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()

    def exchange(
        self,
        connection: HTTPConnection,
        method: bytes,
        uri: bytes,
        path: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        fields: dict[bytes, bytes],
        persistent: bool,
        length: int | None,
    ) -> GatewayExchange | WebStream | Answer:
        """Where a request whose head just arrived goes: the gateway or twisted.web, or an
        answer from here (:meth:`cross_origin`)."""
        origin = fields.get(b"origin")
        if origin is not None or method == b"OPTIONS":
            return self.cross_origin(
                connection, method, uri, path, version, headers, fields, persistent, length, origin
            )
        if is_web(method, path, self.metrics):
            site = self.site
            return WebStream(connection, site, method, uri, version, headers, persistent, length)
        request = ClientRequest(connection, method, uri, path, version, headers, fields, persistent)
        return GatewayExchange(self, request)

    def cross_origin(
        self,
        connection: HTTPConnection,
        method: bytes,
        uri: bytes,
        path: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        fields: dict[bytes, bytes],
        persistent: bool,
        length: int | None,
        origin: bytes | None,
    ) -> GatewayExchange | WebStream | Answer:
        """A request with an ``Origin``, or an ``OPTIONS``: answered here (every ``OPTIONS``,
        and an origin not allowed), or served with the CORS fields on its response. The
        admin API and ``/metrics`` allow the admin origins, everything else the clients'."""
        ours = path.startswith(ADMIN_PREFIX) or (self.metrics and path == METRICS_PATH)
        origins = self.cors.admin if ours else self.cors.client
        decision = cors.decide(origins, method, origin, fields, connection.secure)
        if decision.status is not None:
            request = ClientRequest(
                connection, method, uri, path, version, headers, fields, persistent
            )
            error = decision.error
            body = self.error_body(path, decision.status, error) if error else b""
            return Answer(request, decision.status, decision.fields, body)
        if is_web(method, path, self.metrics):
            site = self.site
            stream = WebStream(connection, site, method, uri, version, headers, persistent, length)
            for name, value in decision.fields:
                stream.request.setHeader(name, value)
            return stream
        if origin is not None:
            # The decision is ours: a backend (Ollama) must not refuse an origin allowed here,
            # nor name it a second time.
            headers = [(name, value) for name, value in headers if name.lower() != b"origin"]
        request = ClientRequest(connection, method, uri, path, version, headers, fields, persistent)
        for name, value in decision.fields:
            request.setHeader(name, value)
        return GatewayExchange(self, request)

    def serve(self, request: ClientRequest) -> None:
        """Hand a complete client request to the gateway; a bug there is a JSON 500."""
        try:
            answer = self.gateway.render(request)
        except Exception:
            answer = internal_error(request.path, Failure())
            if request.finished or request.disconnected:
                return
            if request.started:
                request.abort_connection()  # too late for a status, as above
                return
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"application/json")
        if answer is not NOT_DONE_YET:
            assert isinstance(answer, bytes)
            if request.responseHeader(b"content-length") is None:
                request.setHeader(b"Content-Length", b"%d" % len(answer))
            request.write(answer)
            request.finish()

    def error_body(self, path: bytes, status: int, message: str) -> bytes:
        return error_body(path, status, message)

    def date(self) -> bytes:
        """The ``Date`` header's value, formatted once a second."""
        now = int(self.clock.seconds())
        if self._date[0] != now:
            self._date = (now, http.datetimeToString(now))
        return self._date[1]

    def sweep(self) -> None:
        """Close keep-alive connections idle too long; answer 408 to a request whose head is
        not whole ``read_timeout`` after its first byte (however its bytes trickle in), or
        whose body has paused for that long (as nginx's client_header_timeout and
        client_body_timeout)."""
        now = self.clock.seconds()
        timeout = self.read_timeout
        for connection in list(self.connections):
            if connection.idle():
                if now - connection.since > self.idle_timeout:
                    connection.close()
            elif connection.reading_head():
                if now - connection.head_since > timeout:
                    connection.reject(408, f"the request head took more than {timeout:.0f} s")
            elif connection.reading_body() and now - connection.body_since > timeout:
                connection.reject(408, f"no bytes of the request body for {timeout:.0f} s")

    def drain(self) -> None:
        """Stop reusing connections: idle ones close now, the others after their response; a
        request pipelined behind a response already begun (a stream) is answered first, in its
        turn, so the client learns why (the gateway refuses it 503 while draining)."""
        for connection in list(self.connections):
            connection.closing = True
            if connection.idle():
                connection.close()
