"""A lean HTTP/1.1 client for talking to backends: one protocol object per connection.

Twisted's ``HTTPConnectionPool`` + ``HTTP11ClientProtocol`` stack costs a third of the gateway's
CPU on small requests (a parser per request, a transport proxy, a dozen Deferreds). Here a
request is one ``transport.write`` on a pooled connection and its response is parsed by llhttp
(:class:`~ollamaflow.http1.response.ResponseReader`, strict and bounded), delivered through the
same ``IResponse`` interface: ``deliverBody(protocol)`` with the response as the protocol's
``IPushProducer`` transport. The header fields a response's ``Connection`` names are dropped
here, where that field is seen, with the other hop-by-hop ones.

Keep-alive connections are pooled per ``(host, port, ssl)``, newest first; one periodic sweep
per client closes those idle longer than ``idle_seconds``. A request sent on a reused connection
that the server had already closed (nothing at all came back) is retried once on a fresh one.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, cast

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConnector,
    IConsumer,
    IDelayedCall,
    IProducer,
    IProtocol,
    IPushProducer,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from ollamaflow import tcp
from ollamaflow.http1.response import Framing, Head, ResponseReader
from ollamaflow.http1.rules import HOP_BY_HOP, TOKEN, BadMessage
from ollamaflow.records import Backend
from ollamaflow.twisted_internals import headers_of, is_connecting

log = Logger()

_Where = tuple[str, int, bool]
_Body: TypeAlias = "bytes | IBodyProducer | None"
#: Request header fields: (name, value) pairs, as the gateway builds them.
_Fields: TypeAlias = "Sequence[tuple[bytes, bytes]]"

#: Removed from ``IResponse.headers``: they describe the connection, not the response (and so
#: do the fields a response's ``Connection`` names); the body's length is the response's own.
_CONNECTION_CONTROL = HOP_BY_HOP | {b"content-length"}
#: An answer to HEAD keeps its Content-Length: it tells the size of what GET would send.
_HEAD_CONTROL = _CONNECTION_CONTROL - {b"content-length"}
#: Request fields this client writes itself from the body it is given.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")


class _Phase(enum.Enum):
    """Where a connection is; it is in exactly one."""

    IDLE = "in the pool (or just connected), no request"
    WAITING = "request sent, waiting for the response head"
    READING = "the response head is delivered; its body is being read"
    STOPPED = "the body's reader stopped it: ends when the connection does"
    CLOSED = "finished with: closing or closed, never reused"


_IDLE = _Phase.IDLE
_WAITING = _Phase.WAITING
_READING = _Phase.READING
_STOPPED = _Phase.STOPPED
_CLOSED = _Phase.CLOSED

#: How every complete body ends; one shared instance, as Twisted shares ``connectionDone``.
_DONE = Failure(ResponseDone("Response body fully received"))


class BackendClient:
    """Sends one request to a backend on a pooled connection; cancel the Deferred to abort."""

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float,
        max_idle_per_backend: int = 1024,
        idle_seconds: float = 120.0,
    ) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.max_idle_per_backend = max_idle_per_backend
        self.idle_seconds = idle_seconds
        #: Idle connections per backend, oldest first (the newest is reused first).
        self.idle: dict[_Where, list[_Connection]] = {}
        self._endpoints: dict[_Where, tuple[IStreamClientEndpoint, _Factory]] = {}
        #: Backends connected to since they were last forgotten (their connections are pooled).
        self._known: set[_Where] = set()
        self._sweep_call: IDelayedCall | None = None

    def send(
        self,
        backend: Backend,
        method: bytes,
        target: bytes,
        headers: _Fields,
        body: _Body,
        on_response: Callable[[IResponse], object],
        on_failure: Callable[[Failure], object],
    ) -> Attempt:
        """Send a request to ``backend`` on a pooled connection (or a fresh one): the response
        head goes to ``on_response``, a failure to ``on_failure`` (no Deferred on the hot
        path). ``target`` is the path and query; ``headers`` must carry ``Host``; ``body`` is the
        whole body as bytes (sent with the head in one write), a producer, or None. Raises
        ValueError at once for an invalid method or target."""
        attempt = Attempt(on_response, on_failure)
        call = _Call(
            self, (backend.hostname, backend.port, backend.ssl), method, target, headers, body,
            attempt,
        )  # fmt: skip
        attempt.call = call
        self._start(call)
        return attempt

    def _start(self, call: _Call) -> None:
        idle = self.idle.get(call.where)
        if idle:
            idle.pop().send(call, reused=True)
        else:
            self.connect(call)

    def connect(self, call: _Call) -> None:
        """Open a fresh connection for ``call``: straight to an IP address over plain TCP,
        else through an endpoint (a host name to resolve, TLS)."""
        where = call.where
        self._known.add(where)
        host, port, ssl = where
        if not ssl and (isIPAddress(host) or isIPv6Address(host)):
            dial = _Dial(self, call)
            call.connecting = dial
            dial.connector = tcp.connect(
                self.reactor, host, port, dial, timeout=self.connect_timeout
            )
            return
        found = self._endpoints.get(where)
        if found is None:
            found = self._endpoints[where] = self._endpoint(where)
        endpoint, factory = found
        connecting = cast("Deferred[_Connection]", endpoint.connect(factory))
        call.connecting = connecting
        connecting.addCallbacks(call.connected, call.connect_failed)

    def _endpoint(self, where: _Where) -> tuple[IStreamClientEndpoint, _Factory]:
        host, port, ssl = where
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, host, port, timeout=self.connect_timeout
        )
        if ssl:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint, _Factory(self, where)

    def release(self, connection: _Connection) -> None:
        """A connection finished a request cleanly: keep it for the next one, or close it."""
        where = connection.where
        idle = self.idle.get(where)
        if idle is None:
            if where not in self._known:  # forgotten while the request ran
                connection.close()
                return
            idle = self.idle[where] = []
        if len(idle) >= self.max_idle_per_backend:
            connection.close()
            return
        connection.idle_since = self.reactor.seconds()
        idle.append(connection)
        if self._sweep_call is None:
            self._sweep_call = self.reactor.callLater(self._sweep_every(), self._sweep)

    def discard(self, connection: _Connection) -> None:
        """An idle connection closed (by the server, mostly): it leaves the pool."""
        idle = self.idle.get(connection.where)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self.idle[connection.where]

    def _sweep_every(self) -> float:
        return max(self.idle_seconds / 2, 0.001)

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_seconds`` or more (oldest are first)."""
        self._sweep_call = None
        oldest_kept = self.reactor.seconds() - self.idle_seconds
        for where, idle in list(self.idle.items()):
            stale = 0
            while stale < len(idle) and idle[stale].idle_since <= oldest_kept:
                stale += 1
            if stale:
                expired = idle[:stale]
                del idle[:stale]
                for connection in expired:
                    connection.close()
            if not idle:
                del self.idle[where]
        if self.idle:
            self._sweep_call = self.reactor.callLater(self._sweep_every(), self._sweep)

    def forget(self, keep: set[_Where]) -> None:
        """Drop the endpoints and idle connections of backends that are gone."""
        self._known &= keep
        for where in [w for w in self._endpoints if w not in keep]:
            del self._endpoints[where]
        for where in [w for w in self.idle if w not in keep]:
            for connection in self.idle.pop(where):
                connection.close()

    async def close(self) -> None:
        """Close every idle connection and wait until they are closed."""
        if self._sweep_call is not None:
            if self._sweep_call.active():
                self._sweep_call.cancel()
            self._sweep_call = None
        closing: list[Deferred[None]] = []
        idle, self.idle = self.idle, {}
        for connections in idle.values():
            for connection in connections:
                closing.append(connection.when_closed())
                connection.close()
        await gatherResults(closing)


class _Factory(ClientFactory):
    """Builds the connections to one backend."""

    noisy = False

    def __init__(self, client: BackendClient, where: _Where) -> None:
        self.client = client
        self.where = where

    def buildProtocol(self, addr: object) -> _Connection:
        return _Connection(self.client, self.where)


class Attempt:
    """A request sent with :meth:`BackendClient.send`: the outcome goes to one of two callables,
    once. :meth:`cancel` aborts it before the response head; ``on_failure`` then gets
    ``CancelledError``."""

    __slots__ = ("_on_failure", "_on_response", "call", "fired")

    def __init__(
        self, on_response: Callable[[IResponse], object], on_failure: Callable[[Failure], object]
    ) -> None:
        self._on_response = on_response
        self._on_failure = on_failure
        self.call: _Call | None = None
        self.fired = False

    def callback(self, response: IResponse) -> None:
        if not self.fired:
            on_response = self._on_response
            self._fire()
            on_response(response)

    def errback(self, failure: Failure) -> None:
        if not self.fired:
            on_failure = self._on_failure
            self._fire()
            on_failure(failure)

    def _fire(self) -> None:
        """Fired once: let go of the request and the callables (which usually hold whoever
        holds this Attempt), so it is all freed without the garbage collector."""
        self.fired = True
        self.call = None
        self._on_response = self._on_failure = _fired

    def cancel(self) -> None:
        if self.fired:
            return
        if self.call is not None:
            self.call.cancel()
        self.errback(Failure(CancelledError()))


def _fired(outcome: object) -> None:
    """What a fired :class:`Attempt` calls instead of its callables (never called)."""


class _Dial(ClientFactory):
    """One fresh connection for one request, dialled without an endpoint (whose wrapping
    protocol would sit in the way of every read)."""

    noisy = False

    def __init__(self, client: BackendClient, call: _Call) -> None:
        self.client = client
        self.call: _Call | None = call
        self.connector: IConnector | None = None

    def buildProtocol(self, addr: object) -> _Connection:
        call = self._done()
        assert call is not None, "one connection per dial"
        return _Connection(self.client, call.where, on_made=call.connected)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        call = self._done()
        if call is not None:
            call.connect_failed(reason)

    def _done(self) -> _Call | None:
        """The dial is over: let go of the call and the connector (which holds this factory
        for the life of the connection: no cycle left)."""
        call, self.call, self.connector = self.call, None, None
        return call

    def cancel(self) -> None:
        if self.connector is not None and is_connecting(self.connector):
            self.connector.stopConnecting()


class _Call:
    """One request: its bytes, its Attempt, and where it is (connecting, on a connection)."""

    __slots__ = (
        "attempt",
        "body_done",
        "cancelled",
        "client",
        "conn",
        "connecting",
        "head",
        "is_head",
        "keep",
        "payload",
        "producer",
        "retried",
        "where",
        "writer",
    )

    def __init__(
        self,
        client: BackendClient,
        where: _Where,
        method: bytes,
        target: bytes,
        headers: _Fields,
        body: _Body,
        outcome: Attempt,
    ) -> None:
        if not TOKEN.match(method):
            raise ValueError(f"invalid method {method!r}")
        if not _TARGET.match(target):
            raise ValueError(f"invalid request target {target!r}")
        self.client = client
        self.where = where
        self.is_head = method == b"HEAD"
        self.keep = True
        payload: bytes | None = None
        producer: IBodyProducer | None = None
        if body is None:
            framing = b"Content-Length: 0\r\n" if method in (b"POST", b"PUT") else b""
        elif isinstance(body, bytes):
            payload = body
        else:
            producer = body
        if payload is not None:
            framing = b"Content-Length: %d\r\n" % len(payload)
        elif producer is not None:
            length = producer.length
            if length is UNKNOWN_LENGTH:
                framing = b"Transfer-Encoding: chunked\r\n"
            else:
                framing = b"Content-Length: %d\r\n" % length
        lines = [method, b" ", target, b" HTTP/1.1\r\n", framing]
        for name, value in headers:
            lower = name.lower()
            if lower in _FRAMING:
                continue
            if lower == b"connection" and b"close" in value.lower():
                self.keep = False
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        self.head = b"".join(lines)
        self.payload = payload
        self.producer = producer
        self.writer: _BodyWriter | None = None
        self.body_done = False
        self.conn: _Connection | None = None
        self.connecting: Deferred[_Connection] | _Dial | None = None
        self.retried = False
        self.cancelled = False
        #: Told of the response head or the failure.
        self.attempt = outcome

    def replayable(self) -> bool:
        """Whether the request can be sent again as it was (its body is in memory)."""
        return self.producer is None

    def connected(self, connection: _Connection) -> None:
        self.connecting = None
        if self.cancelled:
            connection.close()
            return
        connection.send(self, reused=False)

    def connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if not self.cancelled:
            self.attempt.errback(failure)

    def cancel(self) -> None:
        """Abort before the response head: the connection is not reused; the Attempt then
        fails with ``CancelledError``."""
        self.cancelled = True
        if self.connecting is not None:
            self.connecting.cancel()
        elif self.conn is not None:
            self.conn.abort_request()

    def stop_body(self) -> None:
        """Stop a streaming body that will not be written to the end."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.stop()


@implementer(IConsumer)
class _BodyWriter:
    """Writes a producer's body to the connection: Content-Length checked, or chunked."""

    __slots__ = ("call", "chunked", "left", "transport")

    def __init__(self, call: _Call, transport: Any) -> None:
        self.call = call
        self.transport = transport
        length = call.producer.length if call.producer is not None else 0
        self.chunked = length is UNKNOWN_LENGTH
        self.left = 0 if self.chunked else length

    def start(self, producer: IBodyProducer) -> None:
        self.transport.registerProducer(producer, True)
        producing = producer.startProducing(self)
        producing.addCallbacks(self._produced, self._failed)

    def write(self, data: bytes) -> None:
        if self.call.writer is not self or not data:
            return
        if self.chunked:
            self.transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
            return
        self.left -= len(data)
        if self.left < 0:
            self._broken(ValueError("the body producer wrote more than its length"))
            return
        self.transport.write(data)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass  # registered on the transport in start()

    def unregisterProducer(self) -> None:
        pass

    def _produced(self, _: object) -> None:
        call = self.call
        if call.writer is not self:
            return
        call.writer = None
        self.transport.unregisterProducer()
        if self.chunked:
            self.transport.write(b"0\r\n\r\n")
        elif self.left:
            self._broken(ValueError("the body producer wrote less than its length"))
            return
        call.body_done = True

    def _failed(self, failure: Failure) -> None:
        if self.call.writer is self:
            self._broken(failure)

    def _broken(self, error: Failure | Exception) -> None:
        call = self.call
        call.writer = None
        self.transport.unregisterProducer()
        if call.producer is not None:
            call.producer.stopProducing()
        if call.conn is not None:
            call.conn.request_failed(RequestGenerationFailed([Failure(error)]))

    def stop(self) -> None:
        self.transport.unregisterProducer()
        if self.call.producer is not None:
            self.call.producer.stopProducing()


@implementer(IResponse, IPushProducer)
class _Response:
    """The response head, and the body's transport: pause, resume or stop reading it."""

    __slots__ = (
        "_ended",
        "_held",
        "_over",
        "_paused",
        "_protocol",
        "code",
        "headers",
        "length",
        "phrase",
        "previousResponse",
        "request",
        "source",
        "version",
    )

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | str,
        conn: _Connection | None,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.request = None
        self.previousResponse: IResponse | None = None
        self.source = conn
        self._protocol: IProtocol | None = None
        #: Body bytes not handed over yet: they came before ``deliverBody``, or while paused.
        self._held: deque[bytes] = deque()
        #: How the body ended, until the reader is told (after the held bytes).
        self._ended: Failure | None = None
        self._over = False
        self._paused = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:
        """Connect ``protocol`` to the body: what arrived already, then the rest as it comes."""
        if self._protocol is not None or self._over:
            raise RuntimeError("the response body is already being delivered")
        self._protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]  # a transport in all but name
        self._flush()
        if self.source is not None:
            self.source.update_reading()

    def received(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None or self._paused or self._held:
            self._held.append(data)
        else:
            protocol.dataReceived(data)

    def end(self, reason: Failure) -> None:
        """The body is over (``ResponseDone``, ``PotentialDataLoss`` or ``ResponseFailed``)."""
        self.source = None
        self._ended = reason
        self._flush()

    def _flush(self) -> None:
        """Hand over the held bytes while the reader is not paused, then the end if known (a
        paused reader still hears of the end once it has every byte)."""
        protocol = self._protocol
        if protocol is None:
            return
        held = self._held
        while held and not self._paused:
            protocol.dataReceived(held.popleft())
        if held or self._ended is None or self._over:
            return
        self._over = True
        self._protocol = None  # the body is over: no cycle left with its reader
        try:
            protocol.connectionLost(self._ended)
        except Exception:
            # The connection may already serve another request: never let this reach it.
            log.failure("response body protocol {protocol!r} failed", protocol=protocol)

    def waiting(self) -> bool:
        """Whether reading should stop: nobody reads the body yet, or its reader paused."""
        return self._paused or self._protocol is None

    # -- the body protocol's transport ----------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self.source is not None:
            self.source.update_reading()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._held or self._ended is not None:
            self._flush()
        if self.source is not None:
            self.source.update_reading()

    def stopProducing(self) -> None:
        """Abort the backend connection; the body ends with ``ResponseFailed``."""
        if self.source is not None:
            self.source.stop_body()

    def loseConnection(self) -> None:
        self.stopProducing()


class _Connection(Protocol):
    """One connection to a backend: writes requests and reads their responses, one at a time,
    through a :class:`ResponseReader` whose consumer it is."""

    __slots__ = (
        "_announce",
        "_closed",
        "_on_made",
        "_reading_paused",
        "call",
        "client",
        "idle_since",
        "phase",
        "reader",
        "received_any",
        "response",
        "reused",
        "where",
    )

    def __init__(
        self,
        client: BackendClient,
        where: _Where,
        on_made: Callable[[_Connection], None] | None = None,
    ) -> None:
        self.client = client
        self.where = where
        self._on_made = on_made
        self.phase = _IDLE
        self.call: _Call | None = None
        self.response: _Response | None = None
        self.reader = ResponseReader(self)
        self.reused = False
        self.received_any = False
        self.idle_since = 0.0
        #: A response head read but not yet handed to its Attempt: that waits until the read
        #: is parsed, so a small answer is complete (and pooled) when the caller sees it.
        self._announce: tuple[Attempt, _Response] | None = None
        self._reading_paused = False
        self._closed: list[Deferred[None]] | None = None

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        on_made, self._on_made = self._on_made, None
        if on_made is not None:
            on_made(self)

    # -- requests -------------------------------------------------------------------------

    def send(self, call: _Call, reused: bool) -> None:
        """Write ``call`` (head and in-memory body in one write) and wait for its response."""
        self.call = call
        call.conn = self
        self.reused = reused
        self.received_any = False
        self.phase = _WAITING
        self.reader.expect(call.is_head)
        transport: Any = self.transport
        payload = call.payload
        producer = call.producer
        if producer is None:
            transport.write(call.head + payload if payload else call.head)
            call.body_done = True
            return
        transport.write(call.head)
        call.writer = writer = _BodyWriter(call, transport)
        writer.start(producer)

    def abort_request(self) -> None:
        """The caller cancelled before the response head: drop the connection."""
        call, self.call = self.call, None
        if call is not None:
            call.conn = None
            call.stop_body()
        self._abort()

    def request_failed(self, error: Exception) -> None:
        """The request body could not be produced: give up on the connection."""
        call = self.call
        self._abort()
        if call is not None and self.response is None:
            self.call = None
            call.conn = None
            call.attempt.errback(Failure(error))
        elif self.response is not None:
            self._end_body(Failure(ResponseFailed([Failure(error)])))

    def _abort(self) -> None:
        self.phase = _CLOSED
        self.reader.abandon()
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- responses: the reader's consumer -------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        phase = self.phase
        if phase is _WAITING or phase is _READING:
            self.received_any = True
            try:
                self.reader.feed(data)
            except Exception:
                # Refused (BadMessage), or a body protocol raised: like Twisted, the response
                # is broken.
                self._broken(Failure())
            announce = self._announce
            if announce is not None:
                self._announce = None
                attempt, announced = announce
                try:
                    attempt.callback(announced)
                except Exception:
                    if self.response is announced:
                        self._broken(Failure())
                    else:  # complete already: the connection is not this response's any more
                        log.failure("response callback {attempt!r} failed", attempt=attempt)
            response = self.response
            if response is not None and not self._reading_paused and response.waiting():
                self.update_reading()
        elif phase is _IDLE:
            try:
                self.reader.feed(data)  # empty lines are skipped; anything else is refused
            except BadMessage:
                self.client.discard(self)
                self._broken(Failure())

    def response_head(self, head: Head) -> None:
        """The final response head: an ``IResponse``, handed over once the read is parsed."""
        call = self.call
        assert call is not None, "a response head comes while a request waits for it"
        drop = _HEAD_CONTROL if call.is_head else _CONNECTION_CONTROL
        if head.connection:
            drop = drop | head.connection
        headers = headers_of([(n, v) for n, v in head.fields if n.lower() not in drop])
        framing = head.framing
        length: int | str
        if framing is Framing.NONE:
            length = 0
        elif framing is Framing.LENGTH and head.length is not None:
            length = head.length
        else:
            length = UNKNOWN_LENGTH
        response = _Response(
            (b"HTTP", 1, head.minor), head.code, head.phrase, headers, length, self
        )
        self.response = response
        self.phase = _READING
        call.conn = None
        self._announce = (call.attempt, response)

    def response_data(self, data: bytes) -> None:
        response = self.response
        if response is not None:
            response.received(data)

    def response_complete(self, reusable: bool) -> None:
        """The body is complete: the connection goes back to the pool (before the caller
        hears of the end, like Twisted's pool) or is closed."""
        call, response = self.call, self.response
        assert call is not None and response is not None
        self.call = None
        self.response = None
        response.source = None
        if reusable and call.keep and call.body_done:
            self.phase = _IDLE
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self.client.release(self)
        else:
            call.stop_body()
            self.close()
        response.end(_DONE)

    def update_reading(self) -> None:
        """Read from the socket only while the body has a reader that is not paused."""
        response = self.response
        want_paused = response is not None and response.waiting()
        phase = self.phase
        if want_paused != self._reading_paused and phase is not _STOPPED and phase is not _CLOSED:
            self._reading_paused = want_paused
            if want_paused:
                self.transport.pauseProducing()  # type: ignore[union-attr]
            else:
                self.transport.resumeProducing()  # type: ignore[union-attr]

    def stop_body(self) -> None:
        """The reader stopped the body: abort; it ends with ``ResponseFailed`` once closed."""
        if self.response is not None and self.phase is _READING:
            self.phase = _STOPPED
            self.reader.abandon()
            if self.call is not None:
                self.call.stop_body()
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _broken(self, reason: Failure) -> None:
        """The response cannot be parsed (or its reader raised): abort the connection."""
        call, response = self.call, self.response
        self.call = self.response = None
        self._abort()
        if call is not None:
            call.conn = None
            call.stop_body()
        failed = Failure(ResponseFailed([reason]))
        if response is not None:
            response.end(failed)
        elif call is not None:
            call.attempt.errback(failed)

    def _end_body(self, reason: Failure) -> None:
        response, self.response = self.response, None
        if self.call is not None:
            self.call.stop_body()
            self.call = None
        if response is not None:
            response.end(reason)

    # -- endings --------------------------------------------------------------------------

    def close(self) -> None:
        """Close a connection that no request is using."""
        self.phase = _CLOSED
        self.reader.abandon()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def when_closed(self) -> Deferred[None]:
        if self._closed is None:
            self._closed = []
        waiting: Deferred[None] = Deferred()
        self._closed.append(waiting)
        return waiting

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        phase, self.phase = self.phase, _CLOSED
        call, response = self.call, self.response
        self.call = self.response = None
        until_close = self.reader.connection_lost()
        if phase is _IDLE:
            self.client.discard(self)
        elif response is not None:
            if until_close and phase is _READING and reason.check(ConnectionDone):
                response.end(Failure(PotentialDataLoss()))
            else:
                if phase is _STOPPED and not reason.check(ConnectionAborted):
                    reason = Failure(ConnectionAborted())
                response.end(Failure(ResponseFailed([reason])))
            if call is not None:
                call.stop_body()
        elif call is not None:
            call.conn = None
            self._lost_before_head(call, reason)
        closed, self._closed = self._closed, None
        for waiting in closed or ():
            waiting.callback(None)

    def _lost_before_head(self, call: _Call, reason: Failure) -> None:
        if (
            self.reused
            and not self.received_any
            and not call.retried
            and not call.cancelled
            and call.replayable()
        ):
            # The server closed this idle connection as we wrote: it never saw the request.
            call.retried = True
            self.client.connect(call)
            return
        writing = call.writer is not None
        call.stop_body()
        if writing:
            error: Exception = RequestTransmissionFailed([reason])
        elif self.received_any:
            error = ResponseFailed([reason])
        else:
            error = ResponseNeverReceived([reason])
        call.attempt.errback(Failure(error))
