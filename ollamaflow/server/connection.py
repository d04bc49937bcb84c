"""One client connection of the main listener: HTTP/1.1 requests parsed by llhttp.

Twisted's ``HTTPChannel`` and ``Request`` cost more than everything else a proxied request does
(a line callback per header field, a ``Headers`` object each way, a dozen attributes and
Deferreds per request): on two cores they cap a do-nothing ``Site`` at a tenth of what nginx
proxies. Here llhttp parses (:class:`ollamaflow.http1.request.RequestParser`), and each request
goes to one of two handlers that the listener chooses from its method and its path, decoded and
normalised as Ollama routes it (:mod:`ollamaflow.server.target`, :meth:`Listener.exchange`):
client traffic to the gateway as a :class:`ClientRequest`, the admin API and the other pages as
ordinary twisted.web requests carried by :class:`WebStream`.

Requests on one connection are answered one at a time, in order. llhttp parses all that a read
holds, so requests completed behind the one being answered wait in a queue; bytes that arrive
while a response is in progress wait unparsed, and reading pauses while more than
:data:`_MAX_PENDING` of them wait. A request refused behind others is answered in its turn. The
response side is the transport's producer, so a client that reads slowly pauses whatever feeds
its response.

Deadlines, checked by :meth:`Listener.sweep` (as nginx's ``client_header_timeout`` and
``client_body_timeout``): a head must be whole within the read timeout of its first byte,
however its bytes trickle in (:attr:`head_since`); a body may pause for no longer than it
(:attr:`body_since`); a connection idle between requests closes after the idle timeout
(:attr:`since`).
"""

from __future__ import annotations

import enum
import tempfile
from collections import deque
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from ollamaflow.http1.request import RequestParser, State
from ollamaflow.http1.rules import BadMessage, split_target
from ollamaflow.server.request import ClientRequest
from ollamaflow.server.target import PLAIN_TARGET, PathError, normalize_target

if TYPE_CHECKING:
    from ollamaflow.listener import Listener

#: Bodies up to this size are kept in memory; larger ones go to a temporary file.
IN_MEMORY_BODY = 1 << 20
#: Bytes received while a response is in progress before reading pauses.
_MAX_PENDING = 256 * 1024
#: A read is parsed this many bytes at a time, stopping once a request is whole: llhttp parses
#: all it is given, and a read of tiny pipelined requests must not become thousands of queued
#: requests at once.
_SLICE = 16 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BODY = State.BODY


class Phase(enum.Enum):
    """What a connection does with the bytes it receives."""

    #: No response in progress: bytes go to the parser.
    READING = "reading"
    #: A response is in progress: bytes wait, unparsed, until it ends.
    ANSWERING = "answering"
    #: Closing or closed: nothing more is read or answered.
    CLOSED = "closed"


_READING = Phase.READING
_ANSWERING = Phase.ANSWERING
_CLOSED = Phase.CLOSED


class Exchange(Protocol):
    """What receives one request's body and then serves it: the gateway's request or a
    twisted.web request (:class:`ollamaflow.server.web.WebStream`)."""

    def body(self, data: bytes) -> None: ...

    def complete(self) -> None: ...

    def connection_lost(self, reason: Failure) -> None: ...


class GatewayExchange:
    """Collects the body of a request for the gateway, then hands the request over."""

    __slots__ = ("_file", "_parts", "listener", "request", "size")

    def __init__(self, listener: Listener, request: ClientRequest) -> None:
        self.listener = listener
        self.request = request
        self._parts: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0

    def body(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
        elif self.size > IN_MEMORY_BODY:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - the request owns it
            self._file.write(b"".join(self._parts))
            self._file.write(data)
            self._parts = []
        else:
            self._parts.append(data)

    def complete(self) -> None:
        request = self.request
        if self._file is not None:
            self._file.seek(0)
            request.content = self._file
        elif self.size:
            parts = self._parts
            request.content = BytesIO(parts[0] if len(parts) == 1 else b"".join(parts))
        self.listener.serve(request)

    def connection_lost(self, reason: Failure) -> None:
        self.request.connection_lost(reason)
        if self._file is not None:
            self._file.close()


def error_response(status: int, body: bytes, date: bytes, fields: bytes = b"") -> bytes:
    """A whole JSON error response that ends the connection (``fields``: more, each ending
    in CRLF)."""
    return (
        b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%sConnection: close\r\n\r\n%s"
        % (status, RESPONSES.get(status, b"Error"), date, len(body), fields, body)
    )


def error_path(target: bytes) -> bytes:
    """The path whose dialect an error about a request is in, from its target as received:
    normalised if it can be, else as sent (``//v1.0/...`` is still the admin API's)."""
    try:
        origin = split_target(target)[0]
    except BadMessage:
        return b"/"
    try:
        return normalize_target(origin)[1]
    except PathError:
        return b"/" + origin.partition(b"?")[0].lstrip(b"/")


class HTTPConnection(TwistedProtocol):
    """Parses requests, hands each to its exchange in turn, and writes nothing itself but
    errors and ``100 Continue``."""

    factory: Listener

    def __init__(self) -> None:
        self._phase = _READING
        self._parser: RequestParser
        #: The request whose head has come and whose body is arriving.
        self._receiving: Exchange | None = None
        self._limit = 0
        self._received = 0
        #: Its normalised path (for the dialect of an error); empty between requests.
        self._path = b""
        #: It asked for ``100 Continue`` and has not had it (nor sent its body) yet.
        self._continue = False
        #: Whole requests waiting for their turn; the one being answered.
        self._ready: deque[Exchange] = deque()
        self._answering: Exchange | None = None
        #: A request refused behind others: answered in its turn (status, message, path).
        self._refused: tuple[int, str, bytes] | None = None
        #: Bytes received while a response was in progress, not parsed yet.
        self._waiting: deque[bytes] = deque()
        self._waiting_size = 0
        self._producer: IPushProducer | None = None
        self._transport_paused = False
        self._reading_paused = False
        self._advancing = False
        self._now = 0.0
        self.peer_host = ""
        self.secure = False
        #: Set when the listener drains: the connection closes after the current response, or
        #: (that one begun before) after the request pipelined behind it, answered in its turn.
        self.closing = False
        #: When the connection last became idle (for the idle timeout).
        self.since = 0.0
        #: When the current head's first byte came (for the read timeout).
        self.head_since = 0.0
        #: When the current body's last byte came, or its head ended (for the read timeout).
        self.body_since = 0.0

    # -- connection events ----------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        factory = self.factory
        self.peer_host = str(getattr(transport.getPeer(), "host", ""))
        self.secure = ISSLTransport.providedBy(transport)
        if hasattr(transport, "setTcpNoDelay"):
            # Every write is a whole response or a whole chunk of a stream: send it now.
            transport.setTcpNoDelay(True)
        transport.registerProducer(self, True)
        self._parser = RequestParser(self, factory.header_names)
        self.since = self._now = factory.clock.seconds()
        factory.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase is _READING:
            self._now = now = self.factory.clock.seconds()
            parser = self._parser
            if parser.state is _BODY:
                self.body_since = now
            elif parser.idle():
                self.head_since = now  # this may be the first byte of a head
            if len(data) <= _SLICE:
                try:
                    parser.feed(data)
                except BadMessage as e:
                    self._refuse(e)
            else:
                self._parse(data)
            self._advance()
        elif phase is _ANSWERING:
            self._waiting.append(data)
            self._waiting_size += len(data)
            if self._waiting_size > _MAX_PENDING and not self._reading_paused:
                self._reading_paused = True
                self.transport.pauseProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._phase = _CLOSED
        self.factory.connections.discard(self)
        self._parser.close()
        producer, self._producer = self._producer, None
        self._drop_exchanges(reason)
        if producer is not None:
            producer.stopProducing()

    def _drop_exchanges(self, reason: Failure) -> None:
        """Every request of the connection, answering or waiting its turn, hears it ended."""
        exchanges = [e for e in (self._answering, *self._ready, self._receiving) if e]
        self._answering = self._receiving = None
        self._ready.clear()
        for exchange in exchanges:
            exchange.connection_lost(reason)

    # -- the parser's consumer --------------------------------------------------------------

    def request_head(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        fields: dict[bytes, bytes],
        keep_alive: bool,
        length: int | None,
    ) -> None:
        """Normalise the path, check the body's size, choose the handler."""
        if PLAIN_TARGET.match(target):
            path = target.partition(b"?")[0]  # nothing to decode or normalise
        else:
            try:
                target, path = normalize_target(target)
            except PathError as e:  # (its dialect: see error_path)
                raise BadMessage(400, str(e)) from None
        self._path = path
        factory = self.factory
        limit = factory.body_limit(path, fields.get(b"host"))
        if length is not None and length > limit:
            raise BadMessage(413, f"the request body is larger than {limit} bytes")
        self._limit = limit
        self._received = 0
        self.body_since = self._now
        self._receiving = factory.exchange(
            self, method, target, path, version, headers, fields, keep_alive, length
        )
        if (
            length != 0
            and version == b"HTTP/1.1"
            and fields.get(b"expect", b"").lower() == b"100-continue"
        ):
            self._continue = True  # written once this request is the current one

    def request_body(self, data: bytes) -> None:
        self._continue = False  # the client did not wait
        self._received += len(data)
        if self._received > self._limit:
            raise BadMessage(413, f"the request body is larger than {self._limit} bytes")
        exchange = self._receiving
        assert exchange is not None
        exchange.body(data)

    def request_complete(self) -> None:
        exchange = self._receiving
        assert exchange is not None
        self._receiving = None
        self._path = b""
        self._continue = False
        self._ready.append(exchange)
        self.head_since = self._now  # a next head may start in the same read

    # -- the response side: called by the exchange ----------------------------------------

    def request_done(self, persistent: bool) -> None:
        """The response is complete: answer the next request, or close."""
        self._answering = None
        self._producer = None
        if self._phase is _CLOSED:
            return
        if not persistent:
            self.close()
            return
        # Draining (``closing``) after this response's head went out: a request pipelined
        # behind it is still answered in its turn (refused while draining, and closing).
        self._phase = _READING
        # The clocks start again: bytes that waited were not the client's delay.
        self.since = self.head_since = self.body_since = self._now = self.factory.clock.seconds()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        self._advance()

    def register_producer(self, producer: IPushProducer, streaming: bool) -> None:
        if not streaming:
            raise TypeError("only push producers can feed a response")
        if self._producer is not None:
            raise RuntimeError("a producer is already registered")
        self._producer = producer
        if self._transport_paused:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        self._producer = None

    # -- for the listener -------------------------------------------------------------------

    def idle(self) -> bool:
        """Whether the connection waits for a request and has none of one yet."""
        return self._phase is _READING and self._parser.idle() and self._refused is None

    def reading_head(self) -> bool:
        """Whether part of a request head has come and the rest has not."""
        return self._phase is _READING and self._parser.reading_head()

    def reading_body(self) -> bool:
        """Whether a request's head has come and part of its body has not."""
        return self._phase is _READING and self._parser.state is _BODY

    def close(self) -> None:
        """Close once what is written has been sent. The connection first stops being the
        transport's producer: else, a response larger than the socket's buffer having paused
        it, Twisted would resume it when the buffer drains instead of closing."""
        self._phase = _CLOSED
        transport: Any = self.transport
        if getattr(transport, "producer", None) is self:
            transport.unregisterProducer()
        transport.loseConnection()

    # -- IPushProducer, for the transport: the client reads slowly, or catches up -----------

    def pauseProducing(self) -> None:
        self._transport_paused = True
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport_paused = False
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()

    # -- parsing and answering in turn --------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time; what follows a slice that completes a request
        waits, unparsed, until the requests before it are answered."""
        parser = self._parser
        size = len(data)
        start = 0
        try:
            while start < size:
                parser.feed(data if size <= _SLICE else data[start : start + _SLICE])
                start += _SLICE
                if self._ready and start < size:
                    rest = data[start:]
                    self._waiting.appendleft(rest)
                    self._waiting_size += len(rest)
                    return
        except BadMessage as e:
            self._refuse(e)  # what follows is never read

    def _refuse(self, error: BadMessage) -> None:
        """The request being parsed is refused: answered in its turn."""
        self._refused = (error.status, str(error), self._path or error_path(self._parser.target))

    def _advance(self) -> None:
        """Answer what is whole, in order; parse what waited once nothing is in progress."""
        if self._advancing:
            return
        self._advancing = True
        try:
            while self._phase is _READING:
                if self._ready:
                    exchange = self._ready.popleft()
                    self._phase = _ANSWERING
                    self._answering = exchange
                    exchange.complete()
                elif self._refused is not None:
                    self._reject(*self._refused)
                elif self._waiting:
                    data = self._waiting.popleft()
                    self._waiting_size -= len(data)
                    self._parse(data)
                else:
                    if self.closing and self._parser.idle():
                        self.close()  # draining, and no request has begun: none is answered
                        return
                    if self._continue:
                        self._continue = False
                        self.transport.write(_CONTINUE)  # type: ignore[union-attr]
                    return
        finally:
            self._advancing = False

    # -- errors -----------------------------------------------------------------------------

    def reject(self, status: int, message: str) -> None:
        """Answer the request being read with a JSON error, and close: the rest of what the
        client sends is never read."""
        self._reject(status, message, self._path or error_path(self._parser.target))

    def _reject(self, status: int, message: str, path: bytes) -> None:
        self._phase = _CLOSED
        self._refused = None
        body = self.factory.error_body(path, status, message)
        self.transport.write(error_response(status, body, self.factory.date()))  # type: ignore[union-attr]
        self.close()
        self._drop_exchanges(Failure(BadMessage(status, message)))
