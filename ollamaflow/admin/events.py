"""``GET /v1.0/events``: the dashboard's live feed, as Server-Sent Events.

One :class:`EventFeed` samples the fleet once a second while anyone listens (never otherwise),
frames each section that changed once, and writes the same bytes to every listener: the cost
is per second, not per request or per listener. A listener whose connection cannot keep up
is skipped (its transport paused it) and, once it drains, sent the whole state again: a slow
dashboard never makes the daemon buffer for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import attrs
import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: Seconds between two samples while anyone listens.
SAMPLE_SECONDS = 1.0
#: A change worth showing at once (health, configuration) is sampled this soon.
SOON_SECONDS = 0.05
#: Seconds of silence after which a comment line keeps proxies from closing the stream.
KEEP_ALIVE_SECONDS = 15.0
#: Listeners at once, at most; each is an open connection the daemon writes to.
MAX_LISTENERS = 500
#: Request lines a listener is sent on connecting (or catching up), at most.
FIRST_REQUESTS = 50
KEEP_ALIVE = b": keep-alive\n\n"


class FeedSource(Protocol):
    """What the feed reads: the sections of the fleet's state, and the finished requests."""

    def hello(self) -> dict[str, Any]: ...

    def sample(self) -> dict[str, Any]: ...

    def requests_after(self, sequence: int, at_most: int) -> tuple[int, list[dict[str, Any]]]: ...


class StreamRequest(Protocol):
    """What the feed needs of a request (a twisted.web one): write to it as bytes can go."""

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def write(self, data: bytes) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


class TooManyListeners(Exception):
    """:data:`MAX_LISTENERS` are listening."""


def frame(event: str, data: Any) -> bytes:
    """One Server-Sent Event; its data is one line of JSON."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps(data))


@implementer(IPushProducer)
@attrs.define(eq=False)
class Listener:
    """One open feed: its request, paused while its connection's buffer is full."""

    request: StreamRequest
    #: Fires with the stream's last bytes when the feed ends it (the daemon stops).
    ended: Deferred[bytes]
    paused: bool = False
    #: Missed frames while paused: sent the whole state when it can take bytes again.
    behind: bool = False
    #: The number of the newest request line it was sent.
    last_request: int = 0

    def write(self, data: bytes) -> None:
        self.request.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


@attrs.define(eq=False)
class EventFeed:
    """The listeners of ``/v1.0/events`` and the sampling that feeds them."""

    clock: IReactorTime
    source: FeedSource
    max_listeners: int = MAX_LISTENERS
    listeners: set[Listener] = attrs.field(factory=set)
    #: The latest frame of each section, as last sent.
    _latest: dict[str, bytes] = attrs.field(factory=dict)
    #: The number of the newest request line sampled.
    _request_mark: int = 0
    #: The number of the newest request line sampled before the latest sample.
    _previous_mark: int = 0
    _last_write: float = 0.0
    _ticker: LoopingCall | None = None
    _soon: IDelayedCall | None = None

    def listen(self, request: StreamRequest) -> Deferred[bytes]:
        """Start streaming to ``request``: everything now, then what changes. The Deferred
        fires when the feed ends the stream; cancelling it (the client left) stops it."""
        if len(self.listeners) >= self.max_listeners:
            raise TooManyListeners(f"{self.max_listeners} dashboards are listening already")
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        # nginx buffers a proxied response unless told not to.
        request.setHeader(b"X-Accel-Buffering", b"no")
        listener = Listener(request, Deferred(lambda _: self._forget(listener)))
        if not self.listeners:
            self._sample()  # nobody listened: what was sampled last is old
        self.listeners.add(listener)
        request.notifyFinish().addBoth(lambda _: self._forget(listener))
        request.registerProducer(listener, True)
        self._catch_up(listener, [frame("hello", self.source.hello())])
        if self._ticker is None:
            self._ticker = LoopingCall(self.tick)
            self._ticker.clock = self.clock
            self._ticker.start(SAMPLE_SECONDS, now=False)
        return listener.ended

    def soon(self) -> None:
        """Something people want to see at once changed (health, configuration)."""
        if self.listeners and self._soon is None:
            self._soon = self.clock.callLater(SOON_SECONDS, self.tick)

    def tick(self) -> None:
        """Sample, and send what changed to every listener that can take it."""
        if self._soon is not None:
            if self._soon.active():
                self._soon.cancel()
            self._soon = None
        if not self.listeners:
            self._stop_ticker()
            return
        try:
            changed = self._sample()
        except Exception:
            log.failure("sampling the live feed failed")
            return
        now = self.clock.seconds()
        quiet = now - self._last_write >= KEEP_ALIVE_SECONDS
        if not changed and not quiet:
            self._send_behind()
            return
        shared = b"".join(changed) or KEEP_ALIVE
        for listener in list(self.listeners):
            if listener.paused:
                listener.behind = True
            elif listener.behind or listener.last_request != self._previous_mark:
                self._catch_up(listener, [])
            else:
                listener.last_request = self._request_mark
                self._write(listener, shared)
        self._last_write = now

    def close(self) -> None:
        """End every stream (the daemon stops)."""
        self._stop_ticker()
        for listener in list(self.listeners):
            self._forget(listener)
            listener.request.unregisterProducer()
            listener.ended.callback(b"")

    # -- inside -------------------------------------------------------------------------------

    def _sample(self) -> list[bytes]:
        """Sample every section; the frames of those that changed (new request lines too)."""
        changed = []
        for name, value in self.source.sample().items():
            framed = frame(name, value)
            if self._latest.get(name) != framed:
                self._latest[name] = framed
                changed.append(framed)
        self._previous_mark = self._request_mark
        mark, lines = self.source.requests_after(self._request_mark, FIRST_REQUESTS)
        self._request_mark = mark
        if lines:
            changed.append(frame("requests", lines))
        return changed

    def _catch_up(self, listener: Listener, first: Iterable[bytes]) -> None:
        """Send ``listener`` every section and the request lines it has not had."""
        _, lines = self.source.requests_after(listener.last_request, FIRST_REQUESTS)
        data = [*first, *self._latest.values()]
        if lines:
            data.append(frame("requests", lines))
        listener.behind = False
        listener.last_request = self._request_mark
        self._write(listener, b"".join(data))

    def _send_behind(self) -> None:
        for listener in list(self.listeners):
            if listener.behind and not listener.paused:
                self._catch_up(listener, [])

    def _write(self, listener: Listener, data: bytes) -> None:
        try:
            listener.write(data)
        except Exception:  # the connection is gone under it
            log.failure("writing the live feed failed", Failure())
            self._forget(listener)

    def _forget(self, listener: Listener) -> None:
        """Stop writing to ``listener`` (its connection is gone, or the feed ends it)."""
        if listener not in self.listeners:
            return
        self.listeners.discard(listener)
        if not self.listeners:
            self._stop_ticker()

    def _stop_ticker(self) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
