"""The configuration as rows: each function is the work of one transaction, run in the pool's
thread with the cursor and the dialect given (adbapi commits when it returns and rolls back when
it raises). :class:`~ollamaflow.store.store.Store` chooses which to run and when.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs

from ollamaflow.fielderrors import FieldError
from ollamaflow.jsonfields import from_wire, to_wire
from ollamaflow.records import Backend, Frontend
from ollamaflow.store.errors import (
    BackendInUse,
    DuplicateIdentifier,
    InvalidRecord,
    InvalidStoredRecord,
    NotFound,
)
from ollamaflow.store.migrations import migrate
from ollamaflow.store.sql import Cursor, SqlDialect
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


def open_database(cursor: Cursor, dialect: SqlDialect, now: datetime) -> None:
    """Bring the schema up to date; a new database gets backend1 and frontend1, as 1.2 did."""
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


def in_write_transaction(
    cursor: Cursor, dialect: SqlDialect, work: Callable[..., T], *args: Any
) -> T:
    """``work`` under the write lock, bumping the generation and announcing the change."""
    dialect.begin_writing(cursor)
    _bump_generation(cursor, dialect)
    result = work(cursor, dialect, *args)
    dialect.announce(cursor)  # delivered on commit only; a failed write announces nothing
    return result


def _bump_generation(cursor: Cursor, dialect: SqlDialect) -> None:
    dialect.execute(cursor, "UPDATE config_state SET generation = generation + 1 WHERE id = 1")


def read_generation(cursor: Cursor, dialect: SqlDialect) -> int:
    """The configuration generation, bumped by every write."""
    row = dialect.execute(cursor, "SELECT generation FROM config_state WHERE id = 1").fetchone()
    return int(row[0])


def read_snapshot(cursor: Cursor, dialect: SqlDialect) -> Snapshot:
    """The whole configuration in one consistent read; rows that do not load are left out."""
    dialect.execute(cursor, dialect.begin_read)
    generation = read_generation(cursor, dialect)
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


def check_loadable(record: R) -> None:
    """Refuse, before any SQL, a record that would be stored in a form that does not load
    back: written as it would be, then read as :func:`read_snapshot` reads it.

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


def create_frontend(cursor: Cursor, dialect: SqlDialect, fe: Frontend, now: datetime) -> Frontend:
    """Insert ``fe`` and its backend links (an identifier taken is refused)."""
    return _insert_frontend(cursor, dialect, fe, now)


def replace_frontend(cursor: Cursor, dialect: SqlDialect, fe: Frontend, now: datetime) -> Frontend:
    """Overwrite ``fe`` and its backend links, keeping its creation time."""
    created = _update(cursor, dialect, "frontends", fe, now)
    _write_links(cursor, dialect, fe.identifier, fe.backends)
    return attrs.evolve(fe, created_utc=created, last_update_utc=now)


def delete_frontend(cursor: Cursor, dialect: SqlDialect, identifier: str) -> None:
    """Delete a frontend and its backend links."""
    dialect.execute(cursor, "DELETE FROM frontends WHERE identifier = ?", (identifier,))
    if cursor.rowcount == 0:
        raise NotFound("frontend", identifier)


def create_backend(cursor: Cursor, dialect: SqlDialect, be: Backend, now: datetime) -> Backend:
    """Insert ``be`` (an identifier taken is refused)."""
    return _insert_backend(cursor, dialect, be, now)


def replace_backend(cursor: Cursor, dialect: SqlDialect, be: Backend, now: datetime) -> Backend:
    """Overwrite ``be``, keeping its creation time."""
    created = _update(cursor, dialect, "backends", be, now)
    return attrs.evolve(be, created_utc=created, last_update_utc=now)


def delete_backend(
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
