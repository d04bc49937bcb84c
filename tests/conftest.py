"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest_twisted

from ollamaflow.sim import RunningSimulator, start_simulator


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
