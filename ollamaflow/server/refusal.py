"""A connection over the cap: answered 503 at once, then closed without a reset."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from ollamaflow.server.errors import error_response

#: After answering a connection over the cap, what its client still sends is read and dropped
#: for up to this long, so that closing it never resets it (nor loses the answer).
LINGER_SECONDS = 5.0
#: Refused connections lingering at once, at most (a client that never closes holds one for
#: LINGER_SECONDS); beyond, the answer is followed by an orderly close at once.
MAX_LINGERING = 128
#: The message of the 503 (its body is in the dialect of ``/``, Ollama's).
REFUSAL_MESSAGE = "too many connections; retry in a second"


def refusal_response(body: bytes, date: bytes) -> bytes:
    """The whole answer to a connection over ``MaxConnections``: 503, retry in a second, and
    the connection closes (its request, never read, may not even have been sent)."""
    return error_response(503, body, date, b"Retry-After: 1\r\n")


class Refusal(Protocol):
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
