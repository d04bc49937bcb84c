"""Failover under load: with the queue busy, a fault on one backend reaches no client except
through the streams that backend was already sending (issue 16).

Each test runs clients in a loop against three simulators with two slots each, so requests
queue; one simulator is faulted for a while, then mended. Every request's outcome is checked:
the only failures allowed are responses that had begun from the faulted backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from harness import Collect, DaemonUnderTest, start_daemon, until
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from ollamaflow.gateway.completed import Completed

#: Clients in a loop; the fleet has six slots, so about half of them wait in the queue.
CLIENTS = 14
FAULTED = "sim0"


@attrs.define
class Outcome:
    """What one client saw of one request."""

    kind: str
    status: int | None = None
    backend: str | None = None
    whole: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.whole

    @property
    def began_on_faulted(self) -> bool:
        """A response that had begun from the faulted backend: the one failure allowed."""
        return self.status == 200 and self.backend == FAULTED


async def one_request(url: str, n: int) -> Outcome:
    """A streamed generate, or (one in three) an embedding, read to its end."""
    body: dict[str, Any]
    if n % 3 == 2:
        kind, path, body = "embed", "/api/embed", {"model": "all-minilm", "input": "x"}
    else:
        kind, path = "stream", "/api/generate"
        body = {"model": "llama3", "prompt": f"p{n}", "stream": True}
    outcome = Outcome(kind)
    try:
        response = await treq.post(url + path, json=body, unbuffered=True)
    except Exception as e:
        outcome.error = repr(e)
        return outcome
    outcome.status = response.code
    outcome.backend = (response.headers.getRawHeaders("x-ollamaflow-backend") or [None])[0]
    reader = Collect()
    response.deliverBody(reader)
    await reader.done
    reason = reader.reason
    assert reason is not None
    if not reason.check(ResponseDone):
        outcome.error = repr(reason.value)
        return outcome
    if kind == "stream":
        outcome.whole = b'"done":true' in reader.data.rstrip().rsplit(b"\n", 1)[-1]
    else:
        outcome.whole = reader.data.startswith(b'{"model"')
    if not outcome.whole:
        outcome.error = f"incomplete body: {reader.data[-200:]!r}"
    return outcome


@attrs.define
class Load:
    """Clients sending one request after another until told to stop."""

    url: str
    outcomes: list[Outcome] = attrs.field(factory=list)
    running: bool = True

    async def client(self, index: int) -> None:
        n = index
        while self.running:
            self.outcomes.append(await one_request(self.url, n))
            n += CLIENTS

    def start(self) -> Deferred[Any]:
        return DeferredList(
            [Deferred.fromCoroutine(self.client(i)) for i in range(CLIENTS)],
            fireOnOneErrback=True,
            consumeErrors=True,
        )


@attrs.define
class Setup(DaemonUnderTest):
    completed: list[Completed] = attrs.field(factory=list)


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    daemon = await start_daemon(
        tmp_path, {"HealthCheckIntervalMs": 100, "HealthCheckTimeoutMs": 100}
    )
    fleet = Setup(daemon)
    backend = {"MaxParallelRequests": 2, "RateLimitRequestsThreshold": 50}
    for i in range(3):
        await fleet.add(f"sim{i}", backend=backend, tokens=10, tokens_per_second=50, num_parallel=4)
    await fleet.serve(
        "sim0",
        "sim1",
        "sim2",
        LoadBalancing="LeastOutstanding",
        AllowRetries=True,
        TimeoutMs=1000,
        QueueTimeoutMs=20000,
        MaxQueueDepth=100,
    )
    daemon.gateway.observers.append(fleet.completed.append)
    yield fleet
    await fleet.stop()


async def pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def run_with_fault(setup: Setup, fault: dict[str, Any], mended: dict[str, Any]) -> Load:
    """Load for a while, the fault on sim0 for a second and a half, mended, load a while more."""
    load = Load(setup.url)
    clients = load.start()
    await until(lambda: len(load.outcomes) >= CLIENTS, what="the load is under way")
    await until(
        lambda: setup.daemon.gateway.scheduler.depth("frontend1") > 0, what="requests queue"
    )
    sim = setup.sims[FAULTED]
    await sim.configure(**fault)
    await pause(1.5)
    await sim.configure(**mended)
    await until(
        lambda: setup.daemon.runtime.state(FAULTED).in_rotation, 15, "sim0 back in rotation"
    )
    await pause(0.5)
    load.running = False
    await clients
    return load


def check(load: Load) -> list[Outcome]:
    """Every request succeeded except responses that had begun from the faulted backend;
    returns those."""
    assert len(load.outcomes) > 3 * CLIENTS
    others = [o for o in load.outcomes if not o.ok and not o.began_on_faulted]
    assert others == [], f"{len(others)} failures a client should never see"
    assert any(o.ok and o.backend == "sim1" for o in load.outcomes)
    return [o for o in load.outcomes if not o.ok]


FAULTS = {
    "refused": ({"refuse": True}, {"refuse": False}),
    "hang": ({"hang": True}, {"hang": False}),
    "reset mid-head": ({"reset_head": True}, {"reset_head": False}),
    "500 to everything": ({"error500": True}, {"error500": False}),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest_twisted.ensureDeferred
async def test_a_faulted_backend_costs_clients_nothing_but_its_running_streams(
    setup: Setup, fault: str
) -> None:
    """The health checks see these faults too; whichever notices first, nobody else fails."""
    knobs, mended = FAULTS[fault]
    state = setup.daemon.runtime.state(FAULTED)
    left: list[bool] = []
    setup.daemon.gateway.observers.append(lambda _: left.append(not state.in_rotation))
    load = await run_with_fault(setup, knobs, mended)
    check(load)
    assert any(left), "the faulted backend left rotation"
    retried = [c for c in setup.completed if c.retries]
    assert all(c.status == 200 and c.backend != FAULTED for c in retried)


async def blind_checks(setup: Setup, name: str = FAULTED) -> None:
    """Point a simulator's health check at its control page, which no fault touches: only
    the requests it fails can take it out (a real box's ``/`` often answers while its API
    does not)."""
    sim = setup.sims[name]
    reply = await setup.http.put(
        f"/v1.0/backends/{name}",
        {
            "Identifier": name,
            "Hostname": "127.0.0.1",
            "Port": sim.port,
            "MaxParallelRequests": 2,
            "RateLimitRequestsThreshold": 50,
            "HealthCheckUrl": "/_sim/state",
        },
    )
    assert reply.status == 200, reply.body
    await until(lambda: setup.daemon.runtime.state(name).in_rotation)


@pytest.mark.parametrize("fault", ["refused", "hang", "reset mid-head"])
@pytest_twisted.ensureDeferred
async def test_requests_that_met_the_fault_are_answered_by_another_backend(
    setup: Setup, fault: str
) -> None:
    """With checks blind to the fault, requests meet it: each is retried elsewhere."""
    knobs, mended = FAULTS[fault]
    await blind_checks(setup)
    load = await run_with_fault(setup, knobs, mended)
    check(load)
    retried = [c for c in setup.completed if c.retries]
    assert retried, "requests met the fault"
    assert all(c.status == 200 and c.backend != FAULTED for c in retried)


@pytest_twisted.ensureDeferred
async def test_500s_a_health_check_cannot_see_are_retried_and_steer_the_model_away(
    setup: Setup,
) -> None:
    """The box answers its health check and 500 to every model call: each 500 is retried on
    another backend, which answers, so the models are steered away from the box for a while;
    the box itself stays in rotation (a 500 may be the request's doing)."""
    await blind_checks(setup)
    state = setup.daemon.runtime.state(FAULTED)
    out: list[bool] = []
    setup.daemon.gateway.observers.append(lambda _: out.append(not state.in_rotation))
    load = await run_with_fault(setup, {"error500": True}, {"error500": False})
    check(load)
    retried = [c for c in setup.completed if c.retries]
    assert retried and all(c.status == 200 and c.backend != FAULTED for c in retried)
    assert not any(out), "never out of rotation for 500s"
    assert len(retried) < len(load.outcomes) / 4, "steered away, most requests never met it"
    health = (await setup.http.get(f"/v1.0/backends/{FAULTED}/health")).json
    assert "llama3:latest" in health["SteeredModels"], health


@pytest_twisted.ensureDeferred
async def test_a_backend_that_cuts_streams_is_held_out_not_flapping(setup: Setup) -> None:
    """Streams cut midway are the one failure a client sees; the box is held out for them,
    though its health checks pass, and the cuts stop once it is out; back, it takes one
    request at a time until a stream ends whole."""
    state = setup.daemon.runtime.state(FAULTED)
    load = await run_with_fault(
        setup, {"drop_mid_stream_after": 3}, {"drop_mid_stream_after": None}
    )
    cut = check(load)
    assert cut and all(o.kind == "stream" for o in cut)
    assert state.holds >= 1, "held out of rotation for the cuts"

    async def streamed() -> bool:
        await one_request(setup.url, 0)
        return not state.probation

    await until(streamed, 10, "a whole stream on sim0 after it came back ends its slow start")
    assert len(cut) <= 2 * 2 * state.holds + 2, (
        f"{len(cut)} streams cut in {state.holds} holds: it kept taking new streams"
    )


@pytest_twisted.ensureDeferred
async def test_a_500_every_backend_gives_is_the_clients_answer_and_blames_nobody(
    setup: Setup,
) -> None:
    """A request that fails on its own (every box says 500) costs two attempts, not three,
    reaches the client as the 500, and takes no backend out: no client can eject boxes."""
    for name, sim in setup.sims.items():
        await blind_checks(setup, name)
        await sim.configure(error500=True)
    response = await treq.post(
        setup.url + "/api/generate", json={"model": "llama3", "prompt": "x", "stream": False}
    )
    assert response.code == 500
    assert "simulated server error" in (await response.json())["error"]
    assert [c.retries for c in setup.completed] == [1]
    for name in setup.sims:
        state = setup.daemon.runtime.state(name)
        assert state.in_rotation and state.hidden_failures == 0 and state.holds == 0


@pytest_twisted.ensureDeferred
async def test_a_retry_that_finds_no_slot_before_the_deadline_names_what_failed(
    tmp_path: Path,
) -> None:
    """The attempt failed, the only other backend stays busy past the request's queue
    deadline (counted from its arrival): a 502 naming the backend tried and the wait."""
    fleet = DaemonUnderTest(await start_daemon(tmp_path, {"HealthCheckIntervalMs": 60000}))
    try:
        backend = {"MaxParallelRequests": 1}
        await fleet.add("dead", backend=backend)
        await fleet.add(
            "busy", backend={**backend, "Labels": ["long"]}, tokens=10, tokens_per_second=10
        )
        await fleet.serve(
            "dead", "busy", LoadBalancing="RoundRobin", QueueTimeoutMs=500, TimeoutMs=5000
        )
        hold = Collect()
        held = await treq.post(
            fleet.url + "/api/generate",
            json={"model": "llama3", "prompt": "x"},
            headers=Headers({"X-OllamaFlow-Label": ["long"]}),
            unbuffered=True,
        )
        assert held.headers.getRawHeaders("x-ollamaflow-backend") == ["busy"]
        held.deliverBody(hold)
        await fleet.sims["dead"].configure(refuse=True)
        response = await treq.post(
            fleet.url + "/api/generate",
            json={"model": "llama3", "prompt": "y", "stream": False},
        )
        assert response.code == 502
        error = (await response.json())["error"]
        assert "tried dead" in error and "within 500 ms" in error, error
        await hold.done
    finally:
        await fleet.stop()


@pytest_twisted.ensureDeferred
async def test_a_request_every_backend_fails_is_502_naming_each_one_tried(
    tmp_path: Path,
) -> None:
    """It fails only when no candidate is left: each backend tried once, then the answer."""
    fleet = DaemonUnderTest(await start_daemon(tmp_path, {"HealthCheckIntervalMs": 60000}))
    try:
        for name in ("a", "b", "c"):
            await fleet.add(name)
        await fleet.serve("a", "b", "c")
        for sim in fleet.sims.values():
            await sim.configure(refuse=True)
        response = await treq.post(
            fleet.url + "/api/generate", json={"model": "llama3", "prompt": "x", "stream": False}
        )
        assert response.code == 502
        error = (await response.json())["error"]
        assert all(name in error.split("tried ")[1].split(")")[0] for name in "abc"), error
    finally:
        await fleet.stop()
