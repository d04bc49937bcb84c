"""The configuration store on real databases, every test on both a SQLite file and a fresh
PostgreSQL database (the server on this machine; unreachable = failed, never skipped): schema,
seeding, writes and their failures."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import attrs
import psycopg
import pytest
import pytest_twisted
from harness import create_postgresql_database, drop_postgresql_database
from logcapture import keeping
from twisted.internet import reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ollamaflow.apikeys import hash_secret, new_secret, shown
from ollamaflow.catalog import Catalog, Registry
from ollamaflow.records import ApiKey, Backend, Frontend, LoadBalancing, UsageRow
from ollamaflow.store import (
    POSTGRESQL,
    SCHEMA_VERSION,
    SQLITE,
    BackendInUse,
    DuplicateIdentifier,
    InvalidRecord,
    InvalidStoredRecord,
    NotFound,
    SchemaTooNew,
    Snapshot,
    SqlDialect,
    Store,
    StoreClosed,
    postgresql_conninfo,
    prepare_postgresql,
    prepare_sqlite,
)
from ollamaflow.store import rows as store_rows
from ollamaflow.store.migrations import current_version, migrate

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@attrs.define
class FakeNow:
    """A clock the test moves by hand."""

    current: datetime = T0

    def __call__(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> datetime:
        self.current += timedelta(seconds=seconds)
        return self.current


class Database(Protocol):
    """One database under test and how to reach it behind the store's back."""

    kind: str
    dialect: SqlDialect
    integrity_error: type[Exception]

    async def open(self, now: FakeNow) -> Store: ...

    def prepare(self, reactor: Any, now: FakeNow) -> tuple[Store, Snapshot]: ...

    def connect(self) -> Any:
        """A plain autocommit DB-API connection, foreign keys enforced."""

    def fingerprint(self) -> object:
        """Everything stored, to show that something left the database untouched."""


def rows(db: Database, sql: str) -> list[tuple[Any, ...]]:
    connection = db.connect()
    try:
        return [tuple(row) for row in db.dialect.execute(connection.cursor(), sql).fetchall()]
    finally:
        connection.close()


def execute(db: Database, sql: str, params: Sequence[Any] = ()) -> None:
    connection = db.connect()
    try:
        db.dialect.execute(connection.cursor(), sql, params)
    finally:
        connection.close()


@attrs.define
class SqliteDatabase:
    """A SQLite file in the test's folder."""

    path: Path
    kind = "sqlite"
    dialect = SQLITE
    integrity_error: type[Exception] = sqlite3.IntegrityError

    async def open(self, now: FakeNow) -> Store:
        return await Store.open_sqlite(str(self.path), reactor=reactor, now=now)

    def prepare(self, reactor: Any, now: FakeNow) -> tuple[Store, Snapshot]:
        return prepare_sqlite(str(self.path), reactor=reactor, now=now)

    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None)
        connection.execute("PRAGMA foreign_keys = ON")
        return connection

    def fingerprint(self) -> object:
        """The database file's bytes and the names of the files beside it."""
        return self.path.read_bytes(), sorted(p.name for p in self.path.parent.iterdir())


@attrs.define
class PostgresqlDatabase:
    """A fresh database on the test server, dropped after the test."""

    name: str
    url: str
    kind = "postgresql"
    dialect = POSTGRESQL
    integrity_error: type[Exception] = psycopg.IntegrityError

    @property
    def conninfo(self) -> str:
        return postgresql_conninfo(self.url)

    async def open(self, now: FakeNow) -> Store:
        return await Store.open_postgresql(self.conninfo, reactor=reactor, now=now)

    def prepare(self, reactor: Any, now: FakeNow) -> tuple[Store, Snapshot]:
        return prepare_postgresql(self.conninfo, reactor=reactor, now=now)

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def fingerprint(self) -> object:
        """Every table with all its rows (PostgreSQL has no file to compare)."""
        connection = self.connect()
        try:
            tables = [
                row[0]
                for row in connection.execute(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema() ORDER BY table_name"
                ).fetchall()
            ]
            return {
                t: connection.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables
            }
        finally:
            connection.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The same suite on each database the store supports."""
    if request.param == "sqlite":
        yield SqliteDatabase(tmp_path / "ollamaflow.db")
        return
    name, url = create_postgresql_database()
    try:
        yield PostgresqlDatabase(name, url)
    finally:
        drop_postgresql_database(name)


#: For the few tests about SQLite itself (its file, its pragmas).
sqlite_only = pytest.mark.parametrize("db", ["sqlite"], indirect=True)


@attrs.define
class Opener:
    """Opens stores on one database and remembers them, so the fixture closes every one."""

    db: Database
    now: FakeNow
    opened: list[Store] = attrs.field(factory=list)

    async def __call__(self) -> Store:
        store = await self.db.open(self.now)
        self.opened.append(store)
        return store

    async def reopen(self, store: Store) -> Store:
        await store.close()
        return await self()


@pytest.fixture
def now() -> FakeNow:
    return FakeNow()


@pytest_twisted.async_yield_fixture
async def opener(db: Database, now: FakeNow) -> AsyncIterator[Opener]:
    opened = Opener(db, now)
    yield opened
    for store in opened.opened:
        await store.close()


@pytest_twisted.async_fixture
async def store(opener: Opener) -> Store:
    return await opener()


def ids(records: tuple[Frontend, ...] | tuple[Backend, ...]) -> list[str]:
    return [r.identifier for r in records]


async def add_backends(store: Store, *identifiers: str) -> None:
    for identifier in identifiers:
        await store.create_backend(Backend(identifier=identifier))


# -- opening, seeding, connection setup ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_new_database_is_seeded_once(store: Store, opener: Opener) -> None:
    snap = await store.snapshot()
    assert ids(snap.frontends) == ["frontend1"] and ids(snap.backends) == ["backend1"]
    fe, be = snap.frontends[0], snap.backends[0]
    assert (fe.hostname, fe.backends) == ("*", ("backend1",))
    assert (be.hostname, be.port, be.base_url) == ("localhost", 11434, "http://localhost:11434")
    assert fe.created_utc == fe.last_update_utc == be.created_utc == T0

    again = await (await opener.reopen(store)).snapshot()
    assert again == snap, "reopening neither reseeds nor duplicates"


@pytest_twisted.ensureDeferred
async def test_deleted_seeds_stay_deleted_after_a_restart(store: Store, opener: Opener) -> None:
    await store.delete_frontend("frontend1")
    await store.delete_backend("backend1")
    snap = await (await opener.reopen(store)).snapshot()
    assert (snap.frontends, snap.backends) == ((), ())


@sqlite_only
@pytest_twisted.ensureDeferred
async def test_connections_use_wal_foreign_keys_and_a_busy_timeout(store: Store) -> None:
    def pragmas(cursor: Any) -> tuple[Any, ...]:
        values = []
        for name in ("journal_mode", "foreign_keys", "busy_timeout"):
            cursor.execute(f"PRAGMA {name}")
            values.append(cursor.fetchone()[0])
        return tuple(values)

    assert await store._pool.runInteraction(pragmas) == ("wal", 1, 5000)


@pytest_twisted.ensureDeferred
async def test_the_schema_is_at_the_latest_version(store: Store, db: Database) -> None:
    assert SCHEMA_VERSION == 4
    versions = rows(db, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(1,), (2,), (3,), (4,)]


@pytest_twisted.ensureDeferred
async def test_a_closed_store_refuses_work(store: Store) -> None:
    await store.close()
    await store.close()  # twice is harmless
    with pytest.raises(StoreClosed):
        await store.snapshot()


# -- frontends -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_frontend_stamps_and_stores_every_field(store: Store, now: FakeNow) -> None:
    await add_backends(store, "gpu1", "gpu2")
    t1 = now.advance(10)
    fe = Frontend(
        identifier="chat",
        name="Chat",
        hostname="chat.example.com",
        load_balancing=LoadBalancing.RANDOM,
        backends=("gpu2", "gpu1"),
        required_models=("llama3:8b",),
        pinned_completions_properties={"options": {"num_ctx": 8192}},
        created_utc=T0 - timedelta(days=9),  # ignored: the store stamps its own times
    )
    stored = await store.create_frontend(fe)
    assert stored == attrs.evolve(fe, created_utc=t1, last_update_utc=t1)
    snap = await store.snapshot()
    assert ids(snap.frontends) == ["frontend1", "chat"]
    assert snap.frontends[1] == stored


@pytest_twisted.ensureDeferred
async def test_replace_frontend_keeps_created_and_moves_last_update(
    store: Store, now: FakeNow
) -> None:
    await add_backends(store, "gpu1")
    created = await store.create_frontend(Frontend(identifier="chat", backends=("backend1",)))
    t2 = now.advance(60)
    replaced = await store.replace_frontend(
        Frontend(identifier="chat", hostname="chat.local", backends=("gpu1", "backend1"))
    )
    assert replaced.created_utc == created.created_utc and replaced.last_update_utc == t2
    assert (replaced.hostname, replaced.backends) == ("chat.local", ("gpu1", "backend1"))
    snap = await store.snapshot()
    assert snap.frontends[-1] == replaced
    assert ids(snap.frontends) == ["frontend1", "chat"], "replacing keeps creation order"


@pytest_twisted.ensureDeferred
async def test_delete_frontend(store: Store, db: Database) -> None:
    await store.delete_frontend("frontend1")
    snap = await store.snapshot()
    assert snap.frontends == () and ids(snap.backends) == ["backend1"]
    assert rows(db, "SELECT * FROM frontend_backends") == [], "links go with the frontend"


@pytest_twisted.ensureDeferred
async def test_a_duplicate_frontend_is_refused(store: Store) -> None:
    with pytest.raises(DuplicateIdentifier) as caught:
        await store.create_frontend(Frontend(identifier="frontend1", hostname="other"))
    assert (caught.value.kind, caught.value.identifier) == ("frontend", "frontend1")
    assert "frontend1" in str(caught.value) and "already exists" in str(caught.value)
    assert (await store.snapshot()).frontends[0].hostname == "*"


@pytest_twisted.ensureDeferred
async def test_a_frontend_may_name_backends_not_created_yet(store: Store, db: Database) -> None:
    """As in 1.2, whose own examples create the frontend first; they keep their place."""
    created = await store.create_frontend(
        Frontend(identifier="chat", backends=("nope1", "backend1", "nope2"))
    )
    assert created.backends == ("nope1", "backend1", "nope2")
    await store.replace_frontend(Frontend(identifier="frontend1", backends=("ghost",)))
    snap = await store.snapshot()
    assert [fe.backends for fe in snap.frontends] == [("ghost",), ("nope1", "backend1", "nope2")]
    assert ids(snap.backends) == ["backend1"]
    await store.create_backend(Backend(identifier="nope2"))
    assert (await store.snapshot()).frontends[1].backends == ("nope1", "backend1", "nope2")
    with pytest.raises(BackendInUse):
        await store.delete_backend("nope2")
    assert await store.delete_backend("nope2", force=True) == ("chat",)
    snap = await store.snapshot()
    assert snap.frontends[1].backends == ("nope1", "backend1"), "forced out; the missing stay"


@pytest_twisted.ensureDeferred
async def test_replace_or_delete_of_a_missing_record_is_not_found(store: Store) -> None:
    before = await store.snapshot()
    with pytest.raises(NotFound) as caught:
        await store.replace_frontend(Frontend(identifier="ghost"))
    assert (caught.value.kind, caught.value.identifier) == ("frontend", "ghost")
    assert str(caught.value) == "frontend 'ghost' does not exist"
    with pytest.raises(NotFound):
        await store.delete_frontend("ghost")
    with pytest.raises(NotFound) as caught:
        await store.replace_backend(Backend(identifier="ghost"))
    assert caught.value.kind == "backend"
    with pytest.raises(NotFound):
        await store.delete_backend("ghost")
    with pytest.raises(NotFound):
        await store.delete_backend("ghost", force=True)
    assert await store.snapshot() == before


# -- backends --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_backend_create_replace_delete(store: Store, now: FakeNow) -> None:
    t1 = now.advance(1)
    be = Backend(
        identifier="gpu1",
        hostname="10.0.0.5",
        ssl=True,
        labels=("a100",),
        headers={"X-Key": "v"},
        bearer_token="secret",
    )
    created = await store.create_backend(be)
    assert created == attrs.evolve(be, created_utc=t1, last_update_utc=t1)
    assert (await store.snapshot()).backends[-1] == created

    t2 = now.advance(1)
    replaced = await store.replace_backend(Backend(identifier="gpu1", port=8080))
    assert (replaced.created_utc, replaced.last_update_utc, replaced.port) == (t1, t2, 8080)
    assert replaced.bearer_token is None and replaced.hostname == "localhost", "a full replace"
    assert (await store.snapshot()).backends[-1] == replaced

    assert await store.delete_backend("gpu1") == ()
    assert ids((await store.snapshot()).backends) == ["backend1"]


@pytest_twisted.ensureDeferred
async def test_a_duplicate_backend_is_refused(store: Store) -> None:
    with pytest.raises(DuplicateIdentifier) as caught:
        await store.create_backend(Backend(identifier="backend1", port=1))
    assert caught.value.kind == "backend"
    assert (await store.snapshot()).backends[0].port == 11434


@pytest_twisted.ensureDeferred
async def test_deleting_a_backend_in_use_names_the_frontends(store: Store) -> None:
    await store.create_frontend(Frontend(identifier="chat", backends=("backend1",)))
    await store.create_frontend(Frontend(identifier="idle"))
    before = await store.snapshot()
    with pytest.raises(BackendInUse) as caught:
        await store.delete_backend("backend1")
    assert caught.value.identifier == "backend1"
    assert caught.value.frontends == ("frontend1", "chat")
    assert "'frontend1', 'chat'" in str(caught.value) and "force" in str(caught.value)
    assert await store.snapshot() == before


@pytest_twisted.ensureDeferred
async def test_force_removes_the_backend_from_its_frontends(store: Store, now: FakeNow) -> None:
    await add_backends(store, "a", "c")
    await store.create_frontend(Frontend(identifier="chat", backends=("a", "backend1", "c")))
    await store.create_frontend(Frontend(identifier="other", backends=("c",)))
    t2 = now.advance(5)
    assert await store.delete_backend("backend1", force=True) == ("frontend1", "chat")
    snap = await store.snapshot()
    by_id = {fe.identifier: fe for fe in snap.frontends}
    assert by_id["frontend1"].backends == () and by_id["chat"].backends == ("a", "c")
    assert by_id["frontend1"].last_update_utc == by_id["chat"].last_update_utc == t2
    assert by_id["other"].last_update_utc == T0, "untouched frontends keep their time"
    assert by_id["chat"].created_utc == T0
    assert ids(snap.backends) == ["a", "c"]
    assert snap.generation == (await store.generation())


# -- generation and snapshots ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_write_bumps_the_generation_and_failures_do_not(store: Store) -> None:
    generations = [(await store.snapshot()).generation]

    async def expect_bump() -> None:
        generations.append(await store.generation())
        assert generations[-1] == generations[-2] + 1

    async def expect_same() -> None:
        assert await store.generation() == generations[-1]

    await store.create_backend(Backend(identifier="b2"))
    await expect_bump()
    await store.replace_backend(Backend(identifier="b2", port=1))
    await expect_bump()
    await store.create_frontend(Frontend(identifier="f2", backends=("b2",)))
    await expect_bump()
    await store.replace_frontend(Frontend(identifier="f2"))
    await expect_bump()
    await store.delete_frontend("f2")
    await expect_bump()
    await store.delete_backend("b2")
    await expect_bump()
    for failing in (
        store.create_backend(Backend(identifier="backend1")),
        store.replace_frontend(Frontend(identifier="nobody")),
        store.delete_backend("backend1"),
        store.delete_frontend("ghost"),
    ):
        with pytest.raises(Exception):  # noqa: B017 - each kind is checked elsewhere
            await failing
        await expect_same()
    assert (await store.snapshot()).generation == generations[-1]


@pytest_twisted.ensureDeferred
async def test_snapshots_list_records_in_creation_order(store: Store) -> None:
    await add_backends(store, "zz", "aa", "mm")
    await store.replace_backend(Backend(identifier="zz", port=2))
    await store.delete_backend("aa")
    await store.create_backend(Backend(identifier="aa"))
    snap = await store.snapshot()
    assert ids(snap.backends) == ["backend1", "zz", "mm", "aa"]
    assert isinstance(snap, Snapshot)


@pytest_twisted.ensureDeferred
async def test_a_restart_keeps_everything(store: Store, opener: Opener, now: FakeNow) -> None:
    now.advance(3)
    await add_backends(store, "gpu1")
    await store.create_frontend(
        Frontend(identifier="chat", backends=("gpu1", "backend1"), timeout_ms=5)
    )
    await store.replace_backend(Backend(identifier="backend1", hostname="ollama.lan"))
    before = await store.snapshot()
    reopened = await opener.reopen(store)
    assert await reopened.snapshot() == before
    await reopened.create_backend(Backend(identifier="later"))
    assert (await reopened.snapshot()).generation == before.generation + 1


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_file_see_and_respect_each_other(
    store: Store, opener: Opener
) -> None:
    other = await opener()
    await add_backends(store, "one")
    with pytest.raises(DuplicateIdentifier):
        await other.create_backend(Backend(identifier="one"))
    await other.create_frontend(Frontend(identifier="f", backends=("one",)))
    with pytest.raises(BackendInUse):
        await store.delete_backend("one")
    assert await store.snapshot() == await other.snapshot()


@pytest_twisted.ensureDeferred
async def test_stored_documents_ignore_keys_of_removed_fields(store: Store, db: Database) -> None:
    if db.kind == "sqlite":
        execute(db, "UPDATE backends SET doc = json_set(doc, '$.RetiredField', 1, '$.Port', 8000)")
    else:
        patch = '{"RetiredField": 1, "Port": 8000}'
        execute(db, f"UPDATE backends SET doc = (doc::jsonb || '{patch}')::text")
    be = (await store.snapshot()).backends[0]
    assert be.port == 8000


# -- failures leave nothing behind ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_failure_mid_transaction_leaves_no_rows(
    store: Store, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await store.snapshot()

    def fail(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store_rows, "_write_links", fail)
    with pytest.raises(RuntimeError):
        await store.create_frontend(Frontend(identifier="half", backends=("backend1",)))
    with pytest.raises(RuntimeError):
        await store.replace_frontend(Frontend(identifier="frontend1", hostname="half"))
    with pytest.raises(RuntimeError):
        await store.delete_backend("backend1", force=True)
    monkeypatch.undo()

    assert await store.snapshot() == before
    assert rows(db, "SELECT identifier FROM frontends") == [("frontend1",)]
    assert rows(db, "SELECT identifier FROM backends") == [("backend1",)]


@pytest_twisted.ensureDeferred
async def test_the_database_drops_a_deleted_frontends_links_and_allows_missing_backends(
    store: Store, db: Database
) -> None:
    execute(
        db,
        "INSERT INTO frontend_backends (frontend_id, backend_id, position)"
        " VALUES ('frontend1', 'ghost', 1)",
    )
    with pytest.raises(db.integrity_error):
        execute(
            db,
            "INSERT INTO frontend_backends (frontend_id, backend_id, position)"
            " VALUES ('nobody', 'backend1', 0)",
        )
    execute(db, "DELETE FROM frontends WHERE identifier = 'frontend1'")
    assert rows(db, "SELECT * FROM frontend_backends") == []


# -- API keys ----------------------------------------------------------------------------------


def with_secret(key: ApiKey, secret: str | None = None) -> tuple[ApiKey, str]:
    """``key`` carrying a (new) secret's hash and prefix, as the admin API makes it; and the
    secret."""
    secret = secret or new_secret()
    return attrs.evolve(key, secret_hash=hash_secret(secret), key_prefix=shown(secret)), secret


@pytest_twisted.ensureDeferred
async def test_an_api_key_is_stored_with_its_secret_hashed_and_survives_a_restart(
    store: Store, db: Database, opener: Opener, now: FakeNow
) -> None:
    t1 = now.advance(7)
    key, secret = with_secret(
        ApiKey(
            identifier="team-a",
            name="Team A",
            expires_utc=T0 + timedelta(days=30),
            frontends=("frontend1",),
            models=("llama3*", "all-minilm"),
            requests_per_minute=60,
            priority=5,
        )
    )
    created = await store.create_api_key(key)
    assert created == attrs.evolve(key, created_utc=t1, last_update_utc=t1)
    snapshot = await store.snapshot()
    assert snapshot.api_keys == (created,)
    assert snapshot.api_keys[0].secret_hash == hash_secret(secret)
    assert snapshot.api_keys[0].key_prefix == secret[:12]

    [stored_row] = rows(db, "SELECT * FROM apikeys")
    assert not any(secret in str(column) for column in stored_row), "only the hash is stored"
    assert not any(secret[12:20] in str(column) for column in stored_row)
    [(doc,)] = rows(db, "SELECT doc FROM apikeys")
    assert "KeyPrefix" not in doc and "Identifier" not in doc and "secret" not in doc.lower()
    assert '"RequestsPerMinute":60' in doc

    again = await (await opener.reopen(store)).snapshot()
    assert again.api_keys == (created,)


@pytest_twisted.ensureDeferred
async def test_replace_keeps_the_secret_and_rotate_keeps_the_record(
    store: Store, now: FakeNow
) -> None:
    created = await store.create_api_key(with_secret(ApiKey(identifier="k", priority=1))[0])
    generation = await store.generation()

    t2 = now.advance(5)
    replaced = await store.replace_api_key(ApiKey(identifier="k", name="renamed"))
    assert (replaced.name, replaced.priority) == ("renamed", 0), "a full replace"
    assert (replaced.secret_hash, replaced.key_prefix) == (created.secret_hash, created.key_prefix)
    assert (replaced.created_utc, replaced.last_update_utc) == (T0, t2)
    assert (await store.snapshot()).api_keys == (replaced,)

    t3 = now.advance(5)
    secret = new_secret()
    rotated = await store.rotate_api_key("k", hash_secret(secret), shown(secret))
    assert rotated == attrs.evolve(
        replaced, secret_hash=hash_secret(secret), key_prefix=shown(secret), last_update_utc=t3
    )
    assert rotated.secret_hash != created.secret_hash
    assert (await store.snapshot()).api_keys == (rotated,)
    assert await store.generation() == generation + 2, "each write bumps the generation"


@pytest_twisted.ensureDeferred
async def test_deleting_a_key_deletes_its_usage_and_nothing_else(
    store: Store, db: Database
) -> None:
    for name in ("a", "b"):
        await store.create_api_key(with_secret(ApiKey(identifier=name))[0])
    hour = datetime(2025, 1, 2, 3, tzinfo=UTC)
    await store.add_usage(
        [UsageRow("a", "llama3", hour, requests=1), UsageRow("b", "llama3", hour, requests=2)]
    )
    await store.delete_api_key("a")
    assert [k.identifier for k in (await store.snapshot()).api_keys] == ["b"]
    assert rows(db, "SELECT key_id, requests FROM apikey_usage") == [("b", 2)]
    with pytest.raises(NotFound) as caught:
        await store.delete_api_key("a")
    assert str(caught.value) == "API key 'a' does not exist"


@pytest_twisted.ensureDeferred
async def test_api_key_writes_that_are_refused_leave_everything_as_it_was(
    store: Store, db: Database
) -> None:
    key, _ = with_secret(ApiKey(identifier="k"))
    await store.create_api_key(key)
    other = await store.create_api_key(with_secret(ApiKey(identifier="other"))[0])
    before = db.fingerprint()
    with pytest.raises(DuplicateIdentifier) as duplicate:
        await store.create_api_key(with_secret(ApiKey(identifier="k"))[0])
    assert str(duplicate.value) == "an API key with identifier 'k' already exists"
    with pytest.raises(InvalidRecord, match="same secret"):
        await store.create_api_key(attrs.evolve(key, identifier="third"))
    for reserved in ("anonymous", "admin", "Admin"):
        with pytest.raises(InvalidRecord, match="reserved"):
            await store.create_api_key(with_secret(ApiKey(identifier=reserved))[0])
    for bad_hash in ("", "0" * 63, "A" * 64, hash_secret("x") + "0"):
        with pytest.raises(InvalidRecord, match="hash") as caught:
            await store.create_api_key(attrs.evolve(key, identifier="new", secret_hash=bad_hash))
        assert bad_hash not in str(caught.value) or not bad_hash
        with pytest.raises(InvalidRecord, match="hash"):
            await store.rotate_api_key("k", bad_hash, "ofk_12345678")
    with pytest.raises(InvalidRecord, match="KeyPrefix"):
        await store.rotate_api_key("k", hash_secret("y"), "with space")
    with pytest.raises(InvalidRecord, match="same secret"):
        await store.rotate_api_key("k", other.secret_hash, "ofk_same")
    with pytest.raises(InvalidRecord, match="Models"):
        await store.replace_api_key(ApiKey(identifier="k", models=("llama 3",)))
    for missing in (
        store.replace_api_key(ApiKey(identifier="ghost")),
        store.rotate_api_key("ghost", hash_secret("z"), "ofk_ghost"),
        store.delete_api_key("ghost"),
    ):
        with pytest.raises(NotFound):
            await missing
    assert db.fingerprint() == before


@pytest_twisted.ensureDeferred
async def test_a_stored_key_that_does_not_load_is_left_out_until_replaced(
    store: Store, db: Database
) -> None:
    key, _ = with_secret(ApiKey(identifier="k"))
    await store.create_api_key(key)
    await store.create_api_key(with_secret(ApiKey(identifier="fine"))[0])
    execute(db, "UPDATE apikeys SET doc = '{\"Priority\": 5000}' WHERE identifier = 'k'")
    snapshot = await store.snapshot()
    assert [k.identifier for k in snapshot.api_keys] == ["fine"]
    [left_out] = snapshot.left_out
    assert (left_out.kind, left_out.identifier) == ("apikey", "k")
    assert left_out.reason.startswith("Priority: 5000 is not allowed")
    before = db.fingerprint()
    with pytest.raises(InvalidStoredRecord):
        await store.rotate_api_key("k", hash_secret("new"), "ofk_new")
    assert db.fingerprint() == before, "rotation rolled back"
    replaced = await store.replace_api_key(ApiKey(identifier="k", priority=9))
    assert replaced.secret_hash == key.secret_hash
    snapshot = await store.snapshot()
    assert snapshot.left_out == () and [k.priority for k in snapshot.api_keys] == [9, 0]


@pytest_twisted.ensureDeferred
async def test_the_registry_publishes_every_key_change(store: Store) -> None:
    registry = Registry(store, Catalog.build(await store.snapshot()))
    assert registry.catalog.api_keys == {}
    created = await registry.create_api_key(with_secret(ApiKey(identifier="k"))[0])
    assert registry.catalog.api_keys == {"k": created}
    replaced = await registry.replace_api_key(ApiKey(identifier="k", active=False))
    assert registry.catalog.api_keys == {"k": replaced}
    assert replaced.secret_hash == created.secret_hash, "inactive, and still its secret"
    rotated = await registry.rotate_api_key("k", hash_secret("s2"), "ofk_s2")
    assert registry.catalog.api_keys == {"k": rotated} and rotated.secret_hash == hash_secret("s2")
    await registry.delete_api_key("k")
    assert registry.catalog.api_keys == {}


# -- usage -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_key_created_again_under_an_identifier_starts_with_no_usage(
    store: Store,
) -> None:
    """Counts written after its delete (a flush already under way, another instance) must not
    become the usage of a new key that takes the identifier."""
    hour = datetime(2025, 1, 2, 3, tzinfo=UTC)
    await store.create_api_key(with_secret(ApiKey(identifier="a"))[0])
    await store.delete_api_key("a")
    await store.add_usage([UsageRow("a", "llama3", hour, requests=5)])
    await store.create_api_key(with_secret(ApiKey(identifier="a"))[0])
    assert await store.read_usage("a", hour, 100) == []


H0 = datetime(2025, 1, 2, 3, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest_twisted.ensureDeferred
async def test_add_usage_accumulates_and_bumps_no_generation(store: Store) -> None:
    generation = await store.generation()
    await store.add_usage(
        [
            UsageRow("k", "llama3", H0, requests=1, prompt_tokens=10, completion_tokens=20),
            UsageRow("k", "llama3", H0 + timedelta(minutes=59), requests=1, errors=1),
            UsageRow("k", "llama3", H0 + HOUR, requests=4),
        ]
    )
    await store.add_usage(
        [UsageRow("k", "llama3", H0, requests=2, prompt_tokens=5, completion_tokens=2**40)]
    )
    await store.add_usage([])
    assert await store.read_usage("k", H0, 100) == [
        UsageRow("k", "llama3", H0, requests=4, errors=1, prompt_tokens=15,
                 completion_tokens=2**40 + 20),
        UsageRow("k", "llama3", H0 + HOUR, requests=4),
    ]  # fmt: skip
    assert await store.generation() == generation, "usage is not configuration"
    assert await store.read_usage("other", H0, 100) == []


@pytest_twisted.ensureDeferred
async def test_read_usage_starts_at_the_hour_containing_since_and_orders_by_hour_then_model(
    store: Store,
) -> None:
    models = ["b", "B", "a", "llama3:8b"]
    await store.add_usage(
        [UsageRow("k", m, H0 + i * HOUR, requests=1) for i in range(4) for m in models]
    )
    found = await store.read_usage("k", H0 + HOUR + timedelta(minutes=30), 100)
    expected_models = sorted(models)  # byte order, on every database: "B" < "a"
    assert [(r.hour, r.model) for r in found] == [
        (H0 + i * HOUR, m) for i in (1, 2, 3) for m in expected_models
    ]
    assert [(r.hour, r.model) for r in await store.read_usage("k", H0, 5)] == [
        (H0, "B"), (H0, "a"), (H0, "b"), (H0, "llama3:8b"), (H0 + HOUR, "B")
    ]  # fmt: skip
    assert await store.read_usage("k", H0 + 4 * HOUR, 100) == []
    assert len(await store.read_usage("k", datetime(1, 1, 1, tzinfo=UTC), 100)) == 16
    assert await store.read_usage("k", H0, 0) == []


@pytest_twisted.ensureDeferred
async def test_add_usage_is_all_or_nothing_and_stores_any_name(store: Store, db: Database) -> None:
    with pytest.raises(ValueError, match="usage counts"):
        await store.add_usage(
            [UsageRow("k", "m", H0, requests=1), UsageRow("k", "m", H0, errors=-1)]
        )
    with pytest.raises(ValueError):
        await store.add_usage([UsageRow("k", "m", H0, requests=True)])
    assert rows(db, "SELECT * FROM apikey_usage") == []
    # Names PostgreSQL would refuse (NUL) or no database can encode (a lone surrogate) must not
    # fail the batch with them.
    await store.add_usage(
        [
            UsageRow("k", "a\x00b", H0, requests=1),
            UsageRow("k", "\ud800", H0, requests=1),
            UsageRow("k", "x" * 5000, H0, requests=1),
            UsageRow("k", "llama3", H0, requests=1),
        ]
    )
    found = await store.read_usage("k", H0, 100)
    assert len(found) == 4 and all(r.requests == 1 for r in found)
    assert {len(r.model) for r in found} >= {1024, len("llama3")}


# -- migrations ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_version_1_database_is_migrated_with_its_rows(db: Database, opener: Opener) -> None:
    connection = db.connect()
    cursor = connection.cursor()
    db.dialect.begin_writing(cursor)
    assert migrate(cursor, db.dialect, now=T0, target=1) == 0
    stamp = "2020-01-01T00:00:00.000000Z"
    for sql, params in (
        (
            "INSERT INTO backends (identifier, doc, created_utc, last_update_utc)"
            " VALUES ('old', ?, ?, '2021-01-01T00:00:00.000000Z')",
            ('{"Hostname":"gpu.lan","Port":1234}', stamp),
        ),
        (
            "INSERT INTO frontends (identifier, doc, created_utc, last_update_utc)"
            " VALUES ('fe', '{\"Hostname\":\"*\"}', ?, ?)",
            (stamp, stamp),
        ),
        ("INSERT INTO frontend_backends VALUES ('fe', 'old', 0)", ()),
        ("COMMIT", ()),
    ):
        db.dialect.execute(cursor, sql, params)
    assert current_version(connection.cursor(), db.dialect) == 1
    connection.close()

    store = await opener()
    assert rows(db, "SELECT MAX(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    snap = await store.snapshot()
    assert snap.generation == 0 and await store.generation() == 0
    assert ids(snap.frontends) == ["fe"] and ids(snap.backends) == ["old"], "no seeding"
    old = snap.backends[0]
    assert (old.hostname, old.port) == ("gpu.lan", 1234)
    assert old.created_utc == datetime(2020, 1, 1, tzinfo=UTC)
    assert old.last_update_utc == datetime(2021, 1, 1, tzinfo=UTC)
    assert snap.frontends[0].backends == ("old",)
    await store.create_backend(Backend(identifier="new"))
    assert await store.generation() == 1
    await store.replace_frontend(Frontend(identifier="fe", backends=("old", "later")))
    assert (await store.snapshot()).frontends[0].backends == ("old", "later"), (
        "version 3: a frontend may name a backend not created yet"
    )
    with pytest.raises(BackendInUse):
        await store.delete_backend("old")


@pytest_twisted.ensureDeferred
async def test_a_newer_schema_is_refused_and_left_untouched(
    store: Store, db: Database, opener: Opener
) -> None:
    await store.close()
    execute(db, "INSERT INTO schema_version VALUES (7, '2030-01-01T00:00:00.000000Z')")
    before = db.fingerprint()

    with pytest.raises(SchemaTooNew) as caught:
        await opener()
    assert (caught.value.found, caught.value.supported) == (7, SCHEMA_VERSION)
    setting = {"sqlite": "DatabaseFilename", "postgresql": "Database"}[db.kind]
    assert str(caught.value) == (
        "database schema version 7 is newer than this OllamaFlow supports (4);"
        f" upgrade OllamaFlow or use another {setting}"
    )
    assert db.fingerprint() == before


def test_migrate_refuses_a_target_it_does_not_know(db: Database) -> None:
    connection = db.connect()
    with pytest.raises(ValueError, match="target version 5"):
        migrate(connection.cursor(), db.dialect, now=T0, target=SCHEMA_VERSION + 1)
    connection.close()


@pytest_twisted.ensureDeferred
async def test_a_version_3_database_gains_api_keys_and_keeps_its_records(
    db: Database, opener: Opener
) -> None:
    connection = db.connect()
    cursor = connection.cursor()
    db.dialect.begin_writing(cursor)
    assert migrate(cursor, db.dialect, now=T0, target=3) == 0
    stamp = "2020-01-01T00:00:00.000000Z"
    db.dialect.execute(cursor, "UPDATE config_state SET generation = 41")
    for table, doc in (("backends", '{"Port":1234}'), ("frontends", '{"Hostname":"fe.lan"}')):
        db.dialect.execute(
            cursor,
            f"INSERT INTO {table} (identifier, doc, created_utc, last_update_utc)"
            " VALUES ('old', ?, ?, ?)",
            (doc, stamp, stamp),
        )
    db.dialect.execute(cursor, "INSERT INTO frontend_backends VALUES ('old', 'gone', 0)")
    db.dialect.execute(cursor, "COMMIT")
    connection.close()

    store = await opener()
    assert rows(db, "SELECT MAX(version) FROM schema_version") == [(4,)]
    snapshot = await store.snapshot()
    assert snapshot.generation == 41 and snapshot.api_keys == () and snapshot.left_out == ()
    assert [(b.identifier, b.port) for b in snapshot.backends] == [("old", 1234)]
    [fe] = snapshot.frontends
    assert (fe.identifier, fe.hostname, fe.backends) == ("old", "fe.lan", ("gone",))
    assert fe.require_api_key is False
    await store.create_api_key(with_secret(ApiKey(identifier="k"))[0])
    await store.add_usage([UsageRow("k", "m", H0, requests=1)])
    assert [k.identifier for k in (await store.snapshot()).api_keys] == ["k"]


# -- opening before the reactor runs (twistd's makeService) ----------------------------------


class NotYetRunning:
    """The real reactor, claiming not to run yet, as during ``makeService``."""

    running = False

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest_twisted.ensureDeferred
async def test_prepare_migrates_seeds_and_reads_before_the_reactor_runs(
    db: Database, now: FakeNow
) -> None:
    store, snapshot = db.prepare(NotYetRunning(reactor), now)
    try:
        assert ids(snapshot.frontends) == ["frontend1"] and ids(snapshot.backends) == ["backend1"]
        assert await store.snapshot() == snapshot
        await store.create_backend(Backend(identifier="gpu1"))
    finally:
        await store.close()
    store, again = db.prepare(NotYetRunning(reactor), now)
    await store.close()
    assert ids(again.backends) == ["backend1", "gpu1"] and again.generation == 2


@pytest_twisted.ensureDeferred
async def test_prepare_refuses_a_newer_schema_and_a_running_reactor(
    db: Database, now: FakeNow
) -> None:
    store, _ = db.prepare(NotYetRunning(reactor), now)
    await store.close()
    newer = SCHEMA_VERSION + 1
    execute(db, f"INSERT INTO schema_version VALUES ({newer}, '2030-01-01T00:00:00.000000Z')")
    before = db.fingerprint()
    with pytest.raises(SchemaTooNew):
        db.prepare(NotYetRunning(reactor), now)
    assert db.fingerprint() == before
    with pytest.raises(RuntimeError, match=f"open_{db.kind}"):
        db.prepare(reactor, now)


@pytest_twisted.ensureDeferred
async def test_a_stored_row_that_no_longer_parses_is_named_and_left_out(
    store: Store, db: Database
) -> None:
    await store.create_backend(Backend(identifier="gpu1", port=8000))
    await store.replace_frontend(Frontend(identifier="frontend1", backends=("backend1", "gpu1")))
    execute(db, "UPDATE backends SET doc = '{\"Port\": 0}' WHERE identifier = 'backend1'")
    snapshot = await store.snapshot()
    assert ids(snapshot.backends) == ["gpu1"], "the rest is served"
    assert snapshot.frontends[0].backends == ("backend1", "gpu1"), "still listed"
    [left_out] = snapshot.left_out
    assert isinstance(left_out, InvalidStoredRecord)
    assert (left_out.kind, left_out.identifier) == ("backend", "backend1")
    assert left_out.reason.startswith("Port: 0 is not allowed; expected")
    assert "backend 'backend1'" in str(left_out)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("table", "doc", "mentions"),
    [
        ("frontends", '{"RequiredModels": ["llama 3"]}', "RequiredModels[0]"),
        (
            "frontends",
            '{"PinnedCompletionsProperties": {"t": NaN}}',
            "PinnedCompletionsProperties.t",
        ),
        ("frontends", "not json", "Expecting value"),
        ("frontends", "[1]", "not a JSON object"),
        ("frontends", "[" * 100_000 + "]" * 100_000, "deep"),
        ("backends", '{"Headers": {"Host": "x"}}', "Headers.Host"),
        ("backends", '{"Hostname": "a b"}', "Hostname"),
    ],
)
async def test_every_kind_of_unloadable_row_is_left_out(
    store: Store, db: Database, table: str, doc: str, mentions: str
) -> None:
    execute(db, f"UPDATE {table} SET doc = ?", (doc,))
    snapshot = await store.snapshot()
    [left_out] = snapshot.left_out
    assert left_out.kind == table[:-1] and mentions in left_out.reason
    assert ids(getattr(snapshot, table)) == []
    other = "backends" if table == "frontends" else "frontends"
    assert len(getattr(snapshot, other)) == 1


@pytest_twisted.ensureDeferred
async def test_a_left_out_record_is_repaired_by_replace_or_removed_by_delete(
    store: Store, db: Database
) -> None:
    execute(db, "UPDATE backends SET doc = '{\"Port\": 0}'")
    execute(db, 'UPDATE frontends SET doc = \'{"Hostname": "a b"}\'')
    assert ids((await store.snapshot()).backends) == []
    await store.replace_backend(Backend(identifier="backend1", port=8000))
    await store.replace_frontend(Frontend(identifier="frontend1", backends=("backend1",)))
    snapshot = await store.snapshot()
    assert snapshot.left_out == ()
    assert [be.port for be in snapshot.backends] == [8000] and ids(snapshot.frontends) == [
        "frontend1"
    ]
    execute(db, 'UPDATE frontends SET doc = \'{"Hostname": "a b"}\'')
    await store.delete_frontend("frontend1")
    snapshot = await store.snapshot()
    assert snapshot.left_out == () and snapshot.frontends == ()


@pytest_twisted.ensureDeferred
async def test_prepare_starts_with_a_bad_row_and_serves_the_rest(
    db: Database, now: FakeNow
) -> None:
    store, _ = db.prepare(NotYetRunning(reactor), now)
    await store.create_backend(Backend(identifier="gpu1"))
    await store.close()
    execute(db, "UPDATE backends SET doc = '{\"Port\": 0}' WHERE identifier = 'backend1'")
    store, snapshot = db.prepare(NotYetRunning(reactor), now)
    await store.close()
    assert ids(snapshot.backends) == ["gpu1"] and ids(snapshot.frontends) == ["frontend1"]
    assert [(e.kind, e.identifier) for e in snapshot.left_out] == [("backend", "backend1")]


# -- a record that could not be loaded back is never written ---------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("models", "field"),
    [
        (("llama3", "x" * 674), "RequiredModels[1]"),
        (("llama 3",), "RequiredModels[0]"),
        (("",), "RequiredModels[0]"),
        (tuple(f"m{i}" for i in range(1025)), "RequiredModels"),
    ],
    ids=["674-characters", "a-space", "empty", "1025-names"],
)
async def test_a_frontend_that_would_not_load_back_is_refused_before_commit(
    store: Store, db: Database, models: tuple[str, ...], field: str
) -> None:
    """Another code path (the gateway's /api/pull) evolves a frontend without validation."""
    registry = Registry(store, Catalog.build(await store.snapshot()))
    frontend = registry.catalog.frontends["frontend1"]
    before = db.fingerprint()
    with pytest.raises(InvalidRecord) as caught:
        await registry.replace_frontend(attrs.evolve(frontend, required_models=models))
    assert str(caught.value).startswith(f"{field}: ")
    assert "frontend 'frontend1'" in str(caught.value)
    assert db.fingerprint() == before, "nothing written, not even the generation"
    with pytest.raises(InvalidRecord):
        await store.create_frontend(Frontend(identifier="new", required_models=models))
    assert db.fingerprint() == before
    assert (await store.snapshot()).left_out == ()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"pinned_completions_properties": {"o": {"t": math.nan}}},
            "PinnedCompletionsProperties.o.t",
        ),
        ({"pinned_embeddings_properties": {"x": {1, 2}}}, "PinnedEmbeddingsProperties.x"),
        ({"headers": {"X-A": "1\r\nX-Evil: 2"}}, "Headers.X-A"),
        ({"hostname": "a\nb"}, "Hostname"),
        ({"identifier": "\ud800"}, "Identifier"),
        ({"identifier": ".."}, "Identifier"),
        ({"port": 10**5000}, "Port"),
        ({"labels": ["a b"]}, "Labels[0]"),
        ({"name": "\udfff"}, "Name"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_a_backend_that_would_not_load_back_is_refused_before_commit(
    store: Store, db: Database, change: dict[str, Any], field: str
) -> None:
    before = db.fingerprint()
    be = attrs.evolve(Backend(identifier="backend1"), **change)
    with pytest.raises(InvalidRecord) as caught:
        await store.replace_backend(be)
    assert str(caught.value).startswith(f"{field}: ")
    with pytest.raises(InvalidRecord):
        await store.create_backend(be)  # checked before the duplicate identifier
    assert db.fingerprint() == before


@pytest_twisted.ensureDeferred
async def test_the_registry_logs_each_left_out_record_once(store: Store, db: Database) -> None:
    execute(db, "UPDATE backends SET doc = '{\"Port\": 0}'")
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    try:
        registry = Registry(store, Catalog.build(await store.snapshot()))
        await registry.refresh()
        await registry.create_backend(Backend(identifier="gpu1"))
        first = left_out_warnings(events)
        execute(db, 'UPDATE frontends SET doc = \'{"Hostname": "a b"}\'')
        await registry.refresh()
        await registry.refresh()
        second = left_out_warnings(events)[len(first) :]
        await registry.replace_backend(Backend(identifier="backend1"))
        execute(db, "UPDATE backends SET doc = '{\"Port\": 0}' WHERE identifier = 'backend1'")
        await registry.refresh()
        third = left_out_warnings(events)[len(first) + len(second) :]
    finally:
        globalLogPublisher.removeObserver(observer)
    assert len(first) == 1 and "backend 'backend1'" in first[0] and "Port: 0" in first[0]
    assert len(second) == 1 and "frontend 'frontend1'" in second[0] and "Hostname" in second[0]
    assert len(third) == 1 and "backend 'backend1'" in third[0], "broken again: said again"
    assert list(registry.catalog.backends) == ["gpu1"]


def left_out_warnings(events: list[dict[str, Any]]) -> list[str]:
    return [
        formatEvent(e)
        for e in events
        if e.get("log_level") == LogLevel.warn and "left out" in formatEvent(e)
    ]
