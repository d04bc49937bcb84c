"""The configuration store: frontends, backends and API keys in SQLite (the default) or
PostgreSQL, and what each key used."""

from ollamaflow.store.errors import (
    BackendInUse,
    DatabaseRefused,
    DriverMissing,
    DuplicateIdentifier,
    InvalidConnectionSettings,
    InvalidRecord,
    InvalidStoredRecord,
    NotFound,
    SchemaTooNew,
    StoreClosed,
    StoreError,
    StoreUnavailable,
)
from ollamaflow.store.migrations import LATEST as SCHEMA_VERSION
from ollamaflow.store.postgresql import Subscription, describe_postgresql, postgresql_conninfo
from ollamaflow.store.rows import Snapshot, hour_start
from ollamaflow.store.sql import POSTGRESQL, SQLITE, SqlDialect
from ollamaflow.store.store import DEFAULT_POOL_SIZE, Store

#: Synchronous opening for ``twistd``'s ``makeService``; see :meth:`Store.prepare_sqlite`.
prepare_sqlite = Store.prepare_sqlite
#: The same for PostgreSQL; see :meth:`Store.prepare_postgresql`.
prepare_postgresql = Store.prepare_postgresql

__all__ = [
    "DEFAULT_POOL_SIZE",
    "POSTGRESQL",
    "SCHEMA_VERSION",
    "SQLITE",
    "BackendInUse",
    "DatabaseRefused",
    "DriverMissing",
    "DuplicateIdentifier",
    "InvalidConnectionSettings",
    "InvalidRecord",
    "InvalidStoredRecord",
    "NotFound",
    "SchemaTooNew",
    "Snapshot",
    "SqlDialect",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreUnavailable",
    "Subscription",
    "describe_postgresql",
    "hour_start",
    "postgresql_conninfo",
    "prepare_postgresql",
    "prepare_sqlite",
]
