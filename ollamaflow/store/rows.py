"""The configuration (and the API keys' usage) as rows: each function is the work of one
transaction, run in the pool's thread with the cursor and the dialect given (adbapi commits when
it returns and rolls back when it raises). :class:`~ollamaflow.store.store.Store` chooses which
to run and when.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs

from ollamaflow.fielderrors import FieldError
from ollamaflow.jsonfields import from_wire, to_wire
from ollamaflow.records import RESERVED_KEY_IDENTIFIERS, ApiKey, Backend, Frontend, UsageRow
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
R = TypeVar("R", Frontend, Backend, ApiKey)

#: Wire keys kept in their own columns (or the link table) rather than in ``doc``.
_COLUMN_KEYS = frozenset({"Identifier", "Backends", "CreatedUtc", "LastUpdateUtc", "KeyPrefix"})


def _left_out_key(left_out: tuple[InvalidStoredRecord, ...]) -> tuple[tuple[str, str, str], ...]:
    return tuple(e.key for e in left_out)


@attrs.frozen
class Snapshot:
    """The whole configuration as of one generation; records in creation order."""

    generation: int
    frontends: tuple[Frontend, ...]
    backends: tuple[Backend, ...]
    #: With their ``secret_hash`` and ``key_prefix``.
    api_keys: tuple[ApiKey, ...] = ()
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
    api_keys: list[ApiKey] = []
    key_rows = dialect.execute(cursor, f"SELECT {_KEY_COLUMNS} FROM apikeys ORDER BY seq")
    for row in key_rows.fetchall():
        try:
            api_keys.append(_api_key(row))
        except InvalidStoredRecord as e:
            left_out.append(e)
    return Snapshot(generation, frontends, backends, tuple(api_keys), tuple(left_out))


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


def _doc(record: Frontend | Backend | ApiKey) -> str:
    return _encode(_document(record))


def _document(record: Frontend | Backend | ApiKey) -> dict[str, object]:
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


def _unencodable(record: Frontend | Backend | ApiKey, error: Exception) -> str:
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


# -- API keys ----------------------------------------------------------------------------------

_KEY_COLUMNS = "identifier, doc, created_utc, last_update_utc, secret_hash, key_prefix"
_SECRET_HASH = re.compile(r"[0-9a-f]{64}")
_KEY_PREFIX = re.compile(r"[!-~]{1,64}")


def _api_key(row: Sequence[Any]) -> ApiKey:
    """One stored key (the columns of :data:`_KEY_COLUMNS`), its secret's hash and prefix
    included; :class:`InvalidStoredRecord` if it does not load."""
    key = _record(ApiKey, row[:4], None)
    return attrs.evolve(key, secret_hash=row[4], key_prefix=row[5])


def check_api_key(key: ApiKey, *, creating: bool) -> None:
    """Refuse, before any SQL, a key that would not load back (as :func:`check_loadable`),
    a new one taking a reserved identifier, or one whose secret columns are malformed."""
    check_loadable(key)
    if creating:
        if key.identifier.lower() in RESERVED_KEY_IDENTIFIERS:
            reason = (
                f"Identifier: {key.identifier!r} is reserved (usage without a key is counted"
                " under 'anonymous' and 'admin')"
            )
            raise InvalidRecord("apikey", key.identifier, reason)
        check_secret(key.identifier, key.secret_hash, key.key_prefix)


def check_secret(identifier: str, secret_hash: object, key_prefix: object) -> None:
    """Refuse a secret's hash that is not a hex SHA-256, or a shown prefix that is not 1-64
    visible ASCII characters (:class:`InvalidRecord`; the values are never quoted)."""
    if not (isinstance(secret_hash, str) and _SECRET_HASH.fullmatch(secret_hash)):
        reason = "the secret's hash is not a lowercase hex SHA-256"
        raise InvalidRecord("apikey", identifier, reason)
    if not (isinstance(key_prefix, str) and _KEY_PREFIX.fullmatch(key_prefix)):
        reason = "KeyPrefix: expected 1-64 visible ASCII characters"
        raise InvalidRecord("apikey", identifier, reason)


def _same_secret(identifier: str) -> InvalidRecord:
    return InvalidRecord("apikey", identifier, "another key has the same secret")


def create_api_key(cursor: Cursor, dialect: SqlDialect, key: ApiKey, now: datetime) -> ApiKey:
    """Insert ``key`` with its secret's hash and prefix (an identifier taken is refused)."""
    taken = dialect.execute(
        cursor, "SELECT 1 FROM apikeys WHERE identifier = ?", (key.identifier,)
    ).fetchone()
    if taken is not None:
        raise DuplicateIdentifier("apikey", key.identifier)
    # Counts of an earlier key of this name written after its delete (a flush under way,
    # another instance) are not this key's.
    dialect.execute(cursor, "DELETE FROM apikey_usage WHERE key_id = ?", (key.identifier,))
    try:
        dialect.execute(
            cursor,
            "INSERT INTO apikeys (identifier, doc, secret_hash, key_prefix, created_utc,"
            " last_update_utc) VALUES (?, ?, ?, ?, ?, ?)",
            (
                key.identifier,
                _doc(key),
                key.secret_hash,
                key.key_prefix,
                format_utc(now),
                format_utc(now),
            ),
        )
    except Exception as e:
        if dialect.is_integrity_error(e):  # the identifier is free: the hash is not
            raise _same_secret(key.identifier) from e
        raise
    return attrs.evolve(key, created_utc=now, last_update_utc=now)


def replace_api_key(cursor: Cursor, dialect: SqlDialect, key: ApiKey, now: datetime) -> ApiKey:
    """Overwrite ``key``'s fields, keeping its secret and creation time (those of ``key`` are
    ignored)."""
    row = dialect.execute(
        cursor,
        "SELECT created_utc, secret_hash, key_prefix FROM apikeys WHERE identifier = ?",
        (key.identifier,),
    ).fetchone()
    if row is None:
        raise NotFound("apikey", key.identifier)
    dialect.execute(
        cursor,
        "UPDATE apikeys SET doc = ?, last_update_utc = ? WHERE identifier = ?",
        (_doc(key), format_utc(now), key.identifier),
    )
    return attrs.evolve(
        key,
        created_utc=_parse_utc(row[0]),
        last_update_utc=now,
        secret_hash=row[1],
        key_prefix=row[2],
    )


def rotate_api_key(
    cursor: Cursor,
    dialect: SqlDialect,
    identifier: str,
    secret_hash: str,
    key_prefix: str,
    now: datetime,
) -> ApiKey:
    """Give a key a new secret; returns it as stored (:class:`InvalidStoredRecord`, and
    nothing changed, if its stored fields do not load: replace it first)."""
    try:
        dialect.execute(
            cursor,
            "UPDATE apikeys SET secret_hash = ?, key_prefix = ?, last_update_utc = ?"
            " WHERE identifier = ?",
            (secret_hash, key_prefix, format_utc(now), identifier),
        )
    except Exception as e:
        if dialect.is_integrity_error(e):
            raise _same_secret(identifier) from e
        raise
    if cursor.rowcount == 0:
        raise NotFound("apikey", identifier)
    row = dialect.execute(
        cursor, f"SELECT {_KEY_COLUMNS} FROM apikeys WHERE identifier = ?", (identifier,)
    ).fetchone()
    return _api_key(row)


def delete_api_key(cursor: Cursor, dialect: SqlDialect, identifier: str) -> None:
    """Delete a key and what it used."""
    dialect.execute(cursor, "DELETE FROM apikeys WHERE identifier = ?", (identifier,))
    if cursor.rowcount == 0:
        raise NotFound("apikey", identifier)
    dialect.execute(cursor, "DELETE FROM apikey_usage WHERE key_id = ?", (identifier,))


# -- usage -------------------------------------------------------------------------------------

#: Longest key or model name kept in a usage row; a longer one is cut (no model name is as
#: long, and the gateway refuses longer ones before anything is counted).
MAX_USAGE_NAME = 1024
#: A count that fits a BIGINT column, with room to add.
MAX_COUNT = 2**62
#: No usage is older; an earlier ``since`` means this (before the year 1000 ``format_utc``
#: writes fewer digits, and text order would no longer be time order).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_ADD_USAGE = (
    "INSERT INTO apikey_usage (key_id, model, hour, requests, errors, prompt_tokens,"
    " completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (key_id, model, hour) DO UPDATE SET"
    " requests = apikey_usage.requests + excluded.requests,"
    " errors = apikey_usage.errors + excluded.errors,"
    " prompt_tokens = apikey_usage.prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = apikey_usage.completion_tokens + excluded.completion_tokens"
)


def hour_start(moment: datetime) -> datetime:
    """The start (UTC) of the hour that contains ``moment``: where usage is counted."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _usage_name(text: str) -> str:
    """``text`` as every database stores it: no NUL, no lone surrogate, bounded. One bad row
    must not fail the batch it came in (and lose every count with it)."""
    clean = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return clean[:MAX_USAGE_NAME]


#: One upsert's parameters: key, model, hour, requests, errors, prompt and completion tokens.
UsageParams = tuple[str, str, str, int, int, int, int]


def usage_batch(rows: Iterable[UsageRow]) -> list[UsageParams]:
    """The rows as parameters of one upsert each: one per (key, model, hour), counts summed,
    in key order (so that instances flushing at once lock rows in the same order, never in a
    deadlock). Raises :class:`ValueError` for a count that is not an integer in range."""
    merged: dict[tuple[str, str, str], list[int]] = {}
    for row in rows:
        counts = (row.requests, row.errors, row.prompt_tokens, row.completion_tokens)
        for count in counts:
            if type(count) is not int or not 0 <= count <= MAX_COUNT:
                raise ValueError(f"usage counts are integers from 0 to 2**62, not {count!r}")
        key = (_usage_name(row.key_id), _usage_name(row.model), format_utc(hour_start(row.hour)))
        total = merged.setdefault(key, [0, 0, 0, 0])
        for i, count in enumerate(counts):
            total[i] += count
    return [
        (key_id, model, hour, *_capped(total))
        for (key_id, model, hour), total in sorted(merged.items())
    ]


def _capped(total: list[int]) -> tuple[int, int, int, int]:
    requests, errors, prompt_tokens, completion_tokens = (min(c, MAX_COUNT) for c in total)
    return requests, errors, prompt_tokens, completion_tokens


def add_usage(cursor: Cursor, dialect: SqlDialect, batch: Sequence[UsageParams]) -> None:
    """Add a :func:`usage_batch` to the stored counts, in one transaction. Usage is not
    configuration: no generation bump, no announcement, and not the configuration's lock."""
    dialect.execute(cursor, dialect.begin_write)
    for params in batch:
        dialect.execute(cursor, _ADD_USAGE, params)


def read_usage(
    cursor: Cursor, dialect: SqlDialect, key_id: str, since: datetime, limit: int
) -> list[UsageRow]:
    """What ``key_id`` used in the hours from the one containing ``since``, by hour then model,
    at most ``limit`` rows."""
    found = dialect.execute(
        cursor,
        "SELECT model, hour, requests, errors, prompt_tokens, completion_tokens"
        " FROM apikey_usage WHERE key_id = ? AND hour >= ?"
        f" ORDER BY hour, model{dialect.bytewise} LIMIT ?",
        (_usage_name(key_id), format_utc(max(hour_start(since), _EPOCH)), max(limit, 0)),
    ).fetchall()
    return [
        UsageRow(key_id, model, _parse_utc(hour), *(int(n) for n in counts))
        for model, hour, *counts in found
    ]
