"""A backend's response as the gateway gets it: the head, and the body's stream.

The head comes from the llhttp parser (:class:`~ollamaflow.http1.response.ResponseReader`,
strict and bounded) as a :class:`~ollamaflow.http1.response.Head`, and starts an
:class:`UpstreamResponse`, which Twisted's ``IResponse`` describes too: the body goes to a
protocol through ``deliverBody``, with the response itself as that protocol's
``IPushProducer`` transport. The header fields a response's ``Connection`` names are dropped
here, with the other hop-by-hop ones.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from ollamaflow.http1.response import Framing, Head
from ollamaflow.http1.rules import HOP_BY_HOP
from ollamaflow.twisted_internals import headers_of

log = Logger()

#: Removed from the headers: they describe the connection, not the response (and so do the
#: fields a response's ``Connection`` names); the body's length is the response's own.
_CONNECTION_CONTROL = HOP_BY_HOP | {b"content-length"}
#: An answer to HEAD keeps its Content-Length: it tells the size of what GET would send.
_HEAD_CONTROL = _CONNECTION_CONTROL - {b"content-length"}

#: How every complete body ends; one shared instance, as Twisted shares ``connectionDone``.
DONE = Failure(ResponseDone("Response body fully received"))


class BodySource(Protocol):
    """Where a body's bytes come from (the connection): told when to read and to stop."""

    def update_reading(self) -> None:
        """Read while the body has a reader that is not paused; pause otherwise."""

    def stop_body(self) -> None:
        """The reader stopped the body: abort, the body then ends with ``ResponseFailed``."""


@implementer(IResponse, IPushProducer)
class UpstreamResponse:
    """The response head, and the body's transport: pause, resume or stop reading it.

    Body bytes that come before ``deliverBody``, or while the reader is paused, are held (and
    the source told to stop reading); the end is told after the last held byte."""

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

    def __init__(self, head: Head, is_head: bool, source: BodySource | None) -> None:
        """The response a parsed final ``head`` starts; ``is_head`` when it answers HEAD."""
        drop = _HEAD_CONTROL if is_head else _CONNECTION_CONTROL
        if head.connection:
            drop = drop | head.connection
        self.headers: Headers = headers_of(
            [(n, v) for n, v in head.fields if n.lower() not in drop]
        )
        framing = head.framing
        length: int | str
        if framing is Framing.NONE:
            length = 0
        elif framing is Framing.LENGTH and head.length is not None:
            length = head.length
        else:
            length = UNKNOWN_LENGTH
        self.length = length
        self.version = (b"HTTP", 1, head.minor)
        self.code = head.code
        self.phrase = head.phrase
        self.request = None
        self.previousResponse: IResponse | None = None
        #: Reading from it while the body is not over; None after.
        self.source = source
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

    # -- from the connection --------------------------------------------------------------

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

    def waiting(self) -> bool:
        """Whether reading should stop: nobody reads the body yet, or its reader paused."""
        return self._paused or self._protocol is None

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
