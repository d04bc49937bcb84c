"""PostgreSQL's extras: connection strings from the settings, and LISTEN read by the reactor.

psycopg is imported only here and only when used, so SQLite-only installs never need it.

A subscription's connection is opened in a thread (connecting blocks: DNS, TCP, TLS, auth), then
handed to the reactor, which watches its socket as an ``IReadDescriptor`` and drains it with
libpq's non-blocking calls (``PQconsumeInput``, ``PQnotifies``). We chose this over a thread
parked in ``Connection.notifies()``: nothing blocks, nothing has to be woken at shutdown
(stopping is ``removeReader`` and ``close``), and a server that goes away makes the socket
readable, so the loss is noticed at once rather than at a thread's next timeout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorFromThreads,
    IReadDescriptor,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ollamaflow.store.errors import (
    DriverMissing,
    InvalidConnectionSettings,
    StoreUnavailable,
    one_line,
)
from ollamaflow.store.sql import SqlDialect

#: Called with the generation a committed write announced (``None`` if the payload is not one).
ChangeHandler = Callable[[int | None], None]
#: Called once, with a one-line reason, when a subscription's connection breaks.
LostHandler = Callable[[str], None]

#: Added to every connection string unless it sets them: fail fast when the server is not there,
#: notice a silently dead peer (keepalives, unacknowledged data) within about half a minute, and
#: name ourselves in ``pg_stat_activity``.
CONNECTION_DEFAULTS: Mapping[str, str] = {
    "connect_timeout": "5",
    "application_name": "ollamaflow",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}

log = Logger()


def driver_missing() -> DriverMissing:
    return DriverMissing("PostgreSQL", "psycopg[binary]", "postgresql")


def postgresql_conninfo(url: str | None = None, **params: object) -> str:
    """A libpq connection string from a ``postgresql://`` URL and/or fields (``host``, ``port``,
    ``dbname``, ``user``, ``password``...; ``None`` values are left out), fields winning, with
    :data:`CONNECTION_DEFAULTS` for what neither sets."""
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
    except ImportError as e:
        raise driver_missing() from e
    given = {k: v for k, v in params.items() if v is not None}
    try:
        merged = conninfo_to_dict(url or "", **cast(Any, given))
        for key, value in CONNECTION_DEFAULTS.items():
            merged.setdefault(key, value)
        return make_conninfo("", **merged)
    except ProgrammingError as e:
        raise InvalidConnectionSettings(one_line(e)) from e


def describe_postgresql(conninfo: str) -> str:
    """``postgresql://user@host:port/dbname`` for messages: never the password."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(conninfo)
    except Exception:
        return "postgresql database"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = str(parts.get("host") or "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"


@implementer(IReadDescriptor)
@attrs.define(eq=False)
class Subscription:
    """One LISTENing connection, read by the reactor; :meth:`close` to stop listening."""

    _connection: Any
    _reactor: IReactorFDSet
    _on_change: ChangeHandler
    _on_lost: LostHandler
    #: Our own duplicate of the connection's socket: libpq closes its descriptor when it sees
    #: the server hang up, and the reactor must never watch a descriptor someone else closed
    #: (or that a new connection in another thread was just given).
    _fd: int
    channel: str
    _open: bool = True

    @property
    def open(self) -> bool:
        return self._open

    def start(self) -> None:
        self._reactor.addReader(self)
        # Notifications that arrived while the connection was being handed over are already
        # buffered by libpq; drain them now rather than at the next packet.
        self._drain()

    def close(self) -> None:
        """Stop listening; ``on_lost`` is not called."""
        if self._open:
            self._finish()

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "ConfigListener"

    def doRead(self) -> None:
        """The socket is readable: take in what arrived and hand out every notification."""
        pgconn = self._connection.pgconn
        try:
            pgconn.consume_input()
        except Exception as e:
            self._lost(one_line(e))
            return
        self._drain()
        if self._open and self._connection.closed:
            self._lost("the server closed the connection")

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw the socket hang up (or a bug in :meth:`doRead`)."""
        self._lost(one_line(reason.value) if reason.value is not None else "connection lost")

    def _lost(self, reason: str) -> None:
        if not self._open:
            return
        self._finish()
        self._on_lost(reason)

    def _drain(self) -> None:
        pgconn = self._connection.pgconn
        while self._open:
            notify = pgconn.notifies()
            if notify is None:
                return
            try:
                generation: int | None = int(notify.extra.decode())
            except (UnicodeDecodeError, ValueError):
                generation = None
            try:
                self._on_change(generation)
            except Exception:
                log.failure("configuration change handler failed")

    def _finish(self) -> None:
        self._open = False
        self._reactor.removeReader(self)
        os.close(self._fd)
        with contextlib.suppress(Exception):
            self._connection.close()


def _connect_listening(dialect: SqlDialect, conninfo: str) -> Any:
    """In a thread: a new autocommit connection that LISTENs on the dialect's channel."""
    try:
        connection = dialect.connect(conninfo)
    except ImportError as e:
        raise driver_missing() from e
    try:
        # The channel is our own constant identifier, never user input.
        connection.execute(f"LISTEN {dialect.notify_channel}")
    except BaseException:
        connection.close()
        raise
    return connection


async def subscribe(
    dialect: SqlDialect,
    conninfo: str,
    reactor: IReactorCore,
    *,
    on_change: ChangeHandler,
    on_lost: LostHandler,
) -> Subscription:
    """Connect (in a thread), LISTEN, and let the reactor read the connection from then on.

    Raises :class:`StoreUnavailable` when the database cannot be reached.
    """
    threads: Any = reactor
    try:
        connection = await deferToThreadPool(
            cast(IReactorFromThreads, reactor),
            threads.getThreadPool(),
            _connect_listening,
            dialect,
            conninfo,
        )
    except Exception as e:
        if dialect.is_unavailable_error(e):
            raise StoreUnavailable(one_line(e)) from e
        raise
    try:
        fd = os.dup(connection.pgconn.socket)
    except BaseException:
        connection.close()
        raise
    subscription = Subscription(
        connection, cast(IReactorFDSet, reactor), on_change, on_lost, fd, dialect.notify_channel
    )
    subscription.start()
    return subscription
