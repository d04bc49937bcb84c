"""The schema, as an ordered list of migrations; version ``n`` is ``MIGRATIONS[n - 1]``.

Each migration is a sequence of statements (``{autoincrement}`` filled in by the dialect) or a
function of ``(cursor, dialect)``. The table ``schema_version`` holds one row per applied
migration. Record fields live in a JSON ``doc`` column, so new fields never need a migration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from ollamaflow.store.errors import SchemaTooNew
from ollamaflow.store.sql import Cursor, SqlDialect
from ollamaflow.utctime import format_utc

Migration = Sequence[str] | Callable[[Cursor, SqlDialect], None]

_RECORDS: tuple[str, ...] = (
    """CREATE TABLE frontends (
        seq {autoincrement},
        identifier TEXT NOT NULL UNIQUE,
        doc TEXT NOT NULL,
        created_utc TEXT NOT NULL,
        last_update_utc TEXT NOT NULL
    )""",
    """CREATE TABLE backends (
        seq {autoincrement},
        identifier TEXT NOT NULL UNIQUE,
        doc TEXT NOT NULL,
        created_utc TEXT NOT NULL,
        last_update_utc TEXT NOT NULL
    )""",
    # Version 3 drops the reference to backends (a frontend may name one not created yet).
    """CREATE TABLE frontend_backends (
        frontend_id TEXT NOT NULL REFERENCES frontends (identifier) ON DELETE CASCADE,
        backend_id TEXT NOT NULL REFERENCES backends (identifier) ON DELETE RESTRICT,
        position INTEGER NOT NULL,
        PRIMARY KEY (frontend_id, position),
        UNIQUE (frontend_id, backend_id)
    )""",
    "CREATE INDEX frontend_backends_backend ON frontend_backends (backend_id)",
)

# Bumped by every write transaction, so readers can tell which snapshot is newer.
_CONFIG_STATE: tuple[str, ...] = (
    """CREATE TABLE config_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        generation INTEGER NOT NULL
    )""",
    "INSERT INTO config_state (id, generation) VALUES (1, 0)",
)

# A frontend may name backends not created yet, as 1.2's did: the link table keeps its
# frontends' cascade but no longer refers to backends (deleting a listed backend is refused by
# the store, as before). Rebuilt, because SQLite cannot drop a constraint.
_LINKS_TO_ANY_BACKEND: tuple[str, ...] = (
    """CREATE TABLE frontend_backends_3 (
        frontend_id TEXT NOT NULL REFERENCES frontends (identifier) ON DELETE CASCADE,
        backend_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (frontend_id, position),
        UNIQUE (frontend_id, backend_id)
    )""",
    "INSERT INTO frontend_backends_3 (frontend_id, backend_id, position)"
    " SELECT frontend_id, backend_id, position FROM frontend_backends",
    "DROP TABLE frontend_backends",
    "ALTER TABLE frontend_backends_3 RENAME TO frontend_backends",
    "CREATE INDEX frontend_backends_backend ON frontend_backends (backend_id)",
)

# Clients' keys, like the other records (fields in ``doc``), with the secret's hash and shown
# prefix in columns of their own; and what each key used, counted per model and hour (``hour``:
# its start, written by ``format_utc``, so text order is time order). Counts are BIGINT: a busy
# key's tokens in an hour can pass 2**31.
_API_KEYS: tuple[str, ...] = (
    """CREATE TABLE apikeys (
        seq {autoincrement},
        identifier TEXT NOT NULL UNIQUE,
        doc TEXT NOT NULL,
        secret_hash TEXT NOT NULL UNIQUE,
        key_prefix TEXT NOT NULL,
        created_utc TEXT NOT NULL,
        last_update_utc TEXT NOT NULL
    )""",
    """CREATE TABLE apikey_usage (
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        hour TEXT NOT NULL,
        requests BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, model, hour)
    )""",
    "CREATE INDEX apikey_usage_by_hour ON apikey_usage (key_id, hour)",
)

MIGRATIONS: tuple[Migration, ...] = (
    _RECORDS,
    _CONFIG_STATE,
    _LINKS_TO_ANY_BACKEND,
    _API_KEYS,
)
LATEST = len(MIGRATIONS)

_VERSION_TABLE = """CREATE TABLE schema_version (
    version INTEGER PRIMARY KEY,
    applied_utc TEXT NOT NULL
)"""


def current_version(cursor: Cursor, dialect: SqlDialect) -> int:
    """The highest applied migration; 0 for a database without a ``schema_version`` table."""
    if not dialect.table_exists(cursor, "schema_version"):
        return 0
    row = dialect.execute(cursor, "SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def migrate(cursor: Cursor, dialect: SqlDialect, *, now: datetime, target: int = LATEST) -> int:
    """Apply the migrations after the current version up to ``target``; returns the version found.

    Call inside a write transaction (``dialect.begin_writing``) so that the check and the upgrade
    are one step, and (PostgreSQL) so that only one instance migrates while the others wait.
    Raises :class:`SchemaTooNew`, having changed nothing, when the database is newer than
    :data:`LATEST`.
    """
    if not 0 <= target <= LATEST:
        raise ValueError(f"target version {target} is not between 0 and {LATEST}")
    found = current_version(cursor, dialect)
    if found > LATEST:
        raise SchemaTooNew(found, LATEST, dialect.location_setting)
    if found < target and found == 0 and not dialect.table_exists(cursor, "schema_version"):
        dialect.execute(cursor, _VERSION_TABLE)
    for version in range(found + 1, target + 1):
        migration = MIGRATIONS[version - 1]
        if callable(migration):
            migration(cursor, dialect)
        else:
            for statement in migration:
                dialect.execute(cursor, dialect.ddl(statement))
        dialect.execute(
            cursor,
            "INSERT INTO schema_version (version, applied_utc) VALUES (?, ?)",
            (version, format_utc(now)),
        )
    return found
