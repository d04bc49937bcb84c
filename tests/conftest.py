"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import Http, start_daemon

from ollamaflow.daemon import Daemon
from ollamaflow.sim import RunningSimulator, start_simulator


@pytest_twisted.async_yield_fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon on SQLite in ``tmp_path``, serving on a free port; stopped at teardown."""
    running = await start_daemon(tmp_path)
    yield running
    await running.stopService()


@pytest.fixture
def http(daemon: Daemon) -> Http:
    """An admin client of :func:`daemon` (with the test token)."""
    return Http.to(daemon)


@pytest_twisted.async_yield_fixture
async def simulators() -> AsyncIterator[Callable[..., Awaitable[RunningSimulator]]]:
    """Start in-process simulators on the real reactor (`await simulators(config=...)`); all are
    stopped at teardown."""
    from twisted.internet import reactor

    started: list[RunningSimulator] = []

    async def start(**kwargs: Any) -> RunningSimulator:
        sim = await start_simulator(reactor, **kwargs)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.stop()
