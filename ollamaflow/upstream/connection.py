"""One connection to a backend: a request written, its response read, one at a time.

The connection is a small state machine (:class:`Phase`). It writes a request (head and an
in-memory body in one write, or a :class:`~ollamaflow.upstream.request.BodyWriter` for a
producer), feeds what comes back to the llhttp parser, whose consumer it is, and hands the
response head to the request once the read that brought it is parsed, so a small answer is
complete (and the connection back in the pool) when the caller sees it. Reading pauses while
the body has no reader or its reader is paused: backpressure reaches the backend's socket.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from ollamaflow.http1.response import Head, ResponseReader
from ollamaflow.http1.rules import BadMessage
from ollamaflow.upstream.contracts import Where
from ollamaflow.upstream.pool import ConnectionPool
from ollamaflow.upstream.request import BodyWriter, Message
from ollamaflow.upstream.response import DONE, UpstreamResponse

log = Logger()


class Phase(enum.Enum):
    """Where a connection is; it is in exactly one."""

    IDLE = "in the pool (or just connected), no request"
    WAITING = "request sent, waiting for the response head"
    READING = "the response head is delivered; its body is being read"
    STOPPED = "the body's reader stopped it: ends when the connection does"
    CLOSED = "finished with: closing or closed, never reused"


_IDLE = Phase.IDLE
_WAITING = Phase.WAITING
_READING = Phase.READING
_STOPPED = Phase.STOPPED
_CLOSED = Phase.CLOSED


class Recipient(Protocol):
    """Who hears how a request went, once."""

    def callback(self, response: UpstreamResponse) -> None:
        """The response head came."""

    def errback(self, failure: Failure) -> None:
        """No response head will come."""


class Pending(Protocol):
    """A request as the connection carrying it sees it."""

    @property
    def message(self) -> Message: ...

    @property
    def outcome(self) -> Recipient: ...

    def try_again(self) -> bool:
        """The reused connection closed before anything came back (the server had closed it
        as the request went out): send it again on a fresh one if it may; whether it did."""
        ...


class Connection(protocol.Protocol):
    """One connection to a backend, reading responses through a :class:`ResponseReader`."""

    __slots__ = (
        "_announce",
        "_closed",
        "_on_made",
        "_reading_paused",
        "body_done",
        "call",
        "phase",
        "pool",
        "reader",
        "received_any",
        "response",
        "reused",
        "where",
        "writer",
    )

    def __init__(
        self,
        pool: ConnectionPool[Connection],
        where: Where,
        on_made: Callable[[Connection], None] | None = None,
    ) -> None:
        self.pool = pool
        self.where = where
        self._on_made = on_made
        self.phase = _IDLE
        self.call: Pending | None = None
        self.response: UpstreamResponse | None = None
        self.reader = ResponseReader(self)
        self.writer: BodyWriter | None = None
        #: The request's body is all written (a response before that closes the connection).
        self.body_done = False
        self.reused = False
        self.received_any = False
        #: A response head read but not yet handed to its request: that waits until the read
        #: is parsed, so a small answer is complete (and pooled) when the caller sees it.
        self._announce: tuple[Pending, UpstreamResponse] | None = None
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

    def send(self, call: Pending, reused: bool) -> None:
        """Write ``call`` (head and in-memory body in one write) and wait for its response."""
        self.call = call
        self.reused = reused
        self.received_any = False
        self.phase = _WAITING
        message = call.message
        self.reader.expect(message.is_head)
        transport: Any = self.transport
        producer = message.producer
        if producer is None:
            payload = message.payload
            transport.write(message.head + payload if payload else message.head)
            self.body_done = True
            return
        self.body_done = False
        transport.write(message.head)
        self.writer = writer = BodyWriter(
            producer, transport, self._body_written, self._body_broken
        )
        writer.start()

    def abort_request(self, call: Pending) -> None:
        """The caller cancelled ``call`` before its response head: drop the connection."""
        if self.call is not call:
            return
        self.call = None
        self._stop_writer()
        self._abort()

    def _body_written(self) -> None:
        self.writer = None
        self.body_done = True

    def _body_broken(self, error: Exception) -> None:
        """The request body could not be produced: give up on the request if no response
        head came yet (after one, the connection is just not reused)."""
        self.writer = None
        call = self.call
        if call is None or self.response is not None:
            return
        self.call = None
        self._abort()
        call.outcome.errback(Failure(error))

    def _stop_writer(self) -> None:
        """Stop a streaming body that will not be written to the end."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.stop()

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
                call, announced = announce
                try:
                    call.outcome.callback(announced)
                except Exception:
                    if self.response is announced:
                        self._broken(Failure())
                    else:  # complete already: the connection is not this response's any more
                        log.failure("response callback of {call!r} failed", call=call)
            response = self.response
            if response is not None and not self._reading_paused and response.waiting():
                self.update_reading()
        elif phase is _IDLE:
            try:
                self.reader.feed(data)  # empty lines are skipped; anything else is refused
            except BadMessage:
                self.pool.discard(self)
                self._broken(Failure())

    def response_head(self, head: Head) -> None:
        """The final response head: a response, handed over once the read is parsed."""
        call = self.call
        assert call is not None, "a response head comes while a request waits for it"
        response = UpstreamResponse(head, call.message.is_head, self)
        self.response = response
        self.phase = _READING
        self._announce = (call, response)

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
        if reusable and call.message.keep and self.body_done:
            self.phase = _IDLE
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self.pool.release(self)
        else:
            self._stop_writer()
            self.close()
        response.end(DONE)

    # -- the response's body source -------------------------------------------------------

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
            self._stop_writer()
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _broken(self, reason: Failure) -> None:
        """The response cannot be parsed (or its reader raised): abort the connection."""
        call, response = self.call, self.response
        self.call = self.response = None
        self._abort()
        self._stop_writer()
        failed = Failure(ResponseFailed([reason]))
        if response is not None:
            response.end(failed)
        elif call is not None:
            call.outcome.errback(failed)

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

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        phase, self.phase = self.phase, _CLOSED
        call, response = self.call, self.response
        self.call = self.response = None
        until_close = self.reader.connection_lost()
        if phase is _IDLE:
            self.pool.discard(self)
        elif response is not None:
            if until_close and phase is _READING and reason.check(ConnectionDone):
                response.end(Failure(PotentialDataLoss()))
            else:
                if phase is _STOPPED and not reason.check(ConnectionAborted):
                    reason = Failure(ConnectionAborted())
                response.end(Failure(ResponseFailed([reason])))
            self._stop_writer()
        elif call is not None:
            self._lost_before_head(call, reason)
        closed, self._closed = self._closed, None
        for waiting in closed or ():
            waiting.callback(None)

    def _lost_before_head(self, call: Pending, reason: Failure) -> None:
        if self.reused and not self.received_any and call.try_again():
            return
        writing = self.writer is not None
        self._stop_writer()
        if writing:
            error: Exception = RequestTransmissionFailed([reason])
        elif self.received_any:
            error = ResponseFailed([reason])
        else:
            error = ResponseNeverReceived([reason])
        call.outcome.errback(Failure(error))
