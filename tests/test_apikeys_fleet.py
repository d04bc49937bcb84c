"""API keys on several instances: two daemons on one PostgreSQL database share a key's limits
through the machine's Redis (127.0.0.1:6379, started by ``.ci/run``) and its usage through the
database; a daemon whose Redis is gone keeps serving under its own counts and says so once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
import treq
from harness import Http, start_daemon, until
from listening import listen_local, port_number, stop_listening
from logcapture import keeping
from test_postgresql import PgDatabase, pg
from twisted.internet import reactor
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.http_headers import Headers

from ollamaflow.daemon import Daemon
from ollamaflow.ratelimits.shared import SharedLimits
from ollamaflow.sim.service import RunningSimulator, start_simulator

__all__ = ["pg"]  # a fixture, shared by import

REDIS = "redis://127.0.0.1:6379/0"
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@attrs.frozen
class Fleet:
    daemons: tuple[Daemon, ...]
    sim: RunningSimulator

    async def chat(self, daemon: Daemon, secret: str) -> int:
        response = await treq.post(
            f"http://127.0.0.1:{daemon.address.port}/api/chat",
            json=CHAT,
            headers=Headers({b"Authorization": [f"Bearer {secret}".encode()]}),
            persistent=False,
        )
        await response.content()
        return int(response.code)


async def serve(daemons: tuple[Daemon, ...], sim: RunningSimulator) -> None:
    """One backend behind frontend1, which requires keys; healthy on every daemon."""
    http = Http.to(daemons[0])
    body = {"Identifier": "sim", "Hostname": "127.0.0.1", "Port": sim.port}
    assert (await http.put("/v1.0/backends", body)).status == 201
    frontend = {"Backends": ["sim"], "RequireApiKey": True}
    assert (await http.put("/v1.0/frontends/frontend1", frontend)).status == 200
    for daemon in daemons:
        await until(partial(knows_backend, daemon, "sim"), what="the backend known")
        daemon.runtime.state("sim").succeeded(daemon.now(), threshold=1)


async def new_key(daemons: tuple[Daemon, ...], **fields: Any) -> tuple[str, str]:
    reply = await Http.to(daemons[0]).request("POST", "/v1.0/apikeys", fields)
    assert reply.status == 201, reply.body
    identifier, secret = reply.json["Identifier"], reply.json["Key"]
    for daemon in daemons:
        await until(partial(knows_key, daemon, identifier), what="the key known everywhere")
    return identifier, secret


def knows_backend(daemon: Daemon, identifier: str) -> bool:
    return identifier in daemon.registry.catalog.backends


def knows_key(daemon: Daemon, identifier: str) -> bool:
    return identifier in daemon.registry.catalog.api_keys


def shares(daemon: Daemon) -> bool:
    return limiter(daemon).shared


def limiter(daemon: Daemon) -> SharedLimits:
    found = daemon.gateway.limiter
    assert isinstance(found, SharedLimits)
    return found


@pytest_twisted.async_yield_fixture
async def fleet(pg: PgDatabase, tmp_path: Path) -> AsyncIterator[Fleet]:
    settings = {
        **pg.settings(PoolSize=2),
        "RateLimits": {"Redis": REDIS, "UsageFlushIntervalMs": 1000},
    }
    daemons = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        daemons.append(await start_daemon(tmp_path / name, settings))
    sim = await start_simulator(reactor)
    made = Fleet(tuple(daemons), sim)
    await serve(made.daemons, sim)
    for daemon in made.daemons:
        await until(partial(shares, daemon), what="connected to Redis")
    yield made
    await sim.stop()
    for daemon in daemons:
        await daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_two_daemons_enforce_one_limit_through_redis_and_add_up_usage(
    fleet: Fleet,
) -> None:
    one, two = fleet.daemons
    identifier, secret = await new_key(fleet.daemons, RequestsPerMinute=4)
    answered = [await fleet.chat(daemon, secret) for daemon in (one, two, one, two)]
    assert answered == [200, 200, 200, 200]
    assert await fleet.chat(one, secret) == 429, "four between them: the limit is shared"
    assert await fleet.chat(two, secret) == 429

    async def totals() -> int:
        reply = await Http.to(one).get(f"/v1.0/apikeys/{identifier}/usage")
        return int(reply.json["Totals"]["Requests"])

    # Each daemon writes its own counts to the database; either reads them all.
    await until(lambda: totals_at_least(totals, 6), 10.0, "both daemons' usage in the database")


async def totals_at_least(totals: Any, wanted: int) -> bool:
    return bool(await totals() >= wanted)


@pytest_twisted.ensureDeferred
async def test_without_redis_a_daemon_serves_under_its_own_limits_and_says_so_once(
    pg: PgDatabase, tmp_path: Path
) -> None:
    closed = listen_local(ServerFactory.forProtocol(Protocol))
    dead = port_number(closed)
    await stop_listening(closed)  # nothing listens there now
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    sim = await start_simulator(reactor)
    daemon = await start_daemon(tmp_path, {"RateLimits": {"Redis": f"redis://127.0.0.1:{dead}"}})
    try:
        await serve((daemon,), sim)
        _, secret = await new_key((daemon,), RequestsPerMinute=3)
        fleet = Fleet((daemon,), sim)
        answered = [await fleet.chat(daemon, secret) for _ in range(4)]
        assert answered == [200, 200, 200, 429], "requests flow; the limit holds per instance"
    finally:
        globalLogPublisher.removeObserver(observer)
        await sim.stop()
        await daemon.stopService()
    outages = [
        e
        for e in events
        if e.get("log_level") == LogLevel.warn and "redis" in str(e.get("log_format", "")).lower()
    ]
    assert len(outages) == 1, [e.get("log_format") for e in outages]
