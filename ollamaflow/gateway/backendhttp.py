"""A lean HTTP/1.1 client for talking to backends: one protocol object per connection.

Twisted's ``HTTPConnectionPool`` + ``HTTP11ClientProtocol`` stack costs a third of the gateway's
CPU on small requests (a parser per request, a transport proxy, a dozen Deferreds). Here a
request is one ``transport.write`` on a pooled connection and a response is parsed by a small
state machine in the connection itself, delivered through the same ``IResponse`` interface:
``deliverBody(protocol)`` with the response as the protocol's ``IPushProducer`` transport.

Keep-alive connections are pooled per ``(host, port, ssl)``, newest first; one periodic sweep
per client closes those idle longer than ``idle_seconds``. A request sent on a reused connection
that the server had already closed (nothing at all came back) is retried once on a fresh one.
"""

from __future__ import annotations

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
from ollamaflow.records import Backend

log = Logger()

_Where = tuple[str, int, bool]
_Body: TypeAlias = "bytes | IBodyProducer | None"
#: Request header fields: (name, value) pairs, as the gateway builds them.
_Fields: TypeAlias = "Sequence[tuple[bytes, bytes]]"

#: Status line plus header fields of one response; larger is refused.
MAX_HEAD = 64 * 1024
#: One chunk-size line, extensions included.
_MAX_CHUNK_LINE = 4096
#: Interim (1xx) responses skipped before the final one.
_MAX_INTERIM = 16

#: Removed from ``IResponse.headers``, as Twisted's client does: they describe the connection.
_CONNECTION_CONTROL = frozenset(
    {
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
#: Request fields this client writes itself from the body it is given.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_NO_BODY_CODES = frozenset({204, 304})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_FOLD = re.compile(rb"[ \t]*\n[ \t]+")
#: Distinct response header names remembered (their checked, lowercased and canonical forms).
_MAX_NAMES = 1000

# Connection phases. A connection is in exactly one; the body phases carry ``_left``.
_IDLE = 0  # in the pool (or just connected), no request
_HEAD = 1  # request sent, reading the status line and header fields
_LENGTH = 2  # identity body, ``_left`` bytes to go
_CHUNK_SIZE = 3  # reading a chunk-size line
_CHUNK_DATA = 4  # inside a chunk, ``_left`` bytes to go
_CHUNK_END = 5  # the CRLF after a chunk's data
_TRAILERS = 6  # after the last chunk: trailer fields up to an empty line
_UNTIL_CLOSE = 7  # body delimited by the server closing the connection
_STOPPED = 8  # body aborted by the reader (stopProducing): ends when the connection does
_CLOSED = 9  # finished with: closing or closed, never reused


#: How every complete body ends; one shared instance, as Twisted shares ``connectionDone``.
_DONE = Failure(ResponseDone("Response body fully received"))


class BadResponse(Exception):
    """The backend's response broke HTTP/1.1 framing or a limit of this client."""


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
        #: Response header names seen: raw name -> (lowercased, canonical as ``Headers`` has it).
        self.header_names: dict[bytes, tuple[bytes, bytes]] = {}

    def header_name(self, name: bytes) -> tuple[bytes, bytes]:
        """Check a response header name; its lowercased and canonical forms, remembered."""
        if not _TOKEN.match(name):
            raise BadResponse(f"invalid header name {name[:80]!r}")
        probe = Headers()
        probe.addRawHeader(name, b"")
        canonical = next(iter(probe.getAllRawHeaders()))[0]
        known = (name.lower(), canonical)
        if len(self.header_names) < _MAX_NAMES:
            self.header_names[name] = known
        return known

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
        if self.connector is not None and self.connector.state == "connecting":  # type: ignore[attr-defined]
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
        if not _TOKEN.match(method):
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
        "_conn",
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
        self._conn = conn
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
        if self._conn is not None:
            self._conn.update_reading()

    def received(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None or self._paused or self._held:
            self._held.append(data)
        else:
            protocol.dataReceived(data)

    def end(self, reason: Failure) -> None:
        """The body is over (``ResponseDone``, ``PotentialDataLoss`` or ``ResponseFailed``)."""
        self._conn = None
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
        if self._conn is not None:
            self._conn.update_reading()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._held or self._ended is not None:
            self._flush()
        if self._conn is not None:
            self._conn.update_reading()

    def stopProducing(self) -> None:
        """Abort the backend connection; the body ends with ``ResponseFailed``."""
        if self._conn is not None:
            self._conn.stop_body()

    def loseConnection(self) -> None:
        self.stopProducing()


class _Connection(Protocol):
    """One connection to a backend: writes requests, parses responses, one at a time."""

    __slots__ = (
        "_buf",
        "_closed",
        "_head_size",
        "_interim",
        "_keep",
        "_left",
        "_on_made",
        "_reading_paused",
        "call",
        "client",
        "idle_since",
        "phase",
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
        self.reused = False
        self.received_any = False
        self.idle_since = 0.0
        self._buf = b""
        self._left = 0
        self._keep = False
        self._interim = 0
        self._head_size = 0
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
        self.phase = _HEAD
        self._interim = 0
        self._head_size = 0
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
        self.phase = _CLOSED
        self.transport.abortConnection()  # type: ignore[union-attr]

    def request_failed(self, error: Exception) -> None:
        """The request body could not be produced: give up on the connection."""
        call = self.call
        self.phase = _CLOSED
        self.transport.abortConnection()  # type: ignore[union-attr]
        if call is not None and self.response is None:
            self.call = None
            call.conn = None
            call.attempt.errback(Failure(error))
        elif self.response is not None:
            self._end_body(Failure(ResponseFailed([Failure(error)])))

    # -- responses ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parse(data)
        except BadResponse as e:
            self._broken(Failure(e))
        except Exception:
            # A body protocol raised: treat it like Twisted does, as a broken response.
            self._broken(Failure())

    def _parse(self, data: bytes) -> None:
        phase = self.phase
        if phase >= _STOPPED:
            return
        if phase == _IDLE:
            self.client.discard(self)
            raise BadResponse("data from the backend on an idle connection")
        self.received_any = True
        if self._buf:
            data = self._buf + data
            self._buf = b""
        while data:
            phase = self.phase
            if phase in (_LENGTH, _CHUNK_DATA):
                left = self._left
                if len(data) < left:
                    self._left = left - len(data)
                    self._deliver(data)
                    break
                piece, data = data[:left], data[left:]
                self._left = 0
                self._deliver(piece)
                if self.phase != phase:
                    return  # the reader stopped the body
                if phase == _LENGTH:
                    self._complete(data)
                    return
                self.phase = _CHUNK_END
            elif phase == _HEAD:
                data = self._parse_head(data)
            elif phase == _CHUNK_SIZE:
                end = data.find(b"\n")
                if end < 0:
                    if len(data) > _MAX_CHUNK_LINE:
                        raise BadResponse("chunk-size line too long")
                    self._buf = data
                    return
                line = data[:end].removesuffix(b"\r")
                data = data[end + 1 :]
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.match(size):
                    raise BadResponse(f"invalid chunk size {line[:40]!r}")
                self._left = int(size, 16)
                if self._left:
                    self.phase = _CHUNK_DATA
                else:
                    self.phase = _TRAILERS
                    self._head_size = 0
            elif phase == _CHUNK_END:
                if data.startswith(b"\r\n"):
                    data = data[2:]
                elif data.startswith(b"\n"):
                    data = data[1:]
                elif data == b"\r":
                    self._buf = data
                    return
                else:
                    raise BadResponse("chunk data not followed by CRLF")
                self.phase = _CHUNK_SIZE
            elif phase == _TRAILERS:
                end = data.find(b"\n")
                if end < 0:
                    if self._head_size + len(data) > MAX_HEAD:
                        raise BadResponse("trailer section too long")
                    self._buf = data
                    return
                self._head_size += end + 1
                if self._head_size > MAX_HEAD:
                    raise BadResponse("trailer section too long")
                line = data[:end].removesuffix(b"\r")
                data = data[end + 1 :]
                if not line:
                    self._complete(data)
                    return
            elif phase == _UNTIL_CLOSE:
                self._deliver(data)
                break
            else:
                return
        response = self.response
        if response is not None and not self._reading_paused and response.waiting():
            self.update_reading()

    def _deliver(self, data: bytes) -> None:
        response = self.response
        if response is not None:
            response.received(data)

    def _parse_head(self, data: bytes) -> bytes:
        """Parse a response head from ``data`` if complete; returns the bytes after it."""
        crlf = data.find(b"\n\r\n")
        lf = data.find(b"\n\n")
        if crlf < 0 and lf < 0:
            if len(data) > MAX_HEAD:
                raise BadResponse(f"response head larger than {MAX_HEAD} bytes")
            self._buf = data
            return b""
        if lf >= 0 and (crlf < 0 or lf < crlf):
            end, rest = lf, data[lf + 2 :]
        else:
            end, rest = crlf, data[crlf + 3 :]
        if end > MAX_HEAD:
            raise BadResponse(f"response head larger than {MAX_HEAD} bytes")
        block = data[:end].replace(b"\r\n", b"\n").removesuffix(b"\r")
        if b"\r" in block or b"\x00" in block:
            raise BadResponse("bare CR or NUL in the response head")
        if b"\n " in block or b"\n\t" in block:
            block = _unfold(block)
        lines = block.split(b"\n")
        status = lines[0]
        parts = status.split(b" ", 2)
        version = parts[0]
        if (
            len(parts) < 2
            or len(version) != 8
            or not version.startswith(b"HTTP/1.")
            or not version[7:].isdigit()
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise BadResponse(f"invalid status line {status[:80]!r}")
        code = int(parts[1])
        phrase = parts[2] if len(parts) > 2 else b""
        minor = version[7] - 48
        call = self.call
        assert call is not None
        is_head = call.is_head
        names = self.client.header_names
        fields: dict[bytes, list[bytes]] = {}
        connection: list[bytes] = []
        lengths: list[bytes] = []
        codings: list[bytes] = []
        del lines[0]
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadResponse(f"invalid header line {line[:80]!r}")
            known = names.get(name) or self.client.header_name(name)
            lower, canonical = known
            value = value.strip(b" \t")
            if lower in _CONNECTION_CONTROL:
                if lower == b"connection":
                    connection.append(value.lower())
                    continue
                if lower == b"content-length":
                    lengths.append(value)
                    if not is_head:
                        continue
                elif lower == b"transfer-encoding":
                    codings.append(value.lower())
                    continue
                else:
                    continue
            values = fields.get(canonical)
            if values is None:
                fields[canonical] = [value]
            else:
                values.append(value)
        headers = Headers()
        # Values were checked above (no CR, LF or NUL): skip Headers' per-value sanitising.
        headers._rawHeaders = fields
        if 100 <= code < 200:
            if code == 101:
                raise BadResponse("101 Switching Protocols was not asked for")
            self._interim += 1
            if self._interim > _MAX_INTERIM:
                raise BadResponse("too many interim responses")
            return rest
        tokens = _tokens(connection) if connection else ()
        keep = b"close" not in tokens if minor >= 1 else b"keep-alive" in tokens
        length: int | str
        if is_head or code in _NO_BODY_CODES:
            length, phase = 0, -1
        elif codings:
            if _tokens(codings)[-1:] == [b"chunked"]:
                length, phase = UNKNOWN_LENGTH, _CHUNK_SIZE
                if lengths:
                    keep = False  # both framings: a smuggling attempt or a broken server
            else:
                length, phase, keep = UNKNOWN_LENGTH, _UNTIL_CLOSE, False
        elif lengths:
            length = _content_length(lengths)
            phase = _LENGTH if length else -1
        else:
            length, phase, keep = UNKNOWN_LENGTH, _UNTIL_CLOSE, False
        self._keep = keep and call.keep
        response = _Response((b"HTTP", 1, minor), code, phrase, headers, length, self)
        self.response = response
        call.conn = None
        if phase == _LENGTH and isinstance(length, int) and len(rest) >= length:
            # The whole body came with the head (a small answer): hold it, so the caller
            # sees a complete response and the reader gets it all at once.
            response.received(rest[:length])
            rest = rest[length:]
            phase = -1
        self.call = None if phase == -1 else call
        if phase == -1:
            # Nothing more to read: the connection is done before the caller sees the response.
            self.phase = _CLOSED
            self._finish(call, response, rest)
            response.end(_DONE)
            call.attempt.callback(response)
            return b""
        self.phase = phase
        self._left = length if phase == _LENGTH else 0  # type: ignore[assignment]
        self._head_size = 0
        self._buf = b""
        call.attempt.callback(response)
        if self.phase != phase or self.response is not response:
            return b""  # stopped, or finished, from inside the callback
        return rest

    def _complete(self, rest: bytes) -> None:
        """The response body is complete; ``rest`` is whatever followed it."""
        call, response = self.call, self.response
        assert call is not None and response is not None
        self._finish(call, response, rest)
        response.end(_DONE)

    def _finish(self, call: _Call, response: _Response, rest: bytes) -> None:
        """Put the connection back in the pool (before the caller hears of the end, like
        Twisted's pool) or close it."""
        self.call = None
        self.response = None
        response._conn = None
        if self._keep and call.body_done and not rest:
            self.phase = _IDLE
            self._buf = b""
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self.client.release(self)
        else:
            call.stop_body()
            self.close()

    def update_reading(self) -> None:
        """Read from the socket only while the body has a reader that is not paused."""
        response = self.response
        want_paused = response is not None and response.waiting()
        if want_paused != self._reading_paused and self.phase < _STOPPED:
            self._reading_paused = want_paused
            if want_paused:
                self.transport.pauseProducing()  # type: ignore[union-attr]
            else:
                self.transport.resumeProducing()  # type: ignore[union-attr]

    def stop_body(self) -> None:
        """The reader stopped the body: abort; it ends with ``ResponseFailed`` once closed."""
        if self.response is not None and self.phase < _STOPPED:
            self.phase = _STOPPED
            if self.call is not None:
                self.call.stop_body()
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _broken(self, reason: Failure) -> None:
        """The response cannot be parsed (or its reader raised): abort the connection."""
        call, response = self.call, self.response
        self.phase = _CLOSED
        self.call = self.response = None
        self.transport.abortConnection()  # type: ignore[union-attr]
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
        if phase == _IDLE:
            self.client.discard(self)
        elif response is not None:
            if phase == _UNTIL_CLOSE and reason.check(ConnectionDone):
                response.end(Failure(PotentialDataLoss()))
            else:
                if phase == _STOPPED and not reason.check(ConnectionAborted):
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


def _unfold(block: bytes) -> bytes:
    """Undo obsolete line folding: each fold becomes one space (RFC 9112 §5.2)."""
    first = block.find(b"\n")
    if block[first + 1 : first + 2] in (b" ", b"\t"):
        raise BadResponse("whitespace between the status line and the first header field")
    return _FOLD.sub(b" ", block)


def _tokens(values: list[bytes]) -> list[bytes]:
    """The comma-separated tokens of a list field's values, in order, lowercased already."""
    if len(values) == 1 and b"," not in values[0]:
        return [values[0]]
    return [t.strip(b" \t") for v in values for t in v.split(b",") if t.strip(b" \t")]


def _content_length(values: list[bytes]) -> int:
    """Content-Length: repeated values must agree (RFC 9110 §8.6)."""
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])
    found = {v.strip(b" \t") for value in values for v in value.split(b",")}
    if len(found) != 1:
        raise BadResponse(f"conflicting Content-Length values {values!r}")
    text = found.pop()
    if not text.isdigit() or len(text) > 18:
        raise BadResponse(f"invalid Content-Length {text!r}")
    return int(text)
