"""The configuration store: frontends and backends in a SQL database, behind adbapi.

Every write is one transaction that begins with the dialect's write lock, bumps the
configuration generation and announces it (PostgreSQL: NOTIFY, delivered on commit only), so a
failed write leaves nothing behind and readers can tell which snapshot is newer. All database
work runs in the pool's threads, never on the reactor thread. A database that cannot be reached
or a connection that broke is reported as :class:`StoreUnavailable`; the pool reconnects by
itself on the next call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import attrs
from twisted.enterprise import adbapi
from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool

from ollamaflow.fielderrors import FieldError
from ollamaflow.jsonfields import from_wire, to_wire
from ollamaflow.records import Backend, Frontend
from ollamaflow.store.errors import (
    BackendInUse,
    DatabaseRefused,
    DuplicateIdentifier,
    InvalidRecord,
    InvalidStoredRecord,
    NotFound,
    StoreClosed,
    StoreUnavailable,
    one_line,
)
from ollamaflow.store.migrations import migrate
from ollamaflow.store.postgresql import (
    ChangeHandler,
    LostHandler,
    Subscription,
    driver_missing,
    subscribe,
)
from ollamaflow.store.sql import POSTGRESQL, SQLITE, Cursor, SqlDialect
from ollamaflow.twisted_internals import dbapi_connection, owning_pool
from ollamaflow.utctime import format_utc

T = TypeVar("T")
R = TypeVar("R", Frontend, Backend)

#: Wire keys kept in their own columns (or the link table) rather than in ``doc``.
_COLUMN_KEYS = frozenset({"Identifier", "Backends", "CreatedUtc", "LastUpdateUtc"})


def _left_out_key(left_out: tuple[InvalidStoredRecord, ...]) -> tuple[tuple[str, str, str], ...]:
    return tuple(e.key for e in left_out)


@attrs.frozen
class Snapshot:
    """The whole configuration as of one generation; records in creation order."""

    generation: int
    frontends: tuple[Frontend, ...]
    backends: tuple[Backend, ...]
    #: Stored rows that do not load (edited by hand, or refused by a stricter field): left out
    #: so that the rest still serves, each naming its record and why. A frontend that lists a
    #: left-out backend keeps listing it; a PUT of the record repairs it, a DELETE removes it.
    left_out: tuple[InvalidStoredRecord, ...] = attrs.field(default=(), eq=_left_out_key)


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
            _run_now(connection, _open_database, SQLITE, now().astimezone(UTC))
            snapshot = _run_now(connection, _read_snapshot, SQLITE)
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
            _run_now(connection, _open_database, dialect, now().astimezone(UTC))
            snapshot = _run_now(connection, _read_snapshot, dialect)
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
            await store._run(_open_database, dialect, store._utcnow())
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
        return await self._run(_read_snapshot, self._dialect)

    async def generation(self) -> int:
        """The current configuration generation: a cheap way to notice other writers."""
        return await self._run(_read_generation, self._dialect)

    async def create_frontend(self, fe: Frontend) -> Frontend:
        """Store a new frontend, stamped with the current time; returns it as stored."""
        _check_loadable(fe)
        return await self._write(_create_frontend, fe, self._utcnow())

    async def replace_frontend(self, fe: Frontend) -> Frontend:
        """Replace a frontend's fields and backends; keeps CreatedUtc, moves LastUpdateUtc."""
        _check_loadable(fe)
        return await self._write(_replace_frontend, fe, self._utcnow())

    async def delete_frontend(self, identifier: str) -> None:
        """Delete a frontend and its list of backends."""
        await self._write(_delete_frontend, identifier)

    async def create_backend(self, be: Backend) -> Backend:
        """Store a new backend, stamped with the current time; returns it as stored."""
        _check_loadable(be)
        return await self._write(_create_backend, be, self._utcnow())

    async def replace_backend(self, be: Backend) -> Backend:
        """Replace a backend's fields; keeps CreatedUtc, moves LastUpdateUtc."""
        _check_loadable(be)
        return await self._write(_replace_backend, be, self._utcnow())

    async def delete_backend(self, identifier: str, *, force: bool = False) -> tuple[str, ...]:
        """Delete a backend; returns the frontends it was removed from (only with ``force``).

        Without ``force``, a backend that frontends list is refused with :class:`BackendInUse`;
        with it, those frontends lose it (and get a new LastUpdateUtc) in the same transaction.
        """
        return await self._write(_delete_backend, identifier, force, self._utcnow())

    def _utcnow(self) -> datetime:
        return self._now().astimezone(UTC)

    async def _write(self, work: Callable[..., T], *args: Any) -> T:
        return await self._run(_in_write_transaction, self._dialect, work, *args, write=True)

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


# Everything below runs in the pool's thread, inside one transaction per call: adbapi commits
# when the function returns and rolls back when it raises.


def _disconnect(pool: ConnectionPool) -> None:
    connection = pool.connections.get(pool.threadID())
    if connection is not None:
        pool.disconnect(connection)


def _open_database(cursor: Cursor, dialect: SqlDialect, now: datetime) -> None:
    # The write lock first: on PostgreSQL the first instance migrates, the others wait here and
    # then find the schema up to date.
    dialect.begin_writing(cursor)
    if migrate(cursor, dialect, now=now) == 0:
        _bump_generation(cursor, dialect)
        _insert_backend(cursor, dialect, Backend(identifier="backend1"), now)
        _insert_frontend(
            cursor, dialect, Frontend(identifier="frontend1", backends=("backend1",)), now
        )
        dialect.announce(cursor)


def _in_write_transaction(
    cursor: Cursor, dialect: SqlDialect, work: Callable[..., T], *args: Any
) -> T:
    dialect.begin_writing(cursor)
    _bump_generation(cursor, dialect)
    result = work(cursor, dialect, *args)
    dialect.announce(cursor)  # delivered on commit only; a failed write announces nothing
    return result


def _bump_generation(cursor: Cursor, dialect: SqlDialect) -> None:
    dialect.execute(cursor, "UPDATE config_state SET generation = generation + 1 WHERE id = 1")


def _read_generation(cursor: Cursor, dialect: SqlDialect) -> int:
    row = dialect.execute(cursor, "SELECT generation FROM config_state WHERE id = 1").fetchone()
    return int(row[0])


def _read_snapshot(cursor: Cursor, dialect: SqlDialect) -> Snapshot:
    dialect.execute(cursor, dialect.begin_read)
    generation = _read_generation(cursor, dialect)
    links: dict[str, list[str]] = {}
    for frontend_id, backend_id in dialect.execute(
        cursor,
        "SELECT frontend_id, backend_id FROM frontend_backends ORDER BY frontend_id, position",
    ).fetchall():
        links.setdefault(frontend_id, []).append(backend_id)
    left_out: list[InvalidStoredRecord] = []

    def load(cls: type[R], table: str, linked: bool) -> tuple[R, ...]:
        """The rows of ``table`` that load; those that do not go to ``left_out``."""
        loaded: list[R] = []
        for row in dialect.execute(
            cursor,
            f"SELECT identifier, doc, created_utc, last_update_utc FROM {table} ORDER BY seq",
        ).fetchall():
            try:
                loaded.append(_record(cls, row, tuple(links.get(row[0], ())) if linked else None))
            except InvalidStoredRecord as e:
                left_out.append(e)
        return tuple(loaded)

    frontends = load(Frontend, "frontends", linked=True)
    backends = load(Backend, "backends", linked=False)
    return Snapshot(generation, frontends, backends, tuple(left_out))


def _record(cls: type[R], row: Sequence[Any], backends: tuple[str, ...] | None) -> R:
    """One stored row as a record; :class:`InvalidStoredRecord` (naming the field) if it does
    not load."""
    identifier, doc, created_utc, last_update_utc = row
    kind = cls.__name__.lower()
    try:
        data = json.loads(doc)
        if not isinstance(data, dict):
            raise ValueError("the stored document is not a JSON object")
        data = {k: v for k, v in data.items() if k not in _COLUMN_KEYS}
        data["Identifier"] = identifier
        if backends is not None:
            data["Backends"] = list(backends)
        record, _unknown = from_wire(cls, data)  # keys of fields since removed: dropped
        return attrs.evolve(
            record,
            created_utc=_parse_utc(created_utc),
            last_update_utc=_parse_utc(last_update_utc),
        )
    except RecursionError as e:
        reason = "the stored document nests too deep to read"
        raise InvalidStoredRecord(kind, identifier, reason) from e
    except (ValueError, TypeError, FieldError) as e:
        raise InvalidStoredRecord(kind, identifier, str(e)) from e


def _parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _doc(record: Frontend | Backend) -> str:
    return _encode(_document(record))


def _document(record: Frontend | Backend) -> dict[str, object]:
    return {k: v for k, v in to_wire(record).items() if k not in _COLUMN_KEYS}


def _encode(document: dict[str, object]) -> str:
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


#: What writing a record built in code with the wrong types may raise.
_UNENCODABLE = (ValueError, TypeError, AttributeError, RecursionError)

#: Any valid time: the check below loads a row as a snapshot would, stamps included.
_SOME_TIME = "2000-01-01T00:00:00.000000Z"


def _check_loadable(record: R) -> None:
    """Refuse, before any SQL, a record that would be stored in a form that does not load
    back: written as it would be, then read as :func:`_read_snapshot` reads it.

    Records from the admin API always pass; this stops one built in code without its checks
    (``attrs.evolve``) from making the database unloadable. Raises :class:`InvalidRecord`
    naming the field. Pure CPU on a bounded record, so fine on the reactor thread.
    """
    cls = type(record)
    kind = cls.__name__.lower()
    identifier = (
        record.identifier if isinstance(record.identifier, str) else repr(record.identifier)
    )
    try:
        doc = _encode(_document(record))
    except _UNENCODABLE as e:
        raise InvalidRecord(kind, identifier, _unencodable(record, e)) from e
    backends = record.backends if isinstance(record, Frontend) else None
    row = (record.identifier, doc, _SOME_TIME, _SOME_TIME)
    try:
        _record(cls, row, backends)
    except InvalidStoredRecord as e:
        raise InvalidRecord(kind, identifier, e.reason) from e


def _unencodable(record: Frontend | Backend, error: Exception) -> str:
    """Why a record could not be written as JSON, naming the field (the encoder does not)."""
    try:
        wire = to_wire(record)
        from_wire(type(record), wire)
    except FieldError as e:
        return str(e)
    except _UNENCODABLE:
        pass
    else:
        for key, value in wire.items():
            try:
                _encode({key: value})
            except _UNENCODABLE as e:
                return f"{key}: cannot be written as JSON ({type(e).__name__})"
    return f"cannot be written as JSON ({type(error).__name__})"


def _insert(cursor: Cursor, dialect: SqlDialect, table: str, record: Any, now: datetime) -> None:
    kind = table[:-1]
    try:
        dialect.execute(
            cursor,
            f"INSERT INTO {table} (identifier, doc, created_utc, last_update_utc)"
            " VALUES (?, ?, ?, ?)",
            (record.identifier, _doc(record), format_utc(now), format_utc(now)),
        )
    except Exception as e:
        if dialect.is_integrity_error(e):
            raise DuplicateIdentifier(kind, record.identifier) from e
        raise


def _insert_backend(cursor: Cursor, dialect: SqlDialect, be: Backend, now: datetime) -> Backend:
    _insert(cursor, dialect, "backends", be, now)
    return attrs.evolve(be, created_utc=now, last_update_utc=now)


def _insert_frontend(cursor: Cursor, dialect: SqlDialect, fe: Frontend, now: datetime) -> Frontend:
    _insert(cursor, dialect, "frontends", fe, now)
    _write_links(cursor, dialect, fe.identifier, fe.backends)
    return attrs.evolve(fe, created_utc=now, last_update_utc=now)


def _created_utc(cursor: Cursor, dialect: SqlDialect, table: str, identifier: str) -> datetime:
    row = dialect.execute(
        cursor, f"SELECT created_utc FROM {table} WHERE identifier = ?", (identifier,)
    ).fetchone()
    if row is None:
        raise NotFound(table[:-1], identifier)
    return _parse_utc(row[0])


def _update(
    cursor: Cursor, dialect: SqlDialect, table: str, record: Any, now: datetime
) -> datetime:
    """Rewrite a record's document; returns its CreatedUtc."""
    created = _created_utc(cursor, dialect, table, record.identifier)
    dialect.execute(
        cursor,
        f"UPDATE {table} SET doc = ?, last_update_utc = ? WHERE identifier = ?",
        (_doc(record), format_utc(now), record.identifier),
    )
    return created


def _write_links(
    cursor: Cursor, dialect: SqlDialect, frontend: str, backends: Sequence[str]
) -> None:
    """Make ``frontend`` list exactly ``backends``, in order; they need not exist yet."""
    dialect.execute(cursor, "DELETE FROM frontend_backends WHERE frontend_id = ?", (frontend,))
    for position, backend in enumerate(backends):
        dialect.execute(
            cursor,
            "INSERT INTO frontend_backends (frontend_id, backend_id, position) VALUES (?, ?, ?)",
            (frontend, backend, position),
        )


def _create_frontend(cursor: Cursor, dialect: SqlDialect, fe: Frontend, now: datetime) -> Frontend:
    return _insert_frontend(cursor, dialect, fe, now)


def _replace_frontend(cursor: Cursor, dialect: SqlDialect, fe: Frontend, now: datetime) -> Frontend:
    created = _update(cursor, dialect, "frontends", fe, now)
    _write_links(cursor, dialect, fe.identifier, fe.backends)
    return attrs.evolve(fe, created_utc=created, last_update_utc=now)


def _delete_frontend(cursor: Cursor, dialect: SqlDialect, identifier: str) -> None:
    dialect.execute(cursor, "DELETE FROM frontends WHERE identifier = ?", (identifier,))
    if cursor.rowcount == 0:
        raise NotFound("frontend", identifier)


def _create_backend(cursor: Cursor, dialect: SqlDialect, be: Backend, now: datetime) -> Backend:
    return _insert_backend(cursor, dialect, be, now)


def _replace_backend(cursor: Cursor, dialect: SqlDialect, be: Backend, now: datetime) -> Backend:
    created = _update(cursor, dialect, "backends", be, now)
    return attrs.evolve(be, created_utc=created, last_update_utc=now)


def _delete_backend(
    cursor: Cursor, dialect: SqlDialect, identifier: str, force: bool, now: datetime
) -> tuple[str, ...]:
    _created_utc(cursor, dialect, "backends", identifier)  # NotFound before BackendInUse
    users = tuple(
        row[0]
        for row in dialect.execute(
            cursor,
            "SELECT f.identifier FROM frontends f"
            " JOIN frontend_backends l ON l.frontend_id = f.identifier"
            " WHERE l.backend_id = ? ORDER BY f.seq",
            (identifier,),
        ).fetchall()
    )
    if users and not force:
        raise BackendInUse(identifier, users)
    for frontend in users:
        remaining = [
            row[0]
            for row in dialect.execute(
                cursor,
                "SELECT backend_id FROM frontend_backends"
                " WHERE frontend_id = ? AND backend_id <> ? ORDER BY position",
                (frontend, identifier),
            ).fetchall()
        ]
        _write_links(cursor, dialect, frontend, remaining)
        dialect.execute(
            cursor,
            "UPDATE frontends SET last_update_utc = ? WHERE identifier = ?",
            (format_utc(now), frontend),
        )
    dialect.execute(cursor, "DELETE FROM backends WHERE identifier = ?", (identifier,))
    return users
