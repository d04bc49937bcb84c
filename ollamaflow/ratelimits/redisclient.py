"""A small Redis client on Twisted: RESP commands out, replies parsed by hiredis's ``Reader``.

Written for the shared rate limits, where Redis must never hold a request up: every call has
a deadline, a call made while there is no ready connection fails at once (it never waits for
one, nor starts one), and a lost connection is made again in the background, ever less often
while it keeps failing. A call that misses its deadline drops the connection, as redis-py
does: replies still owed on it would otherwise be matched to later calls, and a server that
slow is better treated as down than waited on by every request.

txredisapi is not used: it imports the global reactor when imported (which defeats twistd's
choice of reactor) and has no type hints.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import hiredis
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

#: Seconds a call may take, by default.
CALL_TIMEOUT = 0.25
#: Seconds connecting (TCP, then AUTH, SELECT and SCRIPT LOAD) may take, by default.
CONNECT_TIMEOUT = 2.0
#: Seconds before the first reconnection, doubled at each failure up to the second value.
BACKOFF = (0.2, 5.0)

Arg = bytes | str | int


class RedisError(Exception):
    """Redis answered with an error reply (its message is the exception's)."""


class RedisUnavailable(Exception):
    """No answer: no connection is ready, it was lost, or the call timed out."""


def one_line(error: BaseException | Failure, limit: int = 200) -> str:
    """An error's message on one line, cut to ``limit`` characters."""
    value = error.value if isinstance(error, Failure) else error
    text = " ".join(str(value).split()) or type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@attrs.frozen
class RedisAddress:
    """Where Redis is and how to log in: ``redis://[user:password@]host[:port][/db]``."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """Parse a ``redis://`` URL (user and password percent-decoded); ValueError if bad."""
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"a Redis URL starts with redis://, not {parts.scheme or url!r}")
        if parts.query or parts.fragment:
            raise ValueError("a Redis URL has no query nor fragment")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"a Redis URL's path is a database number, not {path!r}")
        port = parts.port  # ValueError for a bad one
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=6379 if port is None else port,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def describe(self) -> str:
        """The URL for messages: never the password."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{user}{host}:{self.port}/{self.db}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        """A TCP endpoint to the server (a name is resolved at each connection)."""
        if isIPAddress(self.host):
            return TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        if isIPv6Address(self.host):
            return TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


def encode(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


#: What ``Reader.gets`` gives while a reply is incomplete (``False`` could be a RESP3 reply).
_INCOMPLETE = object()


class RedisProtocol(Protocol):
    """One connection: commands written at once (pipelined), replies matched in order."""

    def __init__(self, on_lost: Callable[[RedisProtocol, Failure], None] | None = None) -> None:
        self._reader = hiredis.Reader(replyError=RedisError, notEnoughData=_INCOMPLETE)
        self._waiting: deque[Deferred[Any]] = deque()
        self._on_lost = on_lost
        self._open = True
        #: Fires once the connection is closed.
        self.lost: Deferred[None] = Deferred()

    def call(self, args: Sequence[Arg]) -> Deferred[Any]:
        """Send one command; the Deferred fires with its reply (a ``RedisError`` for an error
        reply; ``RedisUnavailable`` if the connection closes first)."""
        if not self._open or self.transport is None:
            return defer.fail(RedisUnavailable("the connection is closed"))
        waiter: Deferred[Any] = Deferred()
        self._waiting.append(waiter)
        self.transport.write(encode(args))
        return waiter

    def dataReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as e:
                self._broken(f"unreadable reply from Redis: {one_line(e)}")
                return
            if reply is _INCOMPLETE:
                return
            if not self._waiting:
                self._broken("a reply from Redis that no command asked for")
                return
            waiter = self._waiting.popleft()
            if waiter.called:  # timed out already
                continue
            if isinstance(reply, RedisError):
                waiter.errback(reply)
            else:
                waiter.callback(reply)

    def abort(self) -> None:
        """Drop the connection now, without flushing what is queued."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close the connection once what is queued is sent."""
        if self.transport is not None:
            self.transport.loseConnection()

    def _broken(self, why: str) -> None:
        self._fail_waiting(RedisUnavailable(why))
        self.abort()

    def _fail_waiting(self, error: Exception) -> None:
        self._open = False
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            if not waiter.called:
                waiter.errback(error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._fail_waiting(RedisUnavailable(f"connection lost: {one_line(reason)}"))
        if self._on_lost is not None:
            self._on_lost(self, reason)
        self.lost.callback(None)


class _Connecting(Factory):
    """Builds connections that tell ``on_lost`` when they close."""

    noisy = False

    def __init__(self, on_lost: Callable[[RedisProtocol, Failure], None]) -> None:
        self._on_lost = on_lost

    def buildProtocol(self, addr: Any) -> RedisProtocol:
        return RedisProtocol(self._on_lost)


@attrs.frozen
class Script:
    """A Lua script, run by its SHA1 once loaded."""

    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


def _no_answer(result: Any, timeout: float) -> Any:
    raise RedisUnavailable(f"no answer within {timeout:g} s")


#: Told when a connection is ready (logged in, scripts loaded).
UpCallback = Callable[[], None]
#: Told, with a one-line reason, when connecting failed or a ready connection was lost.
DownCallback = Callable[[str], None]


class RedisClient:
    """One connection to Redis, made again when lost; :meth:`call` and :meth:`run` fail at
    once while it is not ready, and after ``timeout`` seconds when Redis does not answer.

    ``endpoint`` replaces the TCP connection (tests connect in memory). ``scripts`` are loaded
    (SCRIPT LOAD) on every new connection; :meth:`run` falls back to EVAL if Redis forgot one.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        address: RedisAddress,
        *,
        endpoint: IStreamClientEndpoint | None = None,
        timeout: float = CALL_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        backoff: tuple[float, float] = BACKOFF,
        scripts: Sequence[Script] = (),
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._reactor = reactor
        self._endpoint = endpoint or address.endpoint(reactor, connect_timeout)
        self._connect_timeout = connect_timeout
        self._backoff = backoff
        self._delay = backoff[0]
        self._scripts = tuple(scripts)
        self._watchers: list[tuple[UpCallback, DownCallback]] = []
        self._running = False
        self._ready: RedisProtocol | None = None
        self._live: set[RedisProtocol] = set()
        self._attempt: Deferred[None] | None = None
        self._retry: IDelayedCall | None = None
        self._why_down = "not connected yet"

    # -- lifecycle ------------------------------------------------------------------------------

    def watch(self, up: UpCallback, down: DownCallback) -> None:
        """Be told when a connection is ready and when connecting fails or one is lost."""
        self._watchers.append((up, down))

    def start(self) -> None:
        """Connect, and keep connected until :meth:`close`."""
        if not self._running:
            self._running = True
            self._connect()

    def close(self) -> Deferred[None]:
        """Stop connecting and close the connection; fires once it is closed."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        self._ready = None
        closing = [proto.lost for proto in self._live]
        for proto in list(self._live):
            proto.close()
        return defer.gatherResults(closing).addCallback(lambda _: None)

    @property
    def ready(self) -> bool:
        """Whether a call would be sent now (rather than fail at once)."""
        return self._ready is not None

    # -- calls ----------------------------------------------------------------------------------

    def call(self, *args: Arg) -> Deferred[Any]:
        """Send one command; fails with ``RedisError`` (an error reply) or ``RedisUnavailable``
        (no ready connection, connection lost, or no answer within ``timeout``)."""
        proto = self._ready
        if proto is None:
            return defer.fail(RedisUnavailable(self._why_down))
        answer = proto.call(args)
        answer.addTimeout(self.timeout, self._reactor, onTimeoutCancel=self._timed_out(proto))
        return answer

    def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Deferred[Any]:
        """Run ``script`` by its SHA1 (EVALSHA), sending its source (EVAL) if Redis lacks it."""
        ran = self.call("EVALSHA", script.sha, len(keys), *keys, *args)

        def unknown(failure: Failure) -> Deferred[Any] | Failure:
            if failure.check(RedisError) and str(failure.value).startswith("NOSCRIPT"):
                return self.call("EVAL", script.source, len(keys), *keys, *args)
            return failure

        return ran.addErrback(unknown)

    def _timed_out(self, proto: RedisProtocol) -> Callable[[Any, float], Any]:
        def timed_out(result: Any, timeout: float) -> Any:
            if proto is self._ready:
                # Down at once: no later call goes to this connection, closed or not yet.
                self._ready = None
                proto.abort()
                if self._running:
                    self._down(f"no answer within {timeout:g} s")
            return _no_answer(result, timeout)

        return timed_out

    # -- connecting -----------------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        connecting: Deferred[Any] = self._endpoint.connect(_Connecting(self._lost))
        attempt: Deferred[Any] = connecting.addCallback(self._log_in)
        self._attempt = attempt
        attempt.addCallbacks(self._up, self._failed)

    def _log_in(self, proto: RedisProtocol) -> Deferred[RedisProtocol]:
        """AUTH, SELECT and SCRIPT LOAD, pipelined; the connection once all succeeded."""
        self._live.add(proto)
        address = self.address
        commands: list[tuple[Arg, ...]] = []
        if address.password is not None:
            user = (address.username,) if address.username else ()
            commands.append(("AUTH", *user, address.password))
        if address.db:
            commands.append(("SELECT", address.db))
        commands.extend(("SCRIPT", "LOAD", script.source) for script in self._scripts)
        replies = [proto.call(command) for command in commands]
        done: Deferred[Any] = defer.gatherResults(replies, consumeErrors=True)
        done.addTimeout(self._connect_timeout, self._reactor, onTimeoutCancel=_no_answer)

        def given_up(failure: Failure) -> Failure:
            proto.abort()
            first = failure.value
            return first.subFailure if isinstance(first, defer.FirstError) else failure

        return done.addCallbacks(lambda _: proto, given_up)

    def _up(self, proto: RedisProtocol) -> None:
        self._attempt = None
        if not self._running:
            return  # closed meanwhile: close() closes the connection
        if proto not in self._live:
            self._down("connection lost while logging in")
            return
        self._ready = proto
        self._delay = self._backoff[0]
        for up, _ in self._watchers:
            up()

    def _failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._running:
            self._down(f"cannot connect: {one_line(failure)}")

    def _lost(self, proto: RedisProtocol, reason: Failure) -> None:
        self._live.discard(proto)
        if proto is not self._ready:
            return
        self._ready = None
        if self._running:
            self._down(f"connection lost: {one_line(reason)}")

    def _down(self, why: str) -> None:
        """Connect again later, each time later while it fails, and tell the watchers."""
        self._why_down = why
        self._retry = self._reactor.callLater(self._delay, self._connect)
        self._delay = min(self._delay * 2, self._backoff[1])
        for _, down in self._watchers:
            down(why)
