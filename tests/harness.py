"""Helpers for end-to-end tests: a daemon built in-process on port 0, and a small admin client."""

from __future__ import annotations

import inspect
import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import treq
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from ollamaflow.daemon import Daemon
from ollamaflow.settings import DatabaseDriver, load_settings
from ollamaflow.sim.config import SimConfig
from ollamaflow.sim.service import RunningSimulator, start_simulator
from ollamaflow.store import Store, postgresql_conninfo
from ollamaflow.utctime import utc_clock

TOKEN = "test-admin-token"


async def until(
    check: Callable[[], Any],
    seconds: float = 10.0,
    what: str = "",
    *,
    ignoring: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``check`` (a predicate, or one returning an awaitable) on the reactor every 10 ms
    until it gives something truthy, and return that; fail after ``seconds``. Exceptions in
    ``ignoring`` count as "not yet" (a server still starting refuses connections)."""
    deadline = reactor.seconds() + seconds
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except ignoring:
            result = None
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"not true within {seconds}s: {what or check}")
        await task.deferLater(reactor, 0.01, lambda: None)


async def start_daemon(folder: Path, settings: Mapping[str, Any] | None = None) -> Daemon:
    """Write a settings file in ``folder``, open its store (SQLite unless ``settings`` say
    ``Database.Driver`` postgresql) and serve on a free port."""
    path = folder / "ollamaflow.json"
    data = {"AdminBearerTokens": [TOKEN], "Logging": {"ConsoleLogging": False}}
    data.update(settings or {})
    path.write_text(json.dumps(data))
    loaded = load_settings(path)
    now = utc_clock(reactor.seconds)
    if loaded.database_driver is DatabaseDriver.POSTGRESQL:
        database = loaded.settings.database
        store = await Store.open_postgresql(
            postgresql_conninfo(database.url, **loaded.postgresql_params()),
            reactor=reactor,
            now=now,
            pool_size=database.pool_size,
        )
    else:
        store = await Store.open_sqlite(str(loaded.database_path), reactor=reactor, now=now)
    snapshot = await store.snapshot()
    daemon = Daemon(loaded=loaded, store=store, snapshot=snapshot, reactor=reactor, port=0)
    daemon.interface = "127.0.0.1"
    daemon.startService()
    return daemon


class Collect(Protocol):
    """Keeps every byte a connection (or a response body) delivers; ``done`` fires with them
    when it ends, and ``reason`` says how. A ``payload`` is sent as soon as it connects."""

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = payload
        self.data = b""
        self.reason: Failure | None = None
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        if self.payload:
            assert self.transport is not None
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.done.callback(self.data)


@attrs.define
class DaemonUnderTest:
    """A daemon and the simulators behind it, for end-to-end tests; ``stop()`` ends them all."""

    daemon: Daemon
    sims: dict[str, RunningSimulator] = attrs.field(factory=dict)

    @property
    def http(self) -> Http:
        return Http.to(self.daemon)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.address.port}"

    async def add(
        self,
        name: str,
        *,
        models: tuple[str, ...] = ("llama3", "all-minilm"),
        backend: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> RunningSimulator:
        """Start a simulator (``config`` are its knobs) and register it as backend ``name``."""
        sim = await start_simulator(reactor, config=SimConfig(**config), models=models)
        self.sims[name] = sim
        record = {"Identifier": name, "Hostname": "127.0.0.1", "Port": sim.port, **(backend or {})}
        reply = await self.http.put("/v1.0/backends", record)
        assert reply.status == 201, reply.body
        return sim

    async def serve(self, *names: str, **fields: Any) -> None:
        """Make frontend1 serve ``names``; wait until they are healthy and their models read."""
        reply = await self.http.put(
            "/v1.0/frontends/frontend1", {"Backends": list(names), **fields}
        )
        assert reply.status == 200, reply.body
        runtime, inventory = self.daemon.runtime, self.daemon.inventory
        await until(lambda: all(runtime.state(n).healthy for n in names))
        await until(lambda: all(inventory.known(n) for n in names))

    async def stop(self) -> None:
        for sim in self.sims.values():
            await sim.stop()
        await self.daemon.stopService()


@attrs.frozen
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen
class Http:
    """Raw HTTP against a daemon: every call returns status, headers and the whole body."""

    base: str
    token: str | None = TOKEN

    @classmethod
    def to(cls, daemon: Daemon, token: str | None = TOKEN) -> Http:
        return cls(f"http://127.0.0.1:{daemon.address.port}", token)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        sent: dict[bytes | str, bytes | str] = {k: v for k, v in (headers or {}).items()}
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        response = await treq.request(
            method, self.base + path, data=data, headers=sent, persistent=False
        )
        content = await response.content()
        return Reply(response.code, response.headers, content)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def put(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("PUT", path, body, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.request("DELETE", path, **kw)


# -- PostgreSQL: the real server on this machine, a fresh database per test ----------------------

#: The server and an existing database to administer it from (``.ci/run`` makes sure it runs).
POSTGRESQL_ADMIN_URL = os.environ.get(
    "OLLAMAFLOW_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/test"
)


def postgresql_admin() -> Any:
    """An autocommit connection to the test server; FAILS the test (never skips) if unreachable."""
    import psycopg

    try:
        return psycopg.connect(POSTGRESQL_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRESQL_ADMIN_URL} ({' '.join(str(e).split())});"
            " start it (.ci/run does) or set OLLAMAFLOW_TEST_POSTGRESQL",
            pytrace=False,
        )


def create_postgresql_database() -> tuple[str, str]:
    """A new, empty database on the test server: its name and its URL."""
    import psycopg.conninfo

    name = f"ollamaflow_t_{uuid.uuid4().hex[:12]}"
    with postgresql_admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
    parts = psycopg.conninfo.conninfo_to_dict(POSTGRESQL_ADMIN_URL)
    secret = f":{parts['password']}" if parts.get("password") else ""
    user = f"{parts['user']}{secret}@" if parts.get("user") else ""
    host, port = parts.get("host", "127.0.0.1"), parts.get("port", 5432)
    return name, f"postgresql://{user}{host}:{port}/{name}"


def drop_postgresql_database(name: str) -> None:
    """Drop a database made by :func:`create_postgresql_database`, closing its connections."""
    with postgresql_admin() as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
