"""Several instances on one PostgreSQL database, against the real server on this machine.

The migration lock, NOTIFY on commit, the follower, two daemons seeing each other's changes,
and a database that goes away (connections killed, connections refused, a real restart) while
the proxy keeps routing. An unreachable server FAILS these tests; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import pytest_twisted
import treq
from harness import (
    Http,
    create_postgresql_database,
    drop_postgresql_database,
    postgresql_admin,
    start_daemon,
    until,
)
from logcapture import keeping
from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from ollamaflow.apikeys import hash_secret, shown
from ollamaflow.catalog import Catalog, Registry
from ollamaflow.daemon import Daemon
from ollamaflow.records import ApiKey, Backend, Frontend, UsageRow
from ollamaflow.services.follow import SERVICE_NAME, ConfigFollower
from ollamaflow.settings import SettingsError, load_settings
from ollamaflow.sim import RunningSimulator
from ollamaflow.store import (
    POSTGRESQL,
    SCHEMA_VERSION,
    DatabaseRefused,
    DuplicateIdentifier,
    Store,
    StoreError,
    StoreUnavailable,
    postgresql_conninfo,
    prepare_postgresql,
)
from ollamaflow.store.sql import POSTGRESQL_LOCK_KEY
from ollamaflow.tap import prepare_store

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def now() -> datetime:
    return T0


@attrs.frozen
class PgDatabase:
    """A fresh database on the test server."""

    name: str
    url: str

    @property
    def conninfo(self) -> str:
        return postgresql_conninfo(self.url)

    async def open(self, **kw: Any) -> Store:
        return await Store.open_postgresql(self.conninfo, reactor=reactor, now=now, **kw)

    def settings(self, **database: Any) -> dict[str, Any]:
        return {"Database": {"Driver": "postgresql", "Url": self.url, **database}}


@pytest.fixture
def pg() -> Iterator[PgDatabase]:
    name, url = create_postgresql_database()
    try:
        yield PgDatabase(name, url)
    finally:
        drop_postgresql_database(name)


def admin_sql(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with postgresql_admin() as admin:
        cursor = admin.execute(sql, params or None)
        return list(cursor.fetchall()) if cursor.description else []


def kill_connections(db: PgDatabase) -> int:
    """Terminate every connection to ``db`` (what a server restart does to them); how many."""
    return len(
        admin_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            db.name,
        )
    )


def refuse_connections(db: PgDatabase, refuse: bool) -> None:
    """Make ``db`` refuse new connections (and drop the open ones): a database that is down."""
    admin_sql(f"ALTER DATABASE {db.name} ALLOW_CONNECTIONS {'false' if refuse else 'true'}")
    if refuse:
        kill_connections(db)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def admin_rows(db: PgDatabase, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db.url, autocommit=True) as connection:
        return list(connection.execute(sql).fetchall())


# -- the store on PostgreSQL -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pool_connections_are_autocommit_named_and_fail_fast(pg: PgDatabase) -> None:
    store = await pg.open()
    try:

        def inspect(cursor: Any) -> tuple[Any, ...]:
            cursor.execute("SELECT current_setting('application_name')")
            name = cursor.fetchone()[0]
            return name, cursor.connection.autocommit, cursor.connection.info.get_parameters()

        name, autocommit, _ = await store._pool.runInteraction(inspect)
        assert (name, autocommit) == ("ollamaflow", True)
        assert "connect_timeout=5" in pg.conninfo and "keepalives=1" in pg.conninfo
        assert store.can_listen and store.dialect is POSTGRESQL
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_exactly_one_instance_migrates_while_the_others_wait(pg: PgDatabase) -> None:
    holder = psycopg.connect(pg.url, autocommit=True)
    try:
        # Hold the lock every migration and write takes, as a slow first instance would.
        holder.execute("SELECT pg_advisory_lock(%s)", (POSTGRESQL_LOCK_KEY,))
        opening = [Deferred.fromCoroutine(pg.open()) for _ in range(4)]
        await sleep(0.3)
        assert not any(d.called for d in opening), "everyone waits for the lock"
        assert admin_rows(pg, "SELECT to_regclass('schema_version') IS NULL") == [(True,)]
        holder.execute("SELECT pg_advisory_unlock(%s)", (POSTGRESQL_LOCK_KEY,))
        stores = await gatherResults(opening)
    finally:
        holder.close()
    try:
        versions = admin_rows(pg, "SELECT version FROM schema_version ORDER BY 1")
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        assert admin_rows(pg, "SELECT identifier FROM backends") == [("backend1",)]
        assert admin_rows(pg, "SELECT generation FROM config_state") == [(1,)], "seeded once"
        snapshots = [await s.snapshot() for s in stores]
        assert all(snap == snapshots[0] for snap in snapshots)
    finally:
        for s in stores:
            await s.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_writers_from_two_instances_take_turns(pg: PgDatabase) -> None:
    one, two = await pg.open(), await pg.open()
    try:
        results = await DeferredList(
            [
                Deferred.fromCoroutine(store.create_backend(Backend(identifier="same")))
                for store in (one, two)
            ],
            consumeErrors=True,
        )
        # One wins, the other is refused cleanly (not a serialization error or a 500).
        assert sorted(ok for ok, _ in results) == [False, True]
        (refused,) = [outcome for ok, outcome in results if not ok]
        assert isinstance(refused, Failure), refused
        assert refused.check(DuplicateIdentifier), refused
        writes = [
            Deferred.fromCoroutine(store.create_backend(Backend(identifier=f"b{i}")))
            for i, store in enumerate([one, two] * 5)
        ]
        await gatherResults(writes)
        assert await one.generation() == await two.generation() == 1 + 1 + 10
    finally:
        await one.close()
        await two.close()


@pytest_twisted.ensureDeferred
async def test_every_committed_write_notifies_its_generation_and_failures_do_not(
    pg: PgDatabase,
) -> None:
    listener, writer = await pg.open(), await pg.open()
    heard: list[int | None] = []
    lost: list[str] = []
    subscription = await listener.listen(heard.append, lost.append)
    try:
        await writer.create_backend(Backend(identifier="gpu1"))
        await listener.create_frontend(Frontend(identifier="chat", backends=("gpu1",)))
        with pytest.raises(DuplicateIdentifier):
            await writer.create_backend(Backend(identifier="gpu1"))
        await writer.delete_frontend("chat")
        await until(lambda: len(heard) >= 3, 2.0, "three notifications")
        await sleep(0.1)
        assert heard == [2, 3, 4], "one per commit, in order, none for the refused write"
        assert lost == []
    finally:
        subscription.close()
        await listener.close()
        await writer.close()


@pytest_twisted.ensureDeferred
async def test_key_writes_notify_and_usage_does_not(pg: PgDatabase) -> None:
    listener, writer = await pg.open(), await pg.open()
    heard: list[int | None] = []
    subscription = await listener.listen(heard.append, lambda _: None)
    try:
        key = ApiKey(identifier="k", secret_hash=hash_secret("s1"), key_prefix=shown("s1"))
        await writer.create_api_key(key)
        await writer.add_usage([UsageRow("k", "llama3", T0.replace(minute=0), requests=1)])
        await writer.rotate_api_key("k", hash_secret("s2"), shown("s2"))
        await writer.add_usage([UsageRow("k", "llama3", T0.replace(minute=0), requests=1)])
        await writer.replace_api_key(ApiKey(identifier="k", priority=3))
        await writer.delete_api_key("k")
        await until(lambda: len(heard) >= 4, 2.0, "four notifications")
        await sleep(0.1)
        assert heard == [2, 3, 4, 5], "one per key write, none for usage"
        assert (await listener.snapshot()).api_keys == ()
    finally:
        subscription.close()
        await listener.close()
        await writer.close()


@pytest_twisted.ensureDeferred
async def test_instances_adding_usage_at_once_lose_no_count(pg: PgDatabase) -> None:
    """Upserts of the same rows from several instances at once: every count is added, and
    no transaction deadlocks (each batch locks its rows in the same order)."""
    stores = [await pg.open(pool_size=2) for _ in range(3)]
    hours = [datetime(2025, 1, 2, h, tzinfo=UTC) for h in range(3)]

    def batch(i: int) -> list[UsageRow]:
        rows = [UsageRow("k", m, h, requests=1, prompt_tokens=i) for h in hours for m in "abc"]
        return rows[::-1] if i % 2 else rows  # given in opposite orders

    try:
        await gatherResults(
            [Deferred.fromCoroutine(stores[i % 3].add_usage(batch(i))) for i in range(12)]
        )
        found = await stores[0].read_usage("k", hours[0], 100)
        assert len(found) == 9
        assert {(r.requests, r.prompt_tokens) for r in found} == {(12, sum(range(12)))}
    finally:
        for store in stores:
            await store.close()


@pytest_twisted.ensureDeferred
async def test_a_broken_connection_is_replaced_and_a_refusing_database_is_unavailable(
    pg: PgDatabase,
) -> None:
    store = await pg.open(pool_size=2)
    heard: list[int | None] = []
    lost: list[str] = []
    subscription = await store.listen(heard.append, lost.append)
    try:
        for _ in range(4):  # let the pool connect
            await store.generation()
        assert kill_connections(pg) >= 2
        # Every pooled connection is now stale: the store retries on a fresh one, silently.
        await store.create_backend(Backend(identifier="after-kill"))
        await until(lambda: lost, 2.0, "the listener notices")
        assert not subscription.open and "closed the connection" in lost[0]

        refuse_connections(pg, True)
        with pytest.raises(StoreUnavailable) as caught:
            await store.create_backend(Backend(identifier="during"))
        message = str(caught.value)
        assert message.startswith("the configuration database is unavailable: ")
        assert "not currently accepting connections" in message and "\n" not in message
        assert "nothing was changed" in message and not caught.value.unsure
        with pytest.raises(StoreUnavailable):
            await store.snapshot()
        with pytest.raises(StoreUnavailable):
            await store.listen(heard.append, lost.append)

        refuse_connections(pg, False)
        await store.create_backend(Backend(identifier="after"))
        ids = [b.identifier for b in (await store.snapshot()).backends]
        assert ids == ["backend1", "after-kill", "after"]
    finally:
        subscription.close()
        await store.close()


def test_prepare_postgresql_fails_in_one_line_when_the_server_is_not_there() -> None:
    class NotRunning:
        running = False

    conninfo = postgresql_conninfo("postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(StoreUnavailable) as caught:
        prepare_postgresql(conninfo, reactor=NotRunning(), now=now)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value) and "127.0.0.1" in str(caught.value)


def test_prepare_postgresql_without_the_right_to_create_tables_is_one_line(
    pg: PgDatabase,
) -> None:
    role = f"{pg.name}_reader"
    admin_sql(f"CREATE ROLE {role} LOGIN")
    try:

        class NotRunning:
            running = False

        conninfo = postgresql_conninfo(pg.url, user=role)
        with pytest.raises(DatabaseRefused) as caught:
            prepare_postgresql(conninfo, reactor=NotRunning(), now=now)  # type: ignore[arg-type]
        message = str(caught.value)
        assert message.startswith("the configuration database refused to open: ")
        assert "permission denied" in message and "\n" not in message
    finally:
        admin_sql(f"DROP ROLE {role}")


def test_twistd_start_with_an_unreachable_database_is_one_line_and_exit_1(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ollamaflow.json"
    path.write_text(
        '{"Database": {"Driver": "postgresql", "Hostname": "127.0.0.1", "Port": 1,'
        ' "User": "flow", "PasswordEnv": "OLLAMAFLOW_TEST_DB_PASSWORD"}}'
    )
    with pytest.raises(SettingsError, match="OLLAMAFLOW_TEST_DB_PASSWORD is not set"):
        load_settings(path)
    os.environ["OLLAMAFLOW_TEST_DB_PASSWORD"] = "s3cret-pw"
    try:
        loaded = load_settings(path)
    finally:
        del os.environ["OLLAMAFLOW_TEST_DB_PASSWORD"]

    class NotRunning:
        running = False

    with pytest.raises(SystemExit) as caught:
        prepare_store(loaded, NotRunning(), now)
    message = str(caught.value.code)
    assert message.startswith("ollamaflow: postgresql://flow@127.0.0.1:1/ollamaflow: ")
    assert "the configuration database is unavailable" in message
    assert "\n" not in message and "s3cret-pw" not in message


# -- the follower ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_follower_reloads_periodically_without_listen(pg: PgDatabase) -> None:
    """The safety net alone (also what SQLite gets): a changed generation is loaded."""
    mine, theirs = await pg.open(), await pg.open()
    registry = Registry(mine, Catalog.build(await mine.snapshot()))
    clock = task.Clock()
    follower = ConfigFollower(registry=registry, clock=clock, interval=5.0, listen=False)
    follower.startService()
    try:
        await theirs.create_backend(Backend(identifier="gpu1"))
        clock.advance(4.9)
        assert "gpu1" not in registry.catalog.backends
        clock.advance(0.1)
        await until(lambda: "gpu1" in registry.catalog.backends, 2.0)
        assert follower.refreshes == 1
        clock.advance(5.0)  # nothing new: no refresh
        await until(lambda: follower._working is None, 2.0)
        assert follower.refreshes == 1
    finally:
        await follower.stopService()
        await mine.close()
        await theirs.close()


@pytest_twisted.ensureDeferred
async def test_the_follower_survives_failures_and_logs_an_outage_once(
    pg: PgDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await pg.open()
    registry = Registry(store, Catalog.build(await store.snapshot()))
    clock = task.Clock()
    follower = ConfigFollower(registry=registry, clock=clock, interval=1.0, listen=False)
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    follower.startService()
    try:

        async def broken(self: Store) -> int:
            raise RuntimeError("a bug")

        monkeypatch.setattr(Store, "generation", broken)
        clock.advance(1.0)
        await until(lambda: follower._working is None, 2.0)
        monkeypatch.undo()
        refuse_connections(pg, True)
        for _ in range(3):
            clock.advance(1.0)
            await until(lambda: follower._working is None, 5.0)
        refuse_connections(pg, False)
        await store.create_backend(Backend(identifier="back"))  # behind the registry's back
        clock.advance(1.0)
        await until(lambda: "back" in registry.catalog.backends, 5.0)
    finally:
        globalLogPublisher.removeObserver(observer)
        await follower.stopService()
        await store.close()
    texts = [
        e.get("log_format", "") for e in events if e.get("log_namespace", "").endswith("follow")
    ]
    assert sum("routing continues" in t for t in texts) == 1, texts
    assert sum("reachable again" in t for t in texts) == 1, texts
    assert any(e.get("log_failure") is not None for e in events), "the bug is logged"
    assert follower._loop is None and not follower.running


# -- two daemons on one database --------------------------------------------------------------


def listens(follower: ConfigFollower) -> Callable[[], bool]:
    """Whether ``follower`` listens for changes now (for :func:`until`)."""
    return lambda: follower.listening


def frontend_backends(daemon: Daemon, frontend: str) -> Callable[[], object]:
    """The backends ``daemon``'s published catalog lists for ``frontend`` (for :func:`until`)."""
    return lambda: daemon.registry.catalog.frontends[frontend].backends


def records_left_out(daemon: Daemon) -> Callable[[], object]:
    """The records ``daemon``'s published catalog leaves out (for :func:`until`)."""
    return lambda: daemon.registry.catalog.left_out


@attrs.define
class Pair:
    one: Daemon
    two: Daemon

    def follower(self, daemon: Daemon) -> ConfigFollower:
        found = daemon.getServiceNamed(SERVICE_NAME)
        assert isinstance(found, ConfigFollower)
        return found

    async def listening(self, seconds: float = 10.0) -> None:
        for daemon in (self.one, self.two):
            await until(listens(self.follower(daemon)), seconds, "the follower listens")


@pytest_twisted.async_yield_fixture
async def pair(pg: PgDatabase, tmp_path: Path) -> AsyncIterator[Pair]:
    daemons = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        daemons.append(await start_daemon(tmp_path / name, pg.settings(PoolSize=2)))
    made = Pair(*daemons)
    await made.listening()
    yield made
    for daemon in daemons:
        await daemon.stopService()


async def sees(http: Http, path: str, status: int = 200) -> bool:
    return (await http.get(path)).status == status


@pytest_twisted.ensureDeferred
async def test_two_daemons_see_each_others_admin_changes_within_a_second(pair: Pair) -> None:
    one, two = Http.to(pair.one), Http.to(pair.two)
    reply = await one.put("/v1.0/backends", {"Identifier": "gpu1", "Hostname": "10.0.0.1"})
    assert reply.status == 201, reply.body
    await until(lambda: sees(two, "/v1.0/backends/gpu1"), 1.0, "created on one, seen on two")

    reply = await two.put("/v1.0/frontends", {"Identifier": "chat", "Backends": ["gpu1"]})
    assert reply.status == 201, reply.body
    await until(lambda: sees(one, "/v1.0/frontends/chat"), 1.0, "created on two, seen on one")

    reply = await one.put("/v1.0/backends/gpu1", {"Hostname": "10.0.0.2"})
    assert reply.status == 200

    async def replaced() -> bool:
        return (await two.get("/v1.0/backends/gpu1")).json["Hostname"] == "10.0.0.2"

    await until(replaced, 1.0, "replaced on one, seen on two")

    assert (await two.delete("/v1.0/backends/gpu1?force=true")).status == 204
    await until(lambda: sees(one, "/v1.0/backends/gpu1", 404), 1.0, "deleted on two")
    chat = (await one.get("/v1.0/frontends/chat")).json
    assert chat["Backends"] == [], "the forced delete reached the other's frontend too"
    assert pair.one.registry.catalog.generation == pair.two.registry.catalog.generation
    # A conflict is a conflict whichever instance is asked.
    reply = await two.put("/v1.0/frontends", {"Identifier": "chat"})
    assert reply.status == 409


@pytest_twisted.ensureDeferred
async def test_runtime_state_stays_per_instance(pair: Pair) -> None:
    one, two = Http.to(pair.one), Http.to(pair.two)
    await one.put("/v1.0/backends", {"Identifier": "gpu1", "Hostname": "127.0.0.1", "Port": 9})
    await until(lambda: "gpu1" in pair.two.registry.catalog.backends, 1.0)
    pair.one.runtime.state("gpu1").succeeded(pair.one.now(), threshold=1)
    assert pair.one.runtime.state("gpu1").healthy
    assert not pair.two.runtime.state("gpu1").healthy, "each instance checks for itself"
    assert (await two.get("/v1.0/backends/gpu1")).status == 200


async def generate(daemon: Daemon) -> int:
    response = await treq.post(
        f"http://127.0.0.1:{daemon.address.port}/api/generate",
        json={"model": "llama3", "prompt": "hi", "stream": False},
        persistent=False,
    )
    await response.content()
    return int(response.code)


async def route_to(pair: Pair, sim: RunningSimulator) -> None:
    """Point the seeded frontend at ``sim`` through daemon one; both become healthy on it."""
    one = Http.to(pair.one)
    backend = {"Identifier": "sim", "Hostname": "127.0.0.1", "Port": sim.port}
    assert (await one.put("/v1.0/backends", backend)).status == 201
    assert (await one.put("/v1.0/frontends/frontend1", {"Backends": ["sim"]})).status == 200
    await until(lambda: "sim" in pair.two.registry.catalog.backends, 1.0)
    for daemon in (pair.one, pair.two):
        await until(frontend_backends(daemon, "frontend1"), 1.0)
        state = daemon.runtime.state("sim")
        if not state.healthy:
            state.succeeded(daemon.now(), threshold=1)

        async def routes(d: Daemon = daemon) -> bool:
            # The gateway routes by model: it waits for the inventory to list the sim's.
            return await generate(d) == 200

        await until(routes, 5.0, "the gateway routes to the simulator")


async def outage_behaviour(pair: Pair) -> None:
    """While the database is away: routing goes on, reads answer, writes are 503 in JSON."""
    for daemon in (pair.one, pair.two):
        assert await generate(daemon) == 200, "routing on the last known configuration"
        http = Http.to(daemon)
        assert (await http.get("/v1.0/frontends/frontend1")).status == 200
        reply = await http.put("/v1.0/backends", {"Identifier": "during", "Port": 1})
        assert reply.status == 503, reply.body
        assert reply.headers.getRawHeaders("content-type") == ["application/json"]
        body = reply.json
        assert (body["Error"], body["StatusCode"]) == ("Unavailable", 503)
        assert body["Description"].startswith("the configuration database is unavailable: ")
        assert "retry later" in body["Description"]


async def afterwards(pair: Pair, seconds: float) -> None:
    """Once it is back: writes work again on both, and changes travel within a second."""
    one, two = Http.to(pair.one), Http.to(pair.two)

    async def writable() -> bool:
        reply = await one.put("/v1.0/backends", {"Identifier": "after", "Port": 2})
        return reply.status == 201

    await until(writable, seconds, "writes work again")
    await until(lambda: sees(two, "/v1.0/backends/after"), seconds, "the follower caught up")
    await pair.listening(seconds)
    assert (await two.put("/v1.0/backends", {"Identifier": "later", "Port": 3})).status == 201
    await until(lambda: sees(one, "/v1.0/backends/later"), 1.0, "LISTEN works again")
    assert (await one.get("/v1.0/backends/during")).status == 404


@pytest_twisted.ensureDeferred
async def test_a_lost_database_keeps_the_proxy_routing_and_writes_return_after(
    pair: Pair, pg: PgDatabase, simulators: Callable[..., Awaitable[RunningSimulator]]
) -> None:
    await route_to(pair, await simulators())
    refuse_connections(pg, True)
    try:
        await outage_behaviour(pair)
        await until(lambda: not pair.follower(pair.two).listening, 2.0, "listener lost")
    finally:
        refuse_connections(pg, False)
    await afterwards(pair, 10.0)


@pytest_twisted.ensureDeferred
async def test_killed_connections_are_replaced_without_an_error(pair: Pair, pg: PgDatabase) -> None:
    assert kill_connections(pg) >= 2
    one, two = Http.to(pair.one), Http.to(pair.two)
    reply = await one.put("/v1.0/backends", {"Identifier": "gpu9"})
    assert reply.status == 201, "a stale pooled connection is retried, not reported"
    await until(lambda: sees(two, "/v1.0/backends/gpu9"), 5.0)
    await pair.listening()
    assert (await two.delete("/v1.0/backends/gpu9")).status == 204
    await until(lambda: sees(one, "/v1.0/backends/gpu9", 404), 1.0)


def cluster_command(action: str) -> list[str]:
    versions = sorted(os.listdir("/etc/postgresql"))
    assert versions, "no PostgreSQL cluster on this machine"
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", action]


@pytest_twisted.ensureDeferred
async def test_a_real_server_restart_is_survived(
    pair: Pair, simulators: Callable[..., Awaitable[RunningSimulator]]
) -> None:
    await route_to(pair, await simulators())
    restart = threads.deferToThread(
        subprocess.run, cluster_command("restart"), capture_output=True, text=True, timeout=60
    )
    await until(lambda: not pair.follower(pair.two).listening, 10.0, "the restart is noticed")
    assert await generate(pair.one) == 200 and await generate(pair.two) == 200
    result = await restart
    assert result.returncode == 0, result.stderr
    await afterwards(pair, 15.0)


@pytest_twisted.ensureDeferred
async def test_the_postgresql_settings_reach_the_server(pg: PgDatabase, tmp_path: Path) -> None:
    """Separate fields instead of a Url, and a wrong password is a StoreError, not a hang."""
    parts = psycopg.conninfo.conninfo_to_dict(pg.url)
    path = tmp_path / "ollamaflow.json"
    fields = {"Hostname": parts["host"], "Port": int(str(parts["port"])), "Name": pg.name}
    path.write_text(
        json.dumps({"Database": {"Driver": "PostgreSQL", "User": "postgres", **fields}})
    )
    loaded = load_settings(path)
    store = await Store.open_postgresql(
        postgresql_conninfo(None, **loaded.postgresql_params()), reactor=reactor, now=now
    )
    try:
        assert [b.identifier for b in (await store.snapshot()).backends] == ["backend1"]
    finally:
        await store.close()
    with pytest.raises(StoreError):
        postgresql_conninfo("postgresql://[bad")


@pytest_twisted.ensureDeferred
async def test_a_row_another_writer_broke_is_left_out_on_every_instance_and_repaired(
    pair: Pair, pg: PgDatabase
) -> None:
    """Another writer (an older version, a hand edit) commits a row this version cannot load:
    both instances follow, leave it out, keep serving the rest, and a PUT on one repairs it."""
    one, two = Http.to(pair.one), Http.to(pair.two)
    reply = await one.put("/v1.0/backends", {"Identifier": "gpu1", "Hostname": "10.0.0.1"})
    assert reply.status == 201, reply.body
    await until(lambda: sees(two, "/v1.0/backends/gpu1"))
    with psycopg.connect(pg.url, autocommit=True) as connection, connection.transaction():
        connection.execute(
            "UPDATE backends SET doc = %s WHERE identifier = 'gpu1'",
            ('{"Hostname": "10.0.0.1", "PinnedCompletionsProperties": {"t": NaN}}',),
        )
        connection.execute("UPDATE config_state SET generation = generation + 1 WHERE id = 1")
        connection.execute(POSTGRESQL.notify)
    for http, daemon in ((one, pair.one), (two, pair.two)):
        await until(records_left_out(daemon), what="gpu1 is left out")
        [left_out] = daemon.registry.catalog.left_out
        assert "PinnedCompletionsProperties.t" in left_out.reason
        assert (await http.get("/v1.0/backends/gpu1")).status == 404
        assert (await http.get("/v1.0/backends/backend1")).status == 200
    reply = await two.put("/v1.0/backends/gpu1", {"Hostname": "10.0.0.2"})
    assert reply.status == 200, reply.body
    await until(lambda: sees(one, "/v1.0/backends/gpu1"))
    assert pair.one.registry.catalog.left_out == () == pair.two.registry.catalog.left_out
