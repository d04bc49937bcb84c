"""Every difference between SQL databases and DB-API drivers the store cares about, in one place.

The store and the migrations write SQL with ``?`` placeholders and ``{autoincrement}`` in DDL;
a :class:`Dialect` turns that into what its driver expects and knows how to begin transactions,
set up a connection and recognise an integrity error. Drivers are imported only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import attrs


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
class Dialect:
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

    def table_exists(self, cursor: Cursor, table: str) -> bool:
        return self.execute(cursor, self.table_exists_sql, (table,)).fetchone() is not None

    def connect(self, *args: Any) -> Any:
        """A new, set-up driver connection (for work done before the reactor runs)."""
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
SQLITE = Dialect(
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
