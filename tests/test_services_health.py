"""Health checks: driven by a task.Clock and a fake HTTP client; end to end with simulators.

The fakes here (FakeHTTP, FakeResponse, World) are shared by the other service tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import attrs
import pytest
import pytest_twisted
from harness import until
from treq.client import HTTPClient
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from ollamaflow.catalog import Catalog, Registry
from ollamaflow.records import Backend, Frontend, HealthCheckMethod
from ollamaflow.runtime import MAX_HOLD, FailureKind, Runtime
from ollamaflow.services import HealthChecker
from ollamaflow.store import Snapshot
from ollamaflow.utctime import utc_clock

# -- shared fakes ------------------------------------------------------------------------------


class FakeTransport:
    """What a body protocol sees as its transport: records stopProducing (a closed connection)."""

    def __init__(self, response: FakeResponse) -> None:
        self.response = response

    def stopProducing(self) -> None:
        self.response.stopped = True
        self.response.finish(Failure(ConnectionLost("closed by the client")))

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class FakeResponse:
    """A response whose body is delivered at once (``chunks``) or by the test (``send``)."""

    def __init__(self, code: int = 200, *chunks: bytes, streaming: bool = False) -> None:
        self.code = code
        self.headers = Headers()
        self.chunks = chunks
        self.streaming = streaming
        self.protocol: Any = None
        self.finished = False
        self.stopped = False

    @classmethod
    def json(cls, data: object, code: int = 200) -> FakeResponse:
        return cls(code, json.dumps(data).encode())

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(FakeTransport(self))
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        if not self.streaming:
            self.finish()

    def send(self, *messages: dict[str, Any]) -> None:
        for message in messages:
            self.protocol.dataReceived(json.dumps(message).encode() + b"\n")

    def finish(self, reason: Failure | None = None) -> None:
        if self.finished or self.protocol is None:
            return
        self.finished = True
        self.protocol.connectionLost(reason or Failure(ResponseDone()))

    @property
    def consumed(self) -> bool:
        return self.finished


@attrs.define(eq=False)
class Call:
    """One request made through FakeHTTP; a pending one is answered with ``respond``."""

    method: str
    url: str
    headers: Headers
    data: bytes | None
    kwargs: dict[str, Any]
    cancelled: bool = False
    response: FakeResponse | None = None
    deferred: Deferred[FakeResponse] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.deferred = Deferred(lambda _d: setattr(self, "cancelled", True))

    @property
    def path(self) -> str:
        return "/" + self.url.split("/", 3)[3].split("?")[0]

    def respond(self, response: FakeResponse) -> None:
        self.response = response
        self.deferred.callback(response)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None


Handler = Callable[[Call], "FakeResponse | Deferred[FakeResponse] | None"]


class FakeHTTP:
    """Stands in for a treq.HTTPClient: records calls; ``handler`` answers (None = pending)."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.calls: list[Call] = []
        self.handler = handler

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Headers | None = None,
        data: bytes | None = None,
        **kwargs: Any,
    ) -> Deferred[FakeResponse]:
        call = Call(method, url, headers or Headers(), data, kwargs)
        self.calls.append(call)
        result = self.handler(call) if self.handler is not None else None
        if isinstance(result, FakeResponse):
            call.response = result
            return succeed(result)
        if isinstance(result, Deferred):
            return result
        return call.deferred

    def to(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]


class _NoStore:
    """Registry's store, never used: tests publish catalogs directly."""


@attrs.define
class World:
    """A registry, runtime, clock and fake HTTP client; ``publish`` simulates admin writes."""

    http: FakeHTTP = attrs.field(factory=FakeHTTP)
    clock: task.Clock = attrs.field(factory=task.Clock)
    runtime: Runtime = attrs.field(factory=Runtime)
    registry: Registry = attrs.field(
        factory=lambda: Registry(cast(Any, _NoStore()), Catalog.build(Snapshot(0, (), ())))
    )

    def publish(self, *records: Backend | Frontend) -> Catalog:
        backends = tuple(r for r in records if isinstance(r, Backend))
        frontends = tuple(r for r in records if isinstance(r, Frontend))
        generation = self.registry.catalog.generation + 1
        self.registry.publish(Catalog.build(Snapshot(generation, frontends, backends)))
        return self.registry.catalog

    def mark_healthy(self, *identifiers: str) -> None:
        now = utc_clock(self.clock.seconds)()
        for identifier in identifiers:
            self.runtime.state(identifier).succeeded(now, 1)


def backend(identifier: str = "b1", **fields: Any) -> Backend:
    fields.setdefault("hostname", f"{identifier}.example")
    return Backend(identifier=identifier, **fields)


# -- health checks with a clock ----------------------------------------------------------------


@attrs.define
class Health:
    world: World
    checker: HealthChecker
    transitions: list[tuple[str, bool]]
    status: list[int]

    @property
    def calls(self) -> list[Call]:
        return self.world.http.calls

    def state(self, identifier: str = "b1") -> Any:
        return self.world.runtime.states.get(identifier)


@pytest.fixture
def health() -> Any:
    world = World()
    status = [200]
    world.http.handler = lambda call: FakeResponse(status[0], b"Ollama is running")
    transitions: list[tuple[str, bool]] = []
    checker = HealthChecker(
        registry=world.registry,
        runtime=world.runtime,
        clock=world.clock,
        http=world.http,
        interval=5.0,
        timeout=3.0,
        on_transition=lambda be, healthy: transitions.append((be.identifier, healthy)),
    )
    world.registry.subscribe(checker.configuration_changed)
    yield Health(world, checker, transitions, status)
    checker.stopService()
    assert world.clock.getDelayedCalls() == []


def test_first_check_is_immediate_then_every_interval(health: Health) -> None:
    health.world.publish(backend(healthy_threshold=1))
    health.checker.startService()
    assert len(health.calls) == 1
    call = health.calls[0]
    assert (call.method, call.url) == ("GET", "http://b1.example:11434/")
    assert health.state().healthy
    assert health.transitions == [("b1", True)]
    health.world.clock.advance(4.9)
    assert len(health.calls) == 1
    health.world.clock.advance(0.1)
    assert len(health.calls) == 2
    health.world.clock.pump([5.0] * 3)
    assert len(health.calls) == 5


def test_thresholds_both_ways(health: Health) -> None:
    health.world.publish(backend(healthy_threshold=2, unhealthy_threshold=3))
    health.checker.startService()
    assert health.state().healthy, "never judged before: one success serves at once"
    assert health.transitions == [("b1", True)]

    health.status[0] = 503
    health.world.clock.pump([5, 5])
    assert health.state().healthy
    assert health.state().consecutive_failures == 2
    health.world.clock.advance(5)
    state = health.state()
    assert not state.healthy
    assert state.last_error == "HTTP 503"
    assert state.unhealthy_since is not None
    assert health.transitions == [("b1", True), ("b1", False)]

    health.status[0] = 204
    health.world.clock.advance(5)
    assert not health.state().healthy
    health.world.clock.advance(5)
    assert health.state().healthy
    assert health.transitions[-1] == ("b1", True)


def test_after_a_failure_the_healthy_threshold_applies(health: Health) -> None:
    health.status[0] = 500
    health.world.publish(backend(healthy_threshold=2))
    health.checker.startService()
    assert not health.state().healthy
    health.status[0] = 200
    health.world.clock.advance(5)
    assert not health.state().healthy and health.state().consecutive_successes == 1
    health.world.clock.advance(5)
    assert health.state().healthy
    assert health.transitions == [("b1", True)]


def test_unhealthy_from_the_first_failure(health: Health) -> None:
    health.status[0] = 500
    health.world.publish(backend(unhealthy_threshold=2))
    health.checker.startService()
    state = health.state()
    assert not state.healthy
    assert state.unhealthy_since is not None
    assert health.transitions == []


def test_timeout_cancels_the_request_and_counts_as_failure(health: Health) -> None:
    health.world.http.handler = None  # every request stays pending
    health.world.publish(backend())
    health.checker.startService()
    first = health.calls[0]
    health.world.clock.advance(2.9)
    assert not first.cancelled
    assert health.state() is None
    health.world.clock.advance(0.1)
    assert first.cancelled
    assert health.state().last_error == "no answer within 3s"
    health.world.clock.advance(2)  # next check at start + interval
    assert len(health.calls) == 2


def test_a_check_stuck_on_a_hung_connection_does_not_put_off_the_next(health: Health) -> None:
    """A timeout longer than the interval is cut to it: checks never overlap, and a hung
    backend gets a verdict every interval, not every timeout."""
    health.world.http.handler = None
    health.checker.timeout = 10.0
    health.world.publish(backend(healthy_threshold=1))
    health.checker.startService()
    health.world.clock.advance(4.9)
    assert len(health.calls) == 1 and not health.calls[0].cancelled
    health.world.clock.advance(0.1)
    assert health.calls[0].cancelled, "given up at the interval, not the 10 s timeout"
    assert health.state().last_error == "no answer within 5s"
    assert len(health.calls) == 2, "the next check starts on time"
    health.calls[1].respond(FakeResponse(200))
    assert health.state().healthy


def test_a_check_that_raises_does_not_stop_the_loop(health: Health) -> None:
    answers: list[Any] = [TypeError("boom"), FakeResponse(200)]

    def handler(call: Call) -> FakeResponse:
        answer = answers.pop(0) if answers else FakeResponse(200)
        if isinstance(answer, Exception):
            raise answer
        return cast(FakeResponse, answer)

    health.world.http.handler = handler
    health.world.publish(backend(healthy_threshold=1))
    health.checker.startService()
    assert health.state().last_error == "boom"
    assert not health.state().healthy
    health.world.clock.advance(5)
    assert health.state().healthy
    health.world.clock.advance(5)
    assert len(health.calls) == 3


def test_connection_refused_is_a_failure(health: Health) -> None:
    def refused(call: Call) -> Deferred[FakeResponse]:
        failed: Deferred[FakeResponse] = Deferred()
        failed.errback(ConnectionRefusedError("connection refused"))
        return failed

    health.world.http.handler = refused
    health.world.publish(backend())
    health.checker.startService()
    assert "refused" in health.state().last_error


def test_each_check_reports_its_result_and_latency(health: Health) -> None:
    checks: list[tuple[str, bool, float]] = []
    health.checker.on_check = lambda be, ok, seconds: checks.append((be.identifier, ok, seconds))
    health.world.http.handler = None  # answered by hand below
    health.world.publish(backend())
    health.checker.startService()
    health.world.clock.advance(0.25)
    health.calls[0].respond(FakeResponse(200))
    health.world.clock.advance(4.75)
    health.calls[1].respond(FakeResponse(503))
    health.world.clock.advance(5)  # the third gets no answer: a timeout, 3 s
    health.world.clock.advance(3)
    assert checks == [("b1", True, 0.25), ("b1", False, 0.0), ("b1", False, 3.0)]

    def explode(be: Backend, ok: bool, seconds: float) -> None:
        raise RuntimeError("listener bug")

    health.checker.on_check = explode
    health.world.clock.advance(2)
    health.calls[3].respond(FakeResponse(200))
    assert health.state().consecutive_successes == 1, "a failing listener changes nothing"


def test_transition_listener_that_raises_is_contained(health: Health) -> None:
    def explode(be: Backend, healthy: bool) -> None:
        raise RuntimeError("listener bug")

    health.checker.on_transition = explode
    health.world.publish(backend(healthy_threshold=1))
    health.checker.startService()
    assert health.state().healthy
    health.world.clock.advance(5)
    assert len(health.calls) == 2


def test_request_carries_method_url_query_token_and_headers(health: Health) -> None:
    responses: list[FakeResponse] = []

    def handler(call: Call) -> FakeResponse:
        responses.append(FakeResponse(200, b"some ", b"body"))
        return responses[-1]

    health.world.http.handler = handler
    health.world.publish(
        backend(
            hostname="10.0.0.5",
            port=8080,
            ssl=True,
            health_check_method=HealthCheckMethod.HEAD,
            health_check_url="/health?deep=1",
            querystring="key=abc",
            bearer_token="sekret",
            headers={"X-Tenant": "blue"},
        )
    )
    health.checker.startService()
    call = health.calls[0]
    assert call.method == "HEAD"
    assert call.url == "https://10.0.0.5:8080/health?deep=1&key=abc"
    assert call.header("Authorization") == "Bearer sekret"
    assert call.header("X-Tenant") == "blue"
    assert call.kwargs["allow_redirects"] is False
    assert responses[0].consumed


def test_body_is_consumed_on_failure_too(health: Health) -> None:
    responses: list[FakeResponse] = []

    def handler(call: Call) -> FakeResponse:
        responses.append(FakeResponse(500, b'{"error":"down"}'))
        return responses[-1]

    health.world.http.handler = handler
    health.world.publish(backend(querystring="a=1"))
    health.checker.startService()
    assert health.calls[0].url == "http://b1.example:11434/?a=1"
    assert responses[0].consumed
    assert health.state().last_error == "HTTP 500"


def test_a_created_or_changed_backend_is_checked_at_once(health: Health) -> None:
    health.checker.startService()
    assert health.calls == []
    health.world.clock.advance(2)
    health.world.publish(backend(healthy_threshold=1))
    assert len(health.calls) == 1
    health.world.clock.advance(1)
    health.world.publish(backend(healthy_threshold=1, port=9999))
    assert len(health.calls) == 2
    assert health.calls[1].url == "http://b1.example:9999/"
    # The old loop's timer is gone: the next check is 5 s after the change.
    health.world.clock.advance(4.9)
    assert len(health.calls) == 2
    health.world.clock.advance(0.1)
    assert len(health.calls) == 3
    # An unrelated write (a frontend) does not trigger a check.
    health.world.publish(backend(healthy_threshold=1, port=9999), Frontend(identifier="f1"))
    assert len(health.calls) == 3


def test_a_deleted_or_deactivated_backend_stops_at_once(health: Health) -> None:
    health.world.publish(backend("b1"), backend("b2"))
    health.checker.startService()
    assert len(health.calls) == 2
    assert health.checker.checking() == {"b1", "b2"}
    health.world.publish(backend("b2", active=False))
    assert health.checker.checking() == frozenset()
    health.world.clock.advance(60)
    assert len(health.calls) == 2


def test_an_in_flight_check_of_a_deleted_backend_is_dropped(health: Health) -> None:
    health.world.http.handler = None
    health.world.publish(backend())
    health.checker.startService()
    pending = health.calls[0]
    health.world.publish()
    health.world.runtime.forget_all_but(health.world.registry.catalog.backends)
    assert pending.cancelled
    assert "b1" not in health.world.runtime.states
    health.world.clock.advance(60)
    assert len(health.calls) == 1
    assert "b1" not in health.world.runtime.states


def test_passive_failures_take_a_backend_out(health: Health) -> None:
    be = backend(healthy_threshold=1, unhealthy_threshold=2)
    health.world.publish(be)
    health.checker.startService()
    assert health.state().healthy
    health.checker.report_failure(be, "connection refused")
    assert health.state().healthy
    health.checker.report_failure(be, "HTTP 502")
    assert not health.state().healthy
    assert health.state().last_error == "HTTP 502"
    assert health.transitions == [("b1", True), ("b1", False)]
    # A backend no longer configured gets no state back.
    health.checker.report_failure(backend("ghost"), "refused")
    assert "ghost" not in health.world.runtime.states


def test_a_failed_request_takes_a_backend_out_of_rotation_until_a_check_passes(
    health: Health,
) -> None:
    """Out at once (no queued request is handed to it), a check called for right away, and
    back only when a check started after the failure passes."""
    available: list[str] = []
    health.checker.on_available = lambda be: available.append(be.identifier)
    be = backend(healthy_threshold=1, unhealthy_threshold=3)
    health.world.publish(be)
    health.checker.startService()
    assert health.state().in_rotation and len(health.calls) == 1
    health.world.clock.advance(1)
    health.checker.report_failure(be, "connection refused")
    state = health.state()
    assert state.healthy and state.suspect and not state.in_rotation
    assert len(health.calls) == 1
    health.world.clock.advance(0)
    assert len(health.calls) == 2, "the check runs now, not at the next interval"
    assert state.in_rotation and available == ["b1"]
    health.world.clock.advance(4.9)
    assert len(health.calls) == 2, "then every interval again"
    health.world.clock.advance(0.1)
    assert len(health.calls) == 3


def test_a_check_that_began_before_the_failure_does_not_clear_it(health: Health) -> None:
    health.world.http.handler = None  # checks wait for an answer
    be = backend(healthy_threshold=1, unhealthy_threshold=3)
    health.world.publish(be)
    health.checker.startService()
    health.calls[0].respond(FakeResponse(200))
    health.world.clock.advance(5)
    in_flight = health.calls[1]
    health.world.clock.advance(0.5)
    health.checker.report_failure(be, "HTTP 503")
    in_flight.respond(FakeResponse(200))
    assert health.state().suspect, "that check began before the failure"
    health.world.clock.advance(0)
    assert len(health.calls) == 3, "the one called for starts as soon as it ends"
    health.calls[2].respond(FakeResponse(200))
    assert health.state().in_rotation


def test_failures_a_check_cannot_see_hold_a_backend_out_longer_each_time(
    health: Health,
) -> None:
    """Streams cut midway: a check passes, so only time brings the backend back; the hold
    doubles while the failures recur, so it does not flap in and out between them."""
    be = backend(healthy_threshold=1, unhealthy_threshold=2)
    health.world.publish(be)
    health.checker.startService()
    state = health.state()
    holds = []
    for _ in range(4):
        health.checker.report_failure(be, "broke off a response", FailureKind.CUT_STREAM)
        assert state.in_rotation, "one cut stream is not enough"
        health.checker.report_failure(be, "broke off a response", FailureKind.CUT_STREAM)
        assert not state.in_rotation
        out = health.world.clock.seconds()
        while not state.in_rotation:
            health.world.clock.advance(0.5)
        holds.append(health.world.clock.seconds() - out)
    assert holds == [5.0, 10.0, 20.0, 40.0], "the interval, doubled each time"
    health.world.clock.advance(2 * MAX_HOLD + 1)
    health.checker.report_failure(be, "broke off a response", FailureKind.CUT_STREAM)
    health.checker.report_failure(be, "broke off a response", FailureKind.CUT_STREAM)
    out = health.world.clock.seconds()
    while not state.in_rotation:
        health.world.clock.advance(0.5)
    assert health.world.clock.seconds() - out == 5.0, "a quiet spell starts it over"


def test_requests_sent_before_a_hold_do_not_lengthen_it(health: Health) -> None:
    """The box's slots were full when it was held out: the streams it cuts as they come back
    are not new evidence, so the hold stays one interval and ends."""
    be = backend(healthy_threshold=1, unhealthy_threshold=2)
    health.world.publish(be)
    health.checker.startService()
    state = health.state()
    for _ in range(8):
        health.checker.report_failure(be, "broke off a response", FailureKind.CUT_STREAM)
    assert state.holds == 1 and state.suspect_until == 5.0
    health.world.clock.pump([0.5] * 12)
    assert state.in_rotation
    assert state.probation, "back on probation: one at a time"


def test_a_backend_failing_requests_and_checks_turns_unhealthy_within_one_round_trip(
    health: Health,
) -> None:
    """A timed-out request counts as a failed check and calls for a check now: a hung box
    leaves the healthy set a check timeout later, not after UnhealthyThreshold intervals."""
    be = backend(healthy_threshold=1, unhealthy_threshold=2)
    health.world.publish(be)
    health.checker.startService()
    health.world.http.handler = None  # from now on the box hangs
    health.world.clock.advance(1)
    health.checker.report_failure(be, "no response within 8000 ms")
    assert health.state().healthy and not health.state().in_rotation
    health.world.clock.advance(0)
    health.world.clock.advance(3)
    assert not health.state().healthy
    assert health.state().last_error == "no answer within 3s"


def test_stop_cancels_everything(health: Health) -> None:
    health.world.http.handler = None
    health.world.publish(backend())
    health.checker.startService()
    health.checker.stopService()
    assert health.calls[0].cancelled
    assert health.world.clock.getDelayedCalls() == []
    health.world.publish(backend(port=1))
    assert len(health.calls) == 1


# -- end to end with simulators ----------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def real_http() -> AsyncIterator[Any]:
    """A treq client on the real reactor with its own pool, closed at teardown."""
    from twisted.internet import reactor

    pool = HTTPConnectionPool(reactor, persistent=True)
    yield HTTPClient(Agent(reactor, connectTimeout=2, pool=pool))
    await pool.closeCachedConnections()


def sim_backend(identifier: str, sim: Any, **fields: Any) -> Backend:
    return Backend(identifier=identifier, hostname="127.0.0.1", port=sim.port, **fields)


@pytest_twisted.ensureDeferred
async def test_simulator_goes_down_and_comes_back(simulators: Any, real_http: Any) -> None:
    from twisted.internet import reactor

    sim = await simulators()
    world = World(http=real_http)  # its fake clock stays still: the services get the reactor
    world.publish(sim_backend("b1", sim, healthy_threshold=1, unhealthy_threshold=2))
    changes: list[bool] = []
    checker = HealthChecker(
        registry=world.registry,
        runtime=world.runtime,
        clock=reactor,
        http=real_http,
        interval=0.05,
        timeout=1.0,
        on_transition=lambda be, healthy: changes.append(healthy),
    )
    world.registry.subscribe(checker.configuration_changed)
    checker.startService()
    try:
        await until(lambda: changes == [True])
        await sim.configure(refuse=True)
        await until(lambda: changes == [True, False])
        state = world.runtime.states["b1"]
        assert state.consecutive_failures >= 2
        assert state.last_error
        await sim.configure(refuse=False)
        await until(lambda: changes == [True, False, True])
    finally:
        checker.stopService()
