"""The configuration store: frontends, backends and API keys (and the keys' usage) in a SQL
database, behind adbapi.

Every write is one transaction that begins with the dialect's write lock, bumps the
configuration generation and announces it (PostgreSQL: NOTIFY, delivered on commit only), so a
failed write leaves nothing behind and readers can tell which snapshot is newer (usage is not
configuration: adding to it bumps and announces nothing). All database
work runs in the pool's threads, never on the reactor thread. A database that cannot be reached
or a connection that broke is reported as :class:`StoreUnavailable`; the pool reconnects by
itself on the next call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import attrs
from twisted.enterprise import adbapi
from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool

from ollamaflow.records import ApiKey, Backend, Frontend, UsageRow
from ollamaflow.store.errors import (
    DatabaseRefused,
    StoreClosed,
    StoreUnavailable,
    one_line,
)
from ollamaflow.store.postgresql import (
    ChangeHandler,
    LostHandler,
    Subscription,
    driver_missing,
    subscribe,
)
from ollamaflow.store.rows import (
    Snapshot,
    add_usage,
    check_api_key,
    check_loadable,
    check_secret,
    create_api_key,
    create_backend,
    create_frontend,
    delete_api_key,
    delete_backend,
    delete_frontend,
    in_write_transaction,
    open_database,
    read_generation,
    read_snapshot,
    read_usage,
    replace_api_key,
    replace_backend,
    replace_frontend,
    rotate_api_key,
    usage_batch,
)
from ollamaflow.store.sql import POSTGRESQL, SQLITE, Cursor, SqlDialect
from ollamaflow.twisted_internals import dbapi_connection, owning_pool

T = TypeVar("T")

#: Connections in a PostgreSQL store's pool (each in its own thread) unless told otherwise.
DEFAULT_POOL_SIZE = 4


@attrs.define
class Store:
    """Frontends and backends in a database; open with :meth:`open_sqlite` or
    :meth:`open_postgresql` (or their ``prepare_`` forms before the reactor runs), then
    :meth:`close`."""

    _pool: ConnectionPool
    _dialect: SqlDialect
    _reactor: IReactorCore
    _now: Callable[[], datetime]
    #: What the driver's ``connect`` takes, for a dedicated LISTEN connection (PostgreSQL).
    _conninfo: str | None = None
    _pending: set[Deferred[Any]] = attrs.field(factory=set)
    _closed: bool = False

    @classmethod
    def prepare_sqlite(
        cls, path: str, *, reactor: IReactorCore, now: Callable[[], datetime]
    ) -> tuple[Store, Snapshot]:
        """Before the reactor runs: migrate, seed and read the first snapshot, blocking.

        For ``twistd``'s ``makeService``, so a bad database stops start-up in one line before
        anything listens. No connection is left open (it must not survive a daemonizing fork);
        the returned store's pool connects once the reactor runs.
        """
        if getattr(reactor, "running", False):
            raise RuntimeError("prepare_sqlite blocks; use Store.open_sqlite in a running reactor")
        connection = SQLITE.connect(path)
        try:
            _run_now(connection, open_database, SQLITE, now().astimezone(UTC))
            snapshot = _run_now(connection, read_snapshot, SQLITE)
        finally:
            connection.close()
        return cls(_sqlite_pool(path, reactor), SQLITE, reactor, now), snapshot

    @classmethod
    def prepare_postgresql(
        cls,
        conninfo: str,
        *,
        reactor: IReactorCore,
        now: Callable[[], datetime],
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> tuple[Store, Snapshot]:
        """Before the reactor runs: connect, migrate (or wait for the instance that does), seed
        and read the first snapshot, blocking; like :meth:`prepare_sqlite`.

        ``conninfo`` is a libpq connection string or URL (see :func:`postgresql_conninfo`).
        A database that cannot be reached raises :class:`StoreUnavailable` in one line.
        """
        if getattr(reactor, "running", False):
            raise RuntimeError(
                "prepare_postgresql blocks; use Store.open_postgresql in a running reactor"
            )
        dialect = POSTGRESQL
        try:
            connection = dialect.connect(conninfo)
        except ImportError as e:
            raise driver_missing() from e
        except Exception as e:
            if dialect.is_unavailable_error(e):
                raise StoreUnavailable(one_line(e)) from e
            raise
        try:
            _run_now(connection, open_database, dialect, now().astimezone(UTC))
            snapshot = _run_now(connection, read_snapshot, dialect)
        except Exception as e:
            if dialect.is_unavailable_error(e):
                raise StoreUnavailable(one_line(e)) from e
            if dialect.is_driver_error(e):  # no right to create tables, say: one line too
                raise DatabaseRefused(one_line(e)) from e
            raise
        finally:
            connection.close()
        pool = _postgresql_pool(conninfo, reactor, pool_size)
        return cls(pool, dialect, reactor, now, conninfo), snapshot

    @classmethod
    async def open_postgresql(
        cls,
        conninfo: str,
        *,
        reactor: IReactorCore,
        now: Callable[[], datetime],
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> Store:
        """Connect to PostgreSQL, migrate (exactly one instance does; the others wait on the
        advisory lock) and seed a new database. Raises :class:`StoreUnavailable` if unreachable.
        """
        pool = _postgresql_pool(conninfo, reactor, pool_size)
        return await cls.open(pool, POSTGRESQL, reactor=reactor, now=now, conninfo=conninfo)

    @classmethod
    async def open_sqlite(
        cls, path: str, *, reactor: IReactorCore, now: Callable[[], datetime]
    ) -> Store:
        """Open (creating if need be) the SQLite file at ``path``, migrate it, seed a new one."""
        return await cls.open(_sqlite_pool(path, reactor), SQLITE, reactor=reactor, now=now)

    @classmethod
    async def open(
        cls,
        pool: ConnectionPool,
        dialect: SqlDialect,
        *,
        reactor: IReactorCore,
        now: Callable[[], datetime],
        conninfo: str | None = None,
    ) -> Store:
        """Take over ``pool`` (closed again on failure), migrate, and seed a new database.

        Raises :class:`SchemaTooNew` for a database written by a newer OllamaFlow.
        ``conninfo`` lets :meth:`listen` open its own connection (dialects with a channel).
        """
        store = cls(pool, dialect, reactor, now, conninfo)
        try:
            await store._run(open_database, dialect, store._utcnow())
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Wait for running operations, then close the connection and stop the pool's thread."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            # Each pending Deferred is already awaited by its caller, who sees its result first.
            await DeferredList(list(self._pending), consumeErrors=True)
        pool = self._pool
        if pool.running:
            # Close the connection in the thread that owns it, so the final WAL checkpoint
            # happens there; pool.close() then only joins an idle thread.
            await deferToThreadPool(
                cast(IReactorFromThreads, self._reactor), pool.threadpool, _disconnect, pool
            )
        pool.close()

    @property
    def dialect(self) -> SqlDialect:
        return self._dialect

    @property
    def can_listen(self) -> bool:
        """Whether :meth:`listen` works: the database announces committed writes."""
        return bool(self._dialect.notify_channel) and self._conninfo is not None

    async def listen(self, on_change: ChangeHandler, on_lost: LostHandler) -> Subscription:
        """Hear about every committed write, by any instance, as it commits.

        Opens a dedicated connection (in a thread) that LISTENs on the dialect's channel; the
        reactor then reads it without blocking. ``on_change`` gets the announced generation
        (``None`` if unreadable); ``on_lost`` is called once, with a reason, if the connection
        breaks. Raises :class:`StoreUnavailable` if it cannot connect.
        """
        if self._closed:
            raise StoreClosed()
        if not self.can_listen:
            raise NotImplementedError(f"{self._dialect.name} cannot announce changes")
        assert self._conninfo is not None
        return await subscribe(
            self._dialect, self._conninfo, self._reactor, on_change=on_change, on_lost=on_lost
        )

    async def snapshot(self) -> Snapshot:
        """The whole configuration, read in one transaction."""
        return await self._run(read_snapshot, self._dialect)

    async def generation(self) -> int:
        """The current configuration generation: a cheap way to notice other writers."""
        return await self._run(read_generation, self._dialect)

    async def create_frontend(self, fe: Frontend) -> Frontend:
        """Store a new frontend, stamped with the current time; returns it as stored."""
        check_loadable(fe)
        return await self._write(create_frontend, fe, self._utcnow())

    async def replace_frontend(self, fe: Frontend) -> Frontend:
        """Replace a frontend's fields and backends; keeps CreatedUtc, moves LastUpdateUtc."""
        check_loadable(fe)
        return await self._write(replace_frontend, fe, self._utcnow())

    async def delete_frontend(self, identifier: str) -> None:
        """Delete a frontend and its list of backends."""
        await self._write(delete_frontend, identifier)

    async def create_backend(self, be: Backend) -> Backend:
        """Store a new backend, stamped with the current time; returns it as stored."""
        check_loadable(be)
        return await self._write(create_backend, be, self._utcnow())

    async def replace_backend(self, be: Backend) -> Backend:
        """Replace a backend's fields; keeps CreatedUtc, moves LastUpdateUtc."""
        check_loadable(be)
        return await self._write(replace_backend, be, self._utcnow())

    async def delete_backend(self, identifier: str, *, force: bool = False) -> tuple[str, ...]:
        """Delete a backend; returns the frontends it was removed from (only with ``force``).

        Without ``force``, a backend that frontends list is refused with :class:`BackendInUse`;
        with it, those frontends lose it (and get a new LastUpdateUtc) in the same transaction.
        """
        return await self._write(delete_backend, identifier, force, self._utcnow())

    async def create_api_key(self, key: ApiKey) -> ApiKey:
        """Store a new key, which carries its secret's hash and prefix already; returns it as
        stored. A reserved identifier ("anonymous", "admin") is refused."""
        check_api_key(key, creating=True)
        return await self._write(create_api_key, key, self._utcnow())

    async def replace_api_key(self, key: ApiKey) -> ApiKey:
        """Replace a key's fields; keeps its secret and CreatedUtc, moves LastUpdateUtc."""
        check_api_key(key, creating=False)
        return await self._write(replace_api_key, key, self._utcnow())

    async def rotate_api_key(self, identifier: str, secret_hash: str, key_prefix: str) -> ApiKey:
        """Give a key a new secret (its hash and shown prefix); returns the key as stored."""
        check_secret(identifier, secret_hash, key_prefix)
        return await self._write(
            rotate_api_key, identifier, secret_hash, key_prefix, self._utcnow()
        )

    async def delete_api_key(self, identifier: str) -> None:
        """Delete a key and its usage."""
        await self._write(delete_api_key, identifier)

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add ``rows`` to the stored counts (rows of one key, model and hour add up), all or
        nothing. Not a configuration write: no generation bump, no announcement."""
        batch = usage_batch(rows)
        if batch:
            await self._run(add_usage, self._dialect, batch, write=True)

    async def read_usage(self, key_id: str, since: datetime, limit: int) -> list[UsageRow]:
        """What ``key_id`` used, by hour (from the one containing ``since``) then model, at
        most ``limit`` rows."""
        return await self._run(read_usage, self._dialect, key_id, since, limit)

    def _utcnow(self) -> datetime:
        return self._now().astimezone(UTC)

    async def _write(self, work: Callable[..., T], *args: Any) -> T:
        return await self._run(in_write_transaction, self._dialect, work, *args, write=True)

    async def _run(self, interaction: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run ``interaction`` in one transaction; a lost connection is retried, a lost database
        is :class:`StoreUnavailable`.

        After a database restart every pooled connection is stale, and each is found out only
        when used: an interaction that failed that way never committed, so it runs again (the
        pool has dropped that connection and connects afresh), at most once per pooled
        connection. A write whose commit broke off is not retried: it may have been saved.
        """
        if self._closed:
            raise StoreClosed()
        attempts = self._pool.max + 1
        for attempt in range(1, attempts + 1):
            progress = _Progress()
            d: Deferred[T] = self._pool.runInteraction(_tracked, progress, interaction, *args)
            self._pending.add(d)
            try:
                return await d
            except Exception as e:
                if not self._dialect.is_unavailable_error(e):
                    raise
                unsure = write and progress.returned
                if not progress.entered or unsure or attempt == attempts:
                    raise StoreUnavailable(one_line(e), unsure=unsure) from e
            finally:
                self._pending.discard(d)
        raise AssertionError("unreachable")  # the last attempt returns or raises


@attrs.define
class _Progress:
    """How far one attempt got: connected and began, and returned (so only commit was left)."""

    entered: bool = False
    returned: bool = False


def _tracked(cursor: Cursor, progress: _Progress, interaction: Callable[..., T], *args: Any) -> T:
    progress.entered = True
    result = interaction(cursor, *args)
    progress.returned = True
    return result


class _DroppingConnection(adbapi.Connection):
    """adbapi's pooled connection, but one found dead on rollback is dropped quietly.

    adbapi (``cp_reconnect``) drops it too, logging two tracebacks per stale connection after
    every database restart; the store reports the failure itself, as :class:`StoreUnavailable`.
    """

    def rollback(self) -> None:
        connection = dbapi_connection(self)
        try:
            connection.rollback()
            if not getattr(connection, "closed", False):
                return
        except Exception:
            pass
        # The next interaction in this thread connects afresh.
        owning_pool(self).disconnect(connection)


def _postgresql_pool(conninfo: str, reactor: IReactorCore, size: int) -> ConnectionPool:
    """Up to ``size`` connections, one per pool thread, reconnecting after a lost one."""
    try:
        import psycopg  # noqa: F401 - fail here, in one line, rather than in every call
    except ImportError as e:
        raise driver_missing() from e
    pool = ConnectionPool(
        POSTGRESQL.driver,
        conninfo,
        cp_min=1,
        cp_max=size,
        cp_reconnect=True,
        cp_noisy=False,
        cp_openfun=POSTGRESQL.setup_connection,
        cp_reactor=reactor,
        **POSTGRESQL.connect_kwargs,
    )
    pool.connectionFactory = _DroppingConnection
    return pool


def _sqlite_pool(path: str, reactor: IReactorCore) -> ConnectionPool:
    """One connection in one thread: SQLite serializes writers anyway."""
    return ConnectionPool(
        SQLITE.driver,
        path,
        cp_min=1,
        cp_max=1,
        cp_openfun=SQLITE.setup_connection,
        cp_reactor=reactor,
        **SQLITE.connect_kwargs,
    )


def _run_now(connection: Any, interaction: Callable[..., T], *args: Any) -> T:
    """What ``runInteraction`` does, on the calling thread: commit on return, else roll back."""
    cursor = connection.cursor()
    try:
        result = interaction(cursor, *args)
        cursor.close()
        connection.commit()
        return result
    except BaseException:
        connection.rollback()
        raise


def _disconnect(pool: ConnectionPool) -> None:
    """In the pool's thread: close the connection that thread owns."""
    connection = pool.connections.get(pool.threadID())
    if connection is not None:
        pool.disconnect(connection)
