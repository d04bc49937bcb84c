"""Every difference between SQL databases and DB-API drivers the store cares about, in one place.

The store and the migrations write SQL with ``?`` placeholders and ``{autoincrement}`` in DDL;
a :class:`SqlDialect` turns that into what its driver expects and knows how to begin transactions,
serialize writers, announce a change, set up a connection and recognise an integrity error or a
lost database. Drivers are imported only when used: SQLite always works, PostgreSQL needs psycopg.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import attrs
from twisted.enterprise.adbapi import ConnectionLost


class Cursor(Protocol):
    """The part of a DB-API cursor (or an adbapi ``Transaction``) the store uses."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """The part of a DB-API connection a dialect's setup needs."""

    def cursor(self) -> Any: ...


def _frozen_mapping(mapping: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(mapping))


@attrs.frozen
class SqlDialect:
    """One database and driver: its SQL flavour, transaction starts and connection setup."""

    #: Short name, for messages.
    name: str
    #: The DB-API module to import (what adbapi's ``ConnectionPool`` is given).
    driver: str
    #: ``"qmark"`` (``?``, kept as written) or ``"format"`` (``%s``, with ``%`` doubled).
    paramstyle: str
    #: Starts a transaction that will write: must take the write lock before the first read so
    #: check-then-write is atomic even against other processes on the same database.
    begin_write: str
    #: Starts a read-only transaction that sees one consistent state across several SELECTs.
    begin_read: str
    #: Column definition for a creation-order key that is never reused.
    autoincrement_primary_key: str
    #: A query with one placeholder (the table name) that returns a row if the table exists.
    table_exists_sql: str
    #: The setting an operator changes to point the daemon at another database (for messages).
    location_setting: str = "DatabaseFilename"
    #: Run right after :attr:`begin_write` when beginning alone does not serialize writers
    #: (PostgreSQL: a transaction-scoped advisory lock, so migrations and writes take turns).
    write_lock: str = ""
    #: Run in every write transaction after the generation is bumped: tells listeners, on commit
    #: only, that a new generation exists. Empty when the database cannot announce changes.
    notify: str = ""
    #: The channel :attr:`notify` announces on (what a follower LISTENs to), if any.
    notify_channel: str = ""
    #: Names of the driver's exception classes meaning the database cannot be reached or the
    #: connection broke (as opposed to a refused statement).
    unavailable_errors: tuple[str, ...] = ()
    #: Appended to a text column in ``ORDER BY`` to compare it byte by byte, as SQLite always
    #: does (PostgreSQL otherwise sorts by the database's locale).
    bytewise: str = ""
    #: Statements run on every new connection, in order.
    connect_statements: tuple[str, ...] = ()
    #: Keyword arguments for the driver's ``connect``: autocommit, so we begin transactions.
    connect_kwargs: Mapping[str, object] = attrs.field(
        factory=dict, converter=_frozen_mapping, hash=False
    )

    def sql(self, text: str) -> str:
        """``text`` with ``?`` placeholders rewritten into the driver's paramstyle."""
        if self.paramstyle == "qmark":
            return text
        if self.paramstyle == "format":
            return text.replace("%", "%%").replace("?", "%s")
        raise ValueError(f"unsupported paramstyle {self.paramstyle!r}")

    def ddl(self, text: str) -> str:
        """A schema statement with this dialect's column types filled in."""
        return text.format(autoincrement=self.autoincrement_primary_key)

    def execute(self, cursor: Cursor, text: str, params: Sequence[Any] = ()) -> Cursor:
        """Run ``text`` (written with ``?`` placeholders) on ``cursor``; returns the cursor."""
        cursor.execute(self.sql(text), tuple(params))
        return cursor

    def is_integrity_error(self, error: BaseException) -> bool:
        """Whether the driver raised ``error`` for a violated constraint."""
        module = importlib.import_module(self.driver)
        return isinstance(error, module.IntegrityError)

    def begin_writing(self, cursor: Cursor) -> None:
        """Begin a transaction that holds the database's write lock until it ends."""
        self.execute(cursor, self.begin_write)
        if self.write_lock:
            self.execute(cursor, self.write_lock)

    def announce(self, cursor: Cursor) -> None:
        """Inside a write transaction: tell listeners about the new generation once it commits."""
        if self.notify:
            self.execute(cursor, self.notify)

    def is_unavailable_error(self, error: BaseException) -> bool:
        """Whether ``error`` means the database is unreachable or the connection was lost."""
        if isinstance(error, ConnectionLost):
            return True
        if not self.unavailable_errors:
            return False
        module = importlib.import_module(self.driver)
        classes = tuple(getattr(module, name) for name in self.unavailable_errors)
        return isinstance(error, classes)

    def is_driver_error(self, error: BaseException) -> bool:
        """Whether the driver raised ``error`` (DB-API's ``Error``), not our own code."""
        module = importlib.import_module(self.driver)
        return isinstance(error, module.Error)

    def table_exists(self, cursor: Cursor, table: str) -> bool:
        return self.execute(cursor, self.table_exists_sql, (table,)).fetchone() is not None

    def connect(self, *args: Any) -> Any:
        """A new, set-up driver connection (blocking: before the reactor runs, or in a thread)."""
        module = importlib.import_module(self.driver)
        connection = module.connect(*args, **self.connect_kwargs)
        try:
            self.setup_connection(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def setup_connection(self, connection: Connection) -> None:
        """Run :attr:`connect_statements` on a fresh connection (adbapi's ``cp_openfun``)."""
        cursor = connection.cursor()
        try:
            for statement in self.connect_statements:
                cursor.execute(statement)
                cursor.fetchall()
        finally:
            cursor.close()


#: SQLite through the standard library. ``BEGIN IMMEDIATE`` takes the write lock at once, so
#: two daemons on one file serialize their writes instead of failing at commit.
SQLITE = SqlDialect(
    name="sqlite",
    driver="sqlite3",
    paramstyle="qmark",
    begin_write="BEGIN IMMEDIATE",
    begin_read="BEGIN",
    autoincrement_primary_key="INTEGER PRIMARY KEY AUTOINCREMENT",
    table_exists_sql="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
    connect_statements=(
        "PRAGMA busy_timeout = 5000",
        "PRAGMA foreign_keys = ON",
        "PRAGMA journal_mode = WAL",
    ),
    connect_kwargs={"check_same_thread": False, "isolation_level": None},
)


#: Every OllamaFlow on one PostgreSQL database takes this transaction-scoped advisory lock before
#: it migrates or writes, so exactly one migrates while the others wait, and check-then-write is
#: atomic as with SQLite's ``BEGIN IMMEDIATE``. The number is arbitrary: "OFlw" in ASCII.
POSTGRESQL_LOCK_KEY = 0x4F466C77

#: The LISTEN/NOTIFY channel on which every committed write announces its generation.
POSTGRESQL_CHANNEL = "ollamaflow_config"

#: PostgreSQL through psycopg 3. Writers are serialized by the advisory lock (READ COMMITTED, so
#: each statement after the lock sees what the previous writer committed); a snapshot is read in
#: one REPEATABLE READ transaction. Connections are in autocommit mode: we begin transactions.
POSTGRESQL = SqlDialect(
    name="postgresql",
    driver="psycopg",
    paramstyle="format",
    begin_write="BEGIN ISOLATION LEVEL READ COMMITTED",
    begin_read="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    autoincrement_primary_key="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    table_exists_sql=(
        "SELECT 1 FROM information_schema.tables"
        " WHERE table_schema = current_schema() AND table_name = ?"
    ),
    location_setting="Database",
    write_lock=f"SELECT pg_advisory_xact_lock({POSTGRESQL_LOCK_KEY})",
    notify=(
        f"SELECT pg_notify('{POSTGRESQL_CHANNEL}', generation::text) FROM config_state WHERE id = 1"
    ),
    notify_channel=POSTGRESQL_CHANNEL,
    # OperationalError covers a refused or broken connection and a server shutting down;
    # InterfaceError a connection psycopg already knows is closed.
    unavailable_errors=("OperationalError", "InterfaceError"),
    bytewise=' COLLATE "C"',
    connect_kwargs={"autocommit": True},
)
