"""Moving a backend's response body to the client, as it arrives.

Every read from the backend is one write to the client (NDJSON lines and SSE events are never
held back), and the backend connection is the client's producer, so a slow reader pauses the
backend instead of growing a buffer. The relay only moves bytes and watches for silence; what
the end of a body means is the exchange's to decide (:class:`RelayTarget`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ollamaflow.records import Backend

log = Logger()


def guarded(method: Callable[..., None]) -> Callable[..., None]:
    """An entry into a request's handling from outside it (the scheduler, the backend client,
    a timer, the relay): a bug there ends the request through the object's ``crash`` (a 500,
    or a cut-off response, and its slot given back), never leaves it hanging."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception:
            self.crash(Failure())

    return guarded


def producer_of(protocol: TwistedProtocol) -> IPushProducer:
    """A response body protocol's transport: the backend connection, as a push producer."""
    return cast(IPushProducer, protocol.transport)


def describe(failure: Failure) -> str:
    """A failure in one line, naming each reason of a combined one."""
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(describe(r) for r in reasons)
    text = str(value) or type(value).__name__
    return text.splitlines()[0]


class RelayTarget(Protocol):
    """Where a relay delivers: the exchange that owns the request."""

    request_id: str

    def relaying(self, producer: IPushProducer) -> None:
        """The body begins: the client's connection paces ``producer`` from now on."""

    def body_received(self, data: bytes) -> None: ...

    def body_ended(self, backend: Backend, reason: Failure, streamed: bool) -> None:
        """The body ended, whole or not (``reason`` says which)."""

    def crashed(self, failure: Failure) -> None: ...


class Discard(TwistedProtocol):
    """Drops a response body that is not relayed: read to the end (a 502/503 retried past, so
    the connection can be reused) or closed at once (nobody is left to read it)."""

    def __init__(self, close: bool = False) -> None:
        self.close = close

    def connectionMade(self) -> None:
        if self.close:
            producer_of(self).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass


class Relay(TwistedProtocol):
    """Writes each chunk of a backend's body to its target as it arrives; cuts the body off
    when the backend goes quiet for ``idle`` seconds (0: never)."""

    def __init__(
        self, target: RelayTarget, backend: Backend, idle: float, clock: IReactorTime
    ) -> None:
        self.target = target
        self.backend = backend
        self.idle = idle
        self.clock = clock
        self.timer: IDelayedCall | None = None
        self.done = False
        #: Not whole when the head was relayed: the body came over time (a stream).
        self.streamed = False

    def crash(self, failure: Failure) -> None:
        self.target.crashed(failure)

    @guarded
    def connectionMade(self) -> None:
        self.target.relaying(producer_of(self))

    def watch(self) -> None:
        """The body comes over time: cut it off if the backend goes quiet too long."""
        self.streamed = True
        if self.idle:
            self.timer = self.clock.callLater(self.idle, self._idle_expired)

    @guarded
    def dataReceived(self, data: bytes) -> None:
        if self.timer is not None:
            self.timer.reset(self.idle)
        self.target.body_received(data)

    @guarded
    def _idle_expired(self) -> None:
        self.timer = None
        log.warn(
            "request {rid}: backend {backend} sent nothing for {idle}s; aborting the stream",
            rid=self.target.request_id,
            backend=self.backend.identifier,
            idle=self.idle,
        )
        producer_of(self).stopProducing()

    def client_left(self) -> None:
        """The client went away: close the backend connection so Ollama stops generating."""
        if not self.done and self.transport is not None:
            producer_of(self).stopProducing()

    @guarded
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.target.body_ended(self.backend, reason, self.streamed)
