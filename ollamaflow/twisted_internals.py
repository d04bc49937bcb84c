"""Every private Twisted API OllamaFlow uses, and nowhere else: checked at start-up.

Each buys something Twisted offers no public way to get (mostly measured speed; see the
callers). If a Twisted release changes one, :func:`self_check` fails loudly at start-up,
naming it, instead of the daemon quietly getting slower or wrong. Where a public API does the
same at no cost, it is used instead, and is not here.

Importing this module never fails because Twisted dropped one of them: a missing class is
looked up when used, so :func:`self_check` (run before anything else at start-up) can name it.
"""

from __future__ import annotations

import importlib
import signal
import socket
import sys
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

from twisted.copyright import version as twisted_version
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.http_headers import Headers

if TYPE_CHECKING:
    from twisted.enterprise.adbapi import Connection as PooledConnection
    from twisted.enterprise.adbapi import ConnectionPool
    from twisted.web.client import HTTPConnectionPool
    from twisted.web.http import Request


def _lookup(path: str) -> Any:
    """The object at the dotted ``path``, or None if this Twisted has no such thing."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# --- Sending at once (ollamaflow/tcp.py) -----------------------------------------------------


def socket_to_send_now(transport: tcp.Connection) -> socket.socket | None:
    """The transport's socket if a write may go straight to it (connected, not half-closed,
    nothing queued before it), else None. Private: ``FileDescriptor.dataBuffer``, ``.offset``,
    ``._tempDataLen``, ``._writeDisconnected`` (Twisted has no public "is the write buffer
    empty" query) and ``Connection.socket`` (public ``getHandle()`` is one more call a write)."""
    if (
        not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport._writeDisconnected
    ):
        return transport.socket
    return None


class TransportConnector(tcp.Connector):
    """``reactor.connectTCP``'s connector, whose transport comes from :meth:`make_transport`.

    Private: the hook ``BaseConnector._makeTransport``; ``connectTCP`` takes no transport class.
    """

    def make_transport(self) -> tcp.Client:
        """The transport for one connection attempt (override to use another class)."""
        return tcp.Client(self.host, self.port, self.bindAddress, self, self.reactor)

    def _makeTransport(self) -> tcp.Client:
        return self.make_transport()


def is_connecting(connector: Any) -> bool:
    """Whether a ``connectTCP`` connector is still connecting (so it can be stopped).
    Private: ``BaseConnector.state``; ``IConnector`` cannot tell (``stopConnecting`` raises)."""
    return bool(connector.state == "connecting")


def is_disconnected(connector: Any) -> bool:
    """Whether a ``connectTCP`` connector is neither connected nor connecting again (a factory
    may reconnect from ``clientConnectionLost``). Private: ``BaseConnector.state``."""
    return bool(connector.state == "disconnected")


# --- Client errors (ollamaflow/services/common.py) --------------------------------------------

#: The public ``twisted.web.client`` errors that wrap the reasons of a failed request: every
#: subclass of the private ``twisted.web._newclient._WrapperException`` (checked at start-up).
CLIENT_FAILURES: tuple[type[Exception], ...] = (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)


class _Gone(Exception):
    """Stands in for a private exception class this Twisted lacks (:func:`self_check` says so)."""


#: What a request on a pooled connection that closed before it was sent fails with (when the
#: pool cannot retry it). Private: ``twisted.web._newclient.RequestNotSent``; not exported.
REQUEST_NOT_SENT: type[Exception] = _lookup("twisted.web._newclient.RequestNotSent") or _Gone


# --- Connection pools (ollamaflow/pool.py) ----------------------------------------------------


@cache
def _quiet_client_factory() -> Any:
    base = _lookup("twisted.web.client._HTTP11ClientFactory")
    if base is None:
        raise AttributeError("twisted.web.client._HTTP11ClientFactory is gone")
    return type("QuietHTTP11ClientFactory", (base,), {"noisy": False})


def quiet_connection_pool(pool: HTTPConnectionPool) -> HTTPConnectionPool:
    """``pool``, logging no "Starting factory" line per new connection. Private:
    ``HTTPConnectionPool._factory`` and ``_HTTP11ClientFactory``; there is no public switch."""
    pool._factory = _quiet_client_factory()
    return pool


# --- twisted.web requests (ollamaflow/frontdoor.py, ollamaflow/server/web.py) -----------------


def request_disconnected(request: Request) -> bool:
    """Whether a twisted.web request's connection is gone (so nothing can be written).
    Private: ``Request._disconnected``; ``notifyFinish`` only tells asynchronously."""
    return bool(request._disconnected)


#: The method twisted.web's ``Request`` calls on its channel to answer 400 and disconnect;
#: a channel of our own must have it. Private: ``HTTPChannel._respondToBadRequestAndDisconnect``.
BAD_REQUEST_HOOK = "_respondToBadRequestAndDisconnect"


# --- Database connections (ollamaflow/store/store.py) -----------------------------------------


def dbapi_connection(connection: PooledConnection) -> Any:
    """The DB-API connection inside adbapi's pooled ``Connection``. Private:
    ``adbapi.Connection._connection``; attribute access delegates but gives no handle."""
    return connection._connection


def owning_pool(connection: PooledConnection) -> ConnectionPool:
    """The ``ConnectionPool`` an adbapi ``Connection`` belongs to (to drop a dead one).
    Private: ``adbapi.Connection._pool``."""
    pool: ConnectionPool = connection._pool
    return pool


# --- The exit status (ollamaflow/daemon.py) ---------------------------------------------------


def forget_exit_signal(reactor: Any, signum: int) -> bool:
    """If ``signum`` is the signal that stopped ``reactor``, forget it, so that twistd exits 0
    instead of re-raising it once the reactor stops; whether it was. Private:
    ``ReactorBase._exitSignal``, which the reactor's SIGINT/SIGTERM handlers set and twistd's
    runner re-raises after ``run()`` returns; Twisted has no public way to choose the status."""
    if getattr(reactor, "_exitSignal", None) != signum:
        return False
    reactor._exitSignal = None
    return True


# --- Response headers (ollamaflow/upstream/response.py) ---------------------------------------

#: Header names seen, with the form ``Headers`` keeps them in: at most this many, this long.
_MAX_NAMES = 1000
_MAX_NAME = 64
_CANONICAL: dict[bytes, bytes] = {}


def _canonical(name: bytes) -> bytes:
    """The name as ``Headers`` stores it (its public API computes it; remembered when short)."""
    found = _CANONICAL.get(name)
    if found is not None:
        return found
    probe = Headers()
    probe.addRawHeader(name, b"")
    found = next(iter(probe.getAllRawHeaders()))[0]
    if len(_CANONICAL) < _MAX_NAMES and len(name) <= _MAX_NAME:
        _CANONICAL[name] = found
    return found


def headers_of(fields: list[tuple[bytes, bytes]]) -> Headers:
    """A ``Headers`` holding ``fields`` (name, value) in order, whose values llhttp has checked
    already (no CR, LF or NUL). Private: ``Headers._rawHeaders``; the public ``addRawHeader``
    checks and copies each value again, 0.7 us a field, on every proxied response."""
    raw: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        key = _canonical(name)
        values = raw.get(key)
        if values is None:
            raw[key] = [value]
        else:
            values.append(value)
    headers = Headers()
    headers._rawHeaders = raw
    return headers


# --- The start-up self-check ------------------------------------------------------------------


class TwistedChanged(RuntimeError):
    """The installed Twisted lacks, or changed the meaning of, a private API we rely on."""


class _Changed(Exception):
    """One private API found gone or different: which, and how."""

    def __init__(self, api: str, problem: str) -> None:
        super().__init__(f"{api}: {problem}")
        self.api = api
        self.problem = problem


def _expect(condition: object, api: str, problem: str) -> None:
    if not condition:
        raise _Changed(api, problem)


def _present(obj: object, owner: str, *names: str) -> None:
    for name in names:
        _expect(hasattr(obj, name), f"{owner}.{name}", "is gone")


def _check_write_queue() -> None:
    """A real TCP-style transport on a socket pair: queued, sent and half-closed states."""
    from twisted.internet.testing import MemoryReactorClock

    owner = "twisted.internet.abstract.FileDescriptor"
    sockets: list[socket.socket] = []
    try:

        def transport() -> tcp.Connection:
            ours, peer = socket.socketpair()
            sockets.extend((ours, peer))
            peer.settimeout(1.0)
            made = tcp.Connection(ours, Protocol(), MemoryReactorClock())
            made.connected = 1  # as tcp.Server and tcp.Client set once connected
            return made

        t = transport()
        peer = sockets[1]
        _present(t, owner, "dataBuffer", "offset", "_tempDataLen", "_writeDisconnected")
        _present(t, "twisted.internet.tcp.Connection", "socket")
        _expect(socket_to_send_now(t), owner, "a new connection looks as if it had data queued")
        _expect(
            socket_to_send_now(t) is t.getHandle(),
            "twisted.internet.tcp.Connection.socket",
            "is not the connection's socket (getHandle())",
        )
        t.write(b"queued")
        _expect(
            socket_to_send_now(t) is None, f"{owner}._tempDataLen", "a queued write is not counted"
        )
        t.doWrite()
        _expect(peer.recv(64) == b"queued", owner, "doWrite did not send the queued data")
        _expect(socket_to_send_now(t), owner, "data looks queued after all of it was sent")
        t.write(b"x" * (1 << 20))  # more than one send takes: the rest stays in dataBuffer
        t.doWrite()
        _expect(
            socket_to_send_now(t) is None,
            f"{owner}.dataBuffer/offset",
            "a partly sent write does not look queued",
        )
        half = transport()
        half.loseWriteConnection()
        half.doWrite()  # nothing queued: the write side is shut down now
        _expect(sockets[3].recv(64) == b"", owner, "loseWriteConnection did not half-close")
        _expect(
            socket_to_send_now(half) is None,
            f"{owner}._writeDisconnected",
            "a half-closed connection looks writable",
        )
    finally:
        for s in sockets:
            s.close()


def _check_connector() -> None:
    """A real ``tcp.Connector`` (with a stand-in transport): the hook and the states."""
    from twisted.internet.testing import MemoryReactorClock

    owner = "twisted.internet.base.BaseConnector"
    made: list[object] = []

    class Attempt:
        def __init__(self, connector: tcp.Connector) -> None:
            self.connector = connector

        def failIfNotConnected(self, error: Exception) -> None:
            self.connector.connectionFailed(Failure(error))

    class Probe(TransportConnector):
        def make_transport(self) -> Any:
            made.append(Attempt(self))
            return made[-1]

    factory = ClientFactory.forProtocol(Protocol)
    factory.noisy = False
    connector = Probe("127.0.0.1", 1, factory, None, None, MemoryReactorClock())  # type: ignore[arg-type]
    _present(connector, owner, "state")
    _expect(is_disconnected(connector), f"{owner}.state", "a new connector is not 'disconnected'")
    connector.connect()
    _expect(made, f"{owner}._makeTransport", "connect() no longer calls it")
    _expect(connector.transport is made[-1], f"{owner}._makeTransport", "its result is not used")
    _expect(is_connecting(connector), f"{owner}.state", "connect() does not make it 'connecting'")
    connector.stopConnecting()
    _expect(is_disconnected(connector), f"{owner}.state", "stopConnecting leaves it connecting")
    connector.connect()
    connector.buildProtocol(None)  # type: ignore[arg-type]
    _expect(
        not is_connecting(connector) and not is_disconnected(connector),
        f"{owner}.state",
        "a connected connector looks connecting or disconnected",
    )
    connector.connectionLost(Failure(ConnectionDone()))
    _expect(is_disconnected(connector), f"{owner}.state", "a lost connection is not 'disconnected'")
    connector.connect()
    connector.connectionFailed(Failure(ConnectionRefusedError()))
    _expect(is_disconnected(connector), f"{owner}.state", "a failed attempt is not 'disconnected'")


def _check_client_errors() -> None:
    """What a request on a closed client connection fails with, and the wrapper errors."""
    from twisted.internet.testing import StringTransport
    from twisted.web._newclient import HTTP11ClientProtocol, Request

    api = "twisted.web._newclient.RequestNotSent"
    _expect(REQUEST_NOT_SENT is not _Gone, api, "is gone")
    protocol = HTTP11ClientProtocol()
    protocol.makeConnection(StringTransport())
    protocol.connectionLost(Failure(ConnectionDone()))
    failed: list[Failure] = []
    protocol.request(Request(b"GET", b"/", Headers(), None)).addErrback(failed.append)
    _expect(
        failed and failed[0].check(REQUEST_NOT_SENT),
        api,
        "a request on a closed connection fails with something else: "
        + (repr(failed[0].value) if failed else "it did not fail"),
    )
    wrapper = _lookup("twisted.web._newclient._WrapperException")
    if wrapper is not None:
        uncovered = [
            f"{k.__module__}.{k.__qualname__}"
            for k in _subclasses(wrapper)
            if not issubclass(k, CLIENT_FAILURES)
        ]
        _expect(
            not uncovered,
            "twisted.web._newclient._WrapperException",
            f"new subclasses not in CLIENT_FAILURES: {', '.join(uncovered)}",
        )


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _check_pool_factory() -> None:
    """A pool made quiet builds its connections with the quiet factory."""
    from twisted.internet.defer import Deferred
    from twisted.internet.testing import MemoryReactorClock
    from twisted.web.client import HTTPConnectionPool

    _present(HTTPConnectionPool, "twisted.web.client.HTTPConnectionPool", "_factory")
    try:
        quiet = _quiet_client_factory()
    except AttributeError:
        raise _Changed("twisted.web.client._HTTP11ClientFactory", "is gone") from None
    factories: list[object] = []

    class Endpoint:
        def connect(self, factory: object) -> Deferred[Any]:
            factories.append(factory)
            return Deferred()

    pool = quiet_connection_pool(HTTPConnectionPool(MemoryReactorClock()))
    pool.getConnection("check", Endpoint())  # type: ignore[arg-type]
    _expect(
        len(factories) == 1 and isinstance(factories[0], quiet) and not quiet.noisy,
        "twisted.web.client.HTTPConnectionPool._factory",
        "new connections no longer come from it",
    )


def _check_request() -> None:
    """A twisted.web request whose connection was lost says so."""
    from twisted.internet.address import IPv4Address
    from twisted.web.http import Request as WebRequest

    class Channel:
        transport = None

        def getPeer(self) -> IPv4Address:
            return IPv4Address("TCP", "127.0.0.1", 1)

        getHost = getPeer

    api = "twisted.web.http.Request._disconnected"
    request = WebRequest(Channel())  # type: ignore[arg-type]
    _present(request, "twisted.web.http.Request", "_disconnected")
    _expect(not request_disconnected(request), api, "a new request looks disconnected")
    request.connectionLost(Failure(ConnectionDone()))
    _expect(request_disconnected(request), api, "a lost connection does not set it")


def _check_bad_request_hook() -> None:
    """Twisted's own channel still has the method its Request calls on a bad request."""
    from twisted.web.http import HTTPChannel

    _present(HTTPChannel, "twisted.web.http.HTTPChannel", BAD_REQUEST_HOOK)


def _check_pooled_connection() -> None:
    """adbapi's pooled connection keeps its DB-API connection and pool where we look."""
    from twisted.enterprise.adbapi import Connection as Pooled

    connection = object()

    class Pool:
        def connect(self) -> object:
            return connection

    pool = Pool()
    pooled = Pooled(pool)
    owner = "twisted.enterprise.adbapi.Connection"
    for name in ("_connection", "_pool"):  # not hasattr: __getattr__ delegates to _connection
        _expect(name in vars(pooled), f"{owner}.{name}", "is gone")
    _expect(dbapi_connection(pooled) is connection, f"{owner}._connection", "holds something else")
    _expect(owning_pool(pooled) is pool, f"{owner}._pool", "holds something else")


def _check_exit_signal() -> None:
    """The reactor's SIGTERM handler keeps the signal in ``_exitSignal``, and twistd's runner
    re-raises what a real reactor core holds there when ``run()`` returns: nothing once
    :func:`forget_exit_signal` cleared it. (The handler is read, not called: it would log
    "Received SIGTERM" at start-up; the twistd tests send it the real signal.)"""
    from twisted.application.app import ApplicationRunner
    from twisted.internet.base import ReactorBase

    owner = "twisted.internet.base.ReactorBase"
    api = f"{owner}._exitSignal"
    _present(ReactorBase, owner, "_exitSignal", "sigTerm")
    _expect(
        "_exitSignal" in ReactorBase.sigTerm.__code__.co_names,
        f"{owner}.sigTerm",
        "no longer sets _exitSignal",
    )

    class Core(ReactorBase):
        """A reactor core that, run, is at once stopped by SIGTERM, as ``sigTerm`` leaves it."""

        forget = False

        def installWaker(self) -> None:
            """No I/O: nothing to wake."""

        def run(self, installSignalHandlers: bool = True) -> None:
            self._exitSignal = signal.SIGTERM
            if self.forget:  # as the daemon does while the reactor shuts down
                forget_exit_signal(self, signal.SIGTERM)

    class Runner:
        """What ``ApplicationRunner.startReactor`` uses of twistd's runner."""

        config = {"profile": False, "debug": False, "nodaemon": True}
        profiler = None
        _exitSignal: object = "never set"

    def reraised(forget: bool) -> object:
        core = Core()
        core.forget = forget
        runner = Runner()
        ApplicationRunner.startReactor(runner, core, sys.stdout, sys.stderr)  # type: ignore[arg-type]
        return runner._exitSignal

    _expect(reraised(False) == signal.SIGTERM, api, "twistd no longer re-raises what it holds")
    _expect(reraised(True) is None, api, "twistd re-raises the signal even once it is cleared")


def _check_headers() -> None:
    """Headers built through ``_rawHeaders`` read back exactly as built through the public API."""
    fields = [
        (b"content-type", b"application/json"),
        (b"X-Many", b"1"),
        (b"x-many", b"2"),
        (b"WWW-Authenticate", b"Bearer"),
    ]
    public = Headers()
    for name, value in fields:
        public.addRawHeader(name, value)
    ours = headers_of(fields)
    api = "twisted.web.http_headers.Headers._rawHeaders"
    _expect(
        list(ours.getAllRawHeaders()) == list(public.getAllRawHeaders()),
        api,
        "no longer holds the fields as getAllRawHeaders gives them",
    )
    _expect(
        ours.getRawHeaders(b"X-MANY") == [b"1", b"2"] and ours.hasHeader(b"content-type"),
        api,
        "lookups no longer find what it holds",
    )


class _Check(NamedTuple):
    apis: str
    what: str
    run: Callable[[], None]


_FD = "twisted.internet.abstract.FileDescriptor"

#: Every check :func:`self_check` runs: the private APIs, what depends on them, the check.
CHECKS: tuple[_Check, ...] = (
    _Check(
        f"{_FD}.dataBuffer/offset/_tempDataLen/_writeDisconnected, tcp.Connection.socket",
        "ollamaflow.tcp, sending at once",
        _check_write_queue,
    ),
    _Check(
        "twisted.internet.base.BaseConnector._makeTransport/state",
        "ollamaflow.tcp and the gateway, connecting to backends",
        _check_connector,
    ),
    _Check(
        "twisted.web._newclient.RequestNotSent/_WrapperException",
        "ollamaflow.services, telling network errors from bugs",
        _check_client_errors,
    ),
    _Check(
        "twisted.web.client.HTTPConnectionPool._factory/_HTTP11ClientFactory",
        "ollamaflow.pool, quiet backend connections",
        _check_pool_factory,
    ),
    _Check(
        "twisted.web.http.Request._disconnected",
        "the admin API, requests whose client left",
        _check_request,
    ),
    _Check(
        f"twisted.web.http.HTTPChannel.{BAD_REQUEST_HOOK}",
        "ollamaflow.server, twisted.web requests over our own connections",
        _check_bad_request_hook,
    ),
    _Check(
        "twisted.web.http_headers.Headers._rawHeaders",
        "the gateway, the header fields of every backend response",
        _check_headers,
    ),
    _Check(
        "twisted.enterprise.adbapi.Connection._connection/_pool",
        "ollamaflow.store, dropping dead database connections",
        _check_pooled_connection,
    ),
    _Check(
        "twisted.internet.base.ReactorBase._exitSignal/sigTerm",
        "ollamaflow.daemon, exit status 0 after a clean drain on SIGTERM",
        _check_exit_signal,
    ),
)


def self_check() -> None:
    """Raise :class:`TwistedChanged`, naming every private API and the Twisted version, if
    this Twisted no longer has or means what OllamaFlow relies on. Takes a few milliseconds."""
    problems: list[str] = []
    for check in CHECKS:
        try:
            check.run()
        except _Changed as e:
            problems.append(f"{e.api} ({check.what}): {e.problem}")
        except Exception as e:  # anything else going wrong is a change too
            line = str(e).splitlines()[0] if str(e) else ""
            detail = f"{type(e).__name__}: {line}" if line else type(e).__name__
            problems.append(f"{check.apis} ({check.what}): {detail}")
    if problems:
        raise TwistedChanged(
            f"Twisted {twisted_version} changed private APIs OllamaFlow relies on: "
            + "; ".join(problems)
            + ". Install a Twisted release in setup.cfg's range, or update "
            "ollamaflow/twisted_internals.py"
        )
