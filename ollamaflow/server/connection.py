"""One client connection of the HTTP server: HTTP/1.1 requests parsed by llhttp.

Twisted's ``HTTPChannel`` and ``Request`` cost more than everything else a proxied request does
(a line callback per header field, a ``Headers`` object each way, a dozen attributes and
Deferreds per request): on two cores they cap a do-nothing ``Site`` at a tenth of what nginx
proxies. Here llhttp parses (:class:`ollamaflow.http1.request.RequestParser`), and each request
goes, its path decoded and normalised as Ollama routes it (:mod:`ollamaflow.server.target`), to
the receiver its :class:`~ollamaflow.server.interfaces.RequestHandler` chooses from its head:
for the front door, client traffic to the gateway as a request of
:mod:`ollamaflow.server.request`, the admin API and the other pages as ordinary twisted.web
requests carried by :class:`~ollamaflow.server.web.WebStream`.

Requests on one connection are answered one at a time, in order. llhttp parses all that a read
holds, so requests completed behind the one being answered wait in a queue; bytes that arrive
while a response is in progress wait unparsed, and reading pauses while more than
:data:`_MAX_PENDING` of them wait. A request refused behind others is answered in its turn. The
response side is the transport's producer, so a client that reads slowly pauses whatever feeds
its response.

Deadlines, checked by :meth:`ollamaflow.server.acceptor.Acceptor.sweep` (as nginx's
``client_header_timeout`` and ``client_body_timeout``): a head must be whole within the read
timeout of its first byte, however its bytes trickle in (:attr:`head_since`); a body may pause
for no longer than it (:attr:`body_since`); a connection idle between requests closes after the
idle timeout (:attr:`since`).
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime, ISSLTransport
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from ollamaflow.http1.request import RequestParser, State
from ollamaflow.http1.rules import BadMessage
from ollamaflow.server.dates import DateCache
from ollamaflow.server.errors import error_path, error_response
from ollamaflow.server.interfaces import BodyReceiver, RequestHandler, RequestHead
from ollamaflow.server.target import PLAIN_TARGET, PathError, normalize_target

#: Bytes received while a response is in progress before reading pauses.
_MAX_PENDING = 256 * 1024
#: A read is parsed this many bytes at a time, stopping once a request is whole: llhttp parses
#: all it is given, and a read of tiny pipelined requests must not become thousands of queued
#: requests at once.
_SLICE = 16 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: ``RequestHead(...)`` without the Python-level ``__new__`` of a NamedTuple (a third of the
#: record's cost, on every request).
_new_head = tuple.__new__
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


class HTTPConnection(TwistedProtocol):
    """Parses requests, hands each to its receiver in turn, and writes nothing itself but
    errors and ``100 Continue``.

    ``handler`` chooses each request's receiver and body limit; ``connections`` holds the
    open connections of the server (this one from ``connectionMade`` to ``connectionLost``);
    ``header_names`` is the parser's cache of field names, shared by them."""

    def __init__(
        self,
        handler: RequestHandler,
        clock: IReactorTime,
        dates: DateCache,
        connections: set[HTTPConnection],
        header_names: dict[bytes, bytes],
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.dates = dates
        self._connections = connections
        self._header_names = header_names
        self._phase = _READING
        self._parser: RequestParser
        #: The request whose head has come and whose body is arriving.
        self._receiving: BodyReceiver | None = None
        self._limit = 0
        self._received = 0
        #: Its normalised path (for the dialect of an error); empty between requests.
        self._path = b""
        #: It asked for ``100 Continue`` and has not had it (nor sent its body) yet.
        self._continue = False
        #: Whole requests waiting for their turn; the one being answered.
        self._ready: deque[BodyReceiver] = deque()
        self._answering: BodyReceiver | None = None
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
        #: Set when the server drains: the connection closes after the current response, or
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
        self.peer_host = str(getattr(transport.getPeer(), "host", ""))
        self.secure = ISSLTransport.providedBy(transport)
        if hasattr(transport, "setTcpNoDelay"):
            # Every write is a whole response or a whole chunk of a stream: send it now.
            transport.setTcpNoDelay(True)
        transport.registerProducer(self, True)
        self._parser = RequestParser(self, self._header_names)
        self.since = self._now = self.clock.seconds()
        self._connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase is _READING:
            self._now = now = self.clock.seconds()
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
        self._connections.discard(self)
        self._parser.close()
        producer, self._producer = self._producer, None
        self._drop_receivers(reason)
        if producer is not None:
            producer.stopProducing()

    def _drop_receivers(self, reason: Failure) -> None:
        """Every request of the connection, answering or waiting its turn, hears it ended."""
        receivers = [e for e in (self._answering, *self._ready, self._receiving) if e]
        self._answering = self._receiving = None
        self._ready.clear()
        for receiver in receivers:
            receiver.connection_lost(reason)

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
        head = _new_head(
            RequestHead, (method, target, path, version, headers, fields, keep_alive, length)
        )
        handler = self.handler
        limit = handler.body_limit(head)
        if length is not None and length > limit:
            raise BadMessage(413, f"the request body is larger than {limit} bytes")
        self._limit = limit
        self._received = 0
        self.body_since = self._now
        self._receiving = handler.receiver(self, head)
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
        receiver = self._receiving
        assert receiver is not None
        receiver.body(data)

    def request_complete(self) -> None:
        receiver = self._receiving
        assert receiver is not None
        self._receiving = None
        self._path = b""
        self._continue = False
        self._ready.append(receiver)
        self.head_since = self._now  # a next head may start in the same read

    # -- the response side: called by the request being answered ---------------------------

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
        self.since = self.head_since = self.body_since = self._now = self.clock.seconds()
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

    # -- for the acceptor --------------------------------------------------------------------

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
                    receiver = self._ready.popleft()
                    self._phase = _ANSWERING
                    self._answering = receiver
                    receiver.complete()
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
        body = self.handler.error_body(path, status, message)
        self.transport.write(error_response(status, body, self.dates.value()))  # type: ignore[union-attr]
        self.close()
        self._drop_receivers(Failure(BadMessage(status, message)))
