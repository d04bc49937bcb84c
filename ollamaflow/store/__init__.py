"""The configuration store: frontends and backends in a SQL database (SQLite today)."""

from ollamaflow.store.dialect import SQLITE, Dialect
from ollamaflow.store.errors import (
    BackendInUse,
    DuplicateIdentifier,
    InvalidStoredRecord,
    NotFound,
    SchemaTooNew,
    StoreClosed,
    StoreError,
    UnknownBackends,
)
from ollamaflow.store.migrations import LATEST as SCHEMA_VERSION
from ollamaflow.store.store import Snapshot, Store

#: Synchronous opening for ``twistd``'s ``makeService``; see :meth:`Store.prepare_sqlite`.
prepare_sqlite = Store.prepare_sqlite

__all__ = [
    "SCHEMA_VERSION",
    "SQLITE",
    "BackendInUse",
    "Dialect",
    "DuplicateIdentifier",
    "InvalidStoredRecord",
    "NotFound",
    "SchemaTooNew",
    "Snapshot",
    "Store",
    "StoreClosed",
    "StoreError",
    "UnknownBackends",
    "prepare_sqlite",
]
