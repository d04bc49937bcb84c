"""The server's connections: accepted up to a cap, swept when idle or slow, drained.

An :class:`Acceptor` is the Twisted factory a listening port is given
(:class:`~ollamaflow.server.interfaces.ListenFunction`): it builds an :class:`HTTPConnection`
per client, serving its requests through one :class:`RequestHandler`, or a :class:`Refusal`
past ``max_connections``. It never opens a socket itself.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ollamaflow.server.connection import HTTPConnection
from ollamaflow.server.dates import DateCache
from ollamaflow.server.interfaces import RequestHandler
from ollamaflow.server.refusal import REFUSAL_MESSAGE, Refusal, refusal_response
from ollamaflow.settings import DEFAULT_MAX_CONNECTIONS

#: A keep-alive connection with no request for this long is closed.
IDLE_TIMEOUT = 75.0
#: A request head not whole this long after its first byte, or a body that pauses for this
#: long, is answered 408 and closed (nginx's client_header_timeout and client_body_timeout).
READ_TIMEOUT = 60.0
#: How often at most a refusal is logged (each one is counted in /metrics).
REFUSAL_LOG_SECONDS = 60.0

log = Logger()


@attrs.frozen
class Timeouts:
    """How long a connection may be idle between requests, and a request slow to arrive."""

    idle: float = IDLE_TIMEOUT
    read: float = READ_TIMEOUT


def too_slow(connection: HTTPConnection, now: float, read_timeout: float) -> str | None:
    """Why the request ``connection`` is reading is answered 408 now (the message), or None:
    its head is not whole ``read_timeout`` after its first byte, or its body has paused that
    long."""
    if connection.reading_head():
        if now - connection.head_since > read_timeout:
            return f"the request head took more than {read_timeout:.0f} s"
    elif connection.reading_body() and now - connection.body_since > read_timeout:
        return f"no bytes of the request body for {read_timeout:.0f} s"
    return None


class Acceptor(ServerFactory):
    """Builds a connection per client serving requests through ``handler``, up to
    ``max_connections`` open at once (``Webserver.MaxConnections``)."""

    noisy = False

    def __init__(
        self,
        handler: RequestHandler,
        clock: IReactorTime,
        *,
        timeouts: Timeouts = Timeouts(),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.dates = DateCache(clock)
        #: Open connections, each from connectionMade to connectionLost.
        self.connections: set[HTTPConnection] = set()
        #: Header field names seen and found valid, with their lower-case form.
        self.header_names: dict[bytes, bytes] = {}
        #: Connections refused since start, for ``/metrics``.
        self.refused = 0
        #: Refused connections still lingering (see :class:`Refusal`).
        self.lingering: set[Refusal] = set()
        self._refusal_body = handler.error_body(b"/", 503, REFUSAL_MESSAGE)
        self._refusal_logged = -REFUSAL_LOG_SECONDS
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        """An :class:`HTTPConnection`, or a :class:`Refusal` when ``max_connections`` are open
        (Twisted calls connectionMade right after this, which adds it to :attr:`connections`)."""
        if len(self.connections) >= self.max_connections:
            return self._refuse()
        connection = HTTPConnection(
            self.handler, self.clock, self.dates, self.connections, self.header_names
        )
        connection.factory = self
        return connection

    def _refuse(self) -> Refusal:
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
        answer = refusal_response(self._refusal_body, self.dates.value())
        return Refusal(self.clock, answer, self.lingering)

    def startFactory(self) -> None:
        self._sweeper.start(min(self.timeouts.idle, self.timeouts.read) / 4, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()

    def sweep(self) -> None:
        """Close keep-alive connections idle too long; answer 408 to a request whose head is
        not whole the read timeout after its first byte (however its bytes trickle in), or
        whose body has paused for that long (as nginx's client_header_timeout and
        client_body_timeout)."""
        now = self.clock.seconds()
        idle, read = self.timeouts.idle, self.timeouts.read
        for connection in list(self.connections):
            if connection.idle():
                if now - connection.since > idle:
                    connection.close()
            else:
                why = too_slow(connection, now, read)
                if why is not None:
                    connection.reject(408, why)

    def drain(self) -> None:
        """Stop reusing connections: idle ones close now, the others after their response; a
        request pipelined behind a response already begun (a stream) is answered first, in its
        turn, so the client learns why (the gateway refuses it 503 while draining)."""
        for connection in list(self.connections):
            connection.closing = True
            if connection.idle():
                connection.close()
