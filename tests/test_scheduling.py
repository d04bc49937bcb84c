"""Load-aware scheduling: exact in-flight counts, per-backend limits, the bounded FIFO queue,
rate limits and LeastOutstanding — with a clock where timing matters, simulators end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from harness import DaemonUnderTest, start_daemon, until
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol

from ollamaflow.daemon import Daemon
from ollamaflow.gateway.scheduler import Eligible, QueueRefused, Scheduler
from ollamaflow.records import Backend, Frontend
from ollamaflow.runtime import MODEL_HOLD, ModelHolds, Runtime
from ollamaflow.sim.service import RunningSimulator

# -- the scheduler alone, on a clock ----------------------------------------------------------


def make(limit: int = 1, **frontend: Any) -> tuple[Scheduler, task.Clock, list[Backend], Frontend]:
    clock = task.Clock()
    backends = [Backend(identifier=n, max_parallel_requests=limit) for n in "ab"]
    fe = Frontend(identifier="f", backends=("a", "b"), **frontend)
    return Scheduler(clock, Runtime()), clock, backends, fe


def among(backends: list[Backend]) -> Eligible:
    """A waiter that may use these backends (the gateway asks its live candidates instead)."""
    by_id = {b.identifier: b for b in backends}
    return lambda backend: by_id.get(backend.identifier)


def fired(d: Deferred[Backend]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_slots_are_counted_per_backend_and_model() -> None:
    scheduler, _, (a, _b), _ = make(limit=2)
    scheduler.acquire(a, "llama3:latest")
    scheduler.acquire(a, None)
    assert not scheduler.has_slot(a)
    state = scheduler.runtime.state("a")
    assert (state.active_requests, state.active_by_model) == (2, {"llama3:latest": 1})
    scheduler.release(a, "llama3:latest")
    scheduler.release(a, None)
    assert (state.active_requests, state.active_by_model) == (0, {})


def test_waiters_take_freed_slots_in_fifo_order_on_whichever_backend_frees() -> None:
    scheduler, clock, (a, b), fe = make()
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    first = fired(scheduler.wait(fe, [a, b], among([a, b]), None))
    clock.advance(1)
    second = fired(scheduler.wait(fe, [a, b], among([a, b]), None))
    assert scheduler.depth("f") == 2 and first == [] and second == []
    clock.advance(1)
    scheduler.release(b, None)
    assert first == [b], "the oldest waiter gets the first slot, on any backend"
    assert second == [] and not scheduler.has_slot(b), "the slot went with it"
    scheduler.release(a, None)
    assert second == [a]
    assert scheduler.depth("f") == 0
    stats = scheduler.stats["f"]
    assert (stats.queued, stats.served, stats.peak_depth) == (2, 2, 2)
    assert stats.max_wait == 2.0 and stats.total_wait == 3.0


def test_higher_priority_waiters_go_first_and_fifo_within_a_priority() -> None:
    """An API key's Priority orders the queue; a retried request keeps its priority and its
    place among its equals."""
    scheduler, clock, (a, b), fe = make()
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    order: list[str] = []

    def queued(name: str, priority: int) -> None:
        scheduler.wait(fe, [a, b], among([a, b]), None, priority).addCallback(
            lambda backend: order.append(name)
        )
        clock.advance(1)

    queued("low", -5)
    queued("plain-1", 0)
    queued("high-1", 10)
    queued("plain-2", 0)
    queued("high-2", 10)
    scheduler.wait_again(fe, among([a, b]), None, 0.5, 10).addCallback(
        lambda backend: order.append("high-0, retried")
    )
    for _ in range(6):
        backend = a if scheduler.runtime.state("a").active_requests else b
        scheduler.release(backend, None)
    assert order == ["high-0, retried", "high-1", "high-2", "plain-1", "plain-2", "low"]


def test_per_model_slots_hold_a_request_for_the_first_backend_with_that_model_free() -> None:
    clock = task.Clock()
    a, b = (Backend(identifier=n, model_parallel_requests=1) for n in "ab")
    fe = Frontend(identifier="f", backends=("a", "b"))
    scheduler = Scheduler(clock, Runtime())
    scheduler.acquire(a, "llama3:latest")
    scheduler.acquire(b, "llama3:latest")
    assert scheduler.has_slot(a, "all-minilm:latest"), "other models still fit"
    assert not scheduler.has_slot(a, "llama3:latest")
    llama = fired(scheduler.wait(fe, [a, b], among([a, b]), "llama3:latest"))
    scheduler.acquire(a, "all-minilm:latest")
    scheduler.release(a, "all-minilm:latest")
    assert llama == [], "a freed embedding slot is not a llama3 slot"
    scheduler.release(b, "llama3:latest")
    assert llama == [b]


def test_a_waiter_only_takes_backends_it_may_use() -> None:
    scheduler, _, (a, b), fe = make()
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    only_a = fired(scheduler.wait(fe, [a], among([a]), None))
    any_one = fired(scheduler.wait(fe, [a, b], among([a, b]), None))
    scheduler.release(b, None)
    assert only_a == [] and any_one == [b]


def test_the_queue_is_bounded() -> None:
    scheduler, _, (a, b), fe = make(max_queue_depth=1)
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    scheduler.wait(fe, [a, b], among([a, b]), None)
    with pytest.raises(QueueRefused, match="1 requests are already waiting"):
        scheduler.wait(fe, [a, b], among([a, b]), None)
    assert scheduler.stats["f"].rejected == 1


def test_a_waiter_gives_up_after_the_queue_timeout() -> None:
    scheduler, clock, (a, b), fe = make(queue_timeout_ms=500)
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    outcome = fired(scheduler.wait(fe, [a, b], among([a, b]), None))
    clock.advance(0.499)
    assert outcome == []
    clock.advance(0.001)
    assert outcome[0].check(QueueRefused) and "500 ms" in str(outcome[0].value)
    assert scheduler.depth("f") == 0 and scheduler.stats["f"].timed_out == 1
    scheduler.release(a, None)
    assert scheduler.has_slot(a), "nobody took the slot for the request that left"


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    scheduler, clock, (a, b), fe = make(queue_timeout_ms=500)
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    waiting = scheduler.wait(fe, [a, b], among([a, b]), None)
    waiting.addErrback(lambda _: None)
    waiting.cancel()
    assert scheduler.depth("f") == 0
    assert not clock.getDelayedCalls(), "its timer went with it"


def test_waiting_requests_are_counted_per_model_and_frontend_whatever_way_they_leave() -> None:
    """What placement and the preloader read: exact as waiters are served, time out or go."""
    scheduler, clock, (a, b), fe = make(queue_timeout_ms=500)
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    served = scheduler.wait(fe, [a, b], among([a, b]), "LLama3")
    cancelled = scheduler.wait(fe, [a, b], among([a, b]), "llama3:latest")
    cancelled.addErrback(lambda _: None)
    expired = fired(scheduler.wait(fe, [a, b], among([a, b]), "mistral"))
    assert scheduler.waiting_for("llama3:latest") == 2
    assert scheduler.waiting_models() == {"llama3:latest": {"f": 2}, "mistral:latest": {"f": 1}}
    cancelled.cancel()
    scheduler.release(a, None)
    assert fired(served)[0] is a
    assert scheduler.waiting_for("llama3:latest") == 0
    clock.advance(1)
    assert len(expired) == 1
    assert scheduler.waiting_models() == {}


def test_the_rate_limit_lowers_the_slots_and_the_rest_wait_in_the_queue() -> None:
    """RateLimitRequestsThreshold counts requests sent to the backend, never those waiting:
    below MaxParallelRequests it is the backend's slot count; it refuses nothing."""
    clock = task.Clock()
    backend = Backend(identifier="a", max_parallel_requests=4, rate_limit_requests_threshold=2)
    fe = Frontend(identifier="f", backends=("a",))
    scheduler = Scheduler(clock, Runtime())
    scheduler.acquire(backend, None)
    assert scheduler.has_slot(backend)
    scheduler.acquire(backend, None)
    assert not scheduler.has_slot(backend), "two in flight: the threshold is reached"
    waiting = [fired(scheduler.wait(fe, [backend], among([backend]), None)) for _ in range(20)]
    assert scheduler.depth("f") == 20 and scheduler.stats["f"].rejected == 0
    scheduler.release(backend, None)
    assert waiting[0] == [backend] and not scheduler.has_slot(backend)


def serve_burst(clients: int, hold: float) -> tuple[int, int, float]:
    """``clients`` requests at once on one backend at OllamaFlow 1.2's defaults (a migrated
    configuration: MaxParallelRequests 4, RateLimitRequestsThreshold 10) behind a frontend at
    ours, each holding its slot for ``hold`` seconds, admitted as the gateway admits them.
    Returns how many were answered, how many refused (at once or timed out in the queue), and
    the longest wait for a slot."""
    clock = task.Clock()
    backend = Backend(identifier="a")
    fe = Frontend(identifier="f", backends=("a",))
    scheduler = Scheduler(clock, Runtime())
    waits: list[float] = []
    refused: list[object] = []

    def served(_: object, arrived: float) -> None:
        waits.append(clock.seconds() - arrived)
        clock.callLater(hold, scheduler.release, backend, None)

    for _ in range(clients):
        if scheduler.has_slot(backend):
            scheduler.acquire(backend, None)
            served(backend, clock.seconds())
            continue
        try:
            waiting = scheduler.wait(fe, [backend], among([backend]), None)
        except QueueRefused as e:
            refused.append(e)
            continue
        waiting.addCallbacks(served, refused.append, callbackArgs=(clock.seconds(),))
    while clock.getDelayedCalls():
        clock.advance(hold)
    assert len(waits) + len(refused) == clients
    return len(waits), len(refused), max(waits)


@pytest.mark.parametrize("clients", [50, 500])
def test_a_burst_on_one_backend_at_1_2_defaults_is_queued_not_refused(clients: int) -> None:
    """Ollama alone queues up to 512 requests; behind OllamaFlow with a 1.2 configuration
    migrated as it is, a burst waits in the frontend's queue (MaxQueueDepth 512) for a slot
    instead of getting 429s, as long as each gets one within QueueTimeoutMs (30 s)."""
    answered, refused, longest = serve_burst(clients, hold=0.2)
    assert (answered, refused) == (clients, 0)
    assert longest == pytest.approx(0.2 * ((clients - 1) // 4)), "4 at a time, in turn"


def test_a_burst_beyond_what_the_queue_holds_or_waits_for_is_refused_by_the_queue() -> None:
    """The only 429s are the queue's: more waiting than MaxQueueDepth, or longer than
    QueueTimeoutMs."""
    answered, refused, _ = serve_burst(4 + 512 + 10, hold=0.01)
    assert (answered, refused) == (4 + 512, 10)
    answered, refused, longest = serve_burst(100, hold=2.0)
    assert (answered, refused) == (4 * 30 // 2, 100 - 4 * 30 // 2), "4 slots every 2 s for 30 s"
    assert longest == 28.0


def test_a_retried_request_waits_in_its_old_place_with_its_old_deadline() -> None:
    """Its attempt failed: it goes ahead of everyone who arrived after it, past a full queue,
    and gives up when the deadline it had on arrival passes."""
    scheduler, clock, (a, b), fe = make(max_queue_depth=1, queue_timeout_ms=1000)
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    arrived = clock.seconds()
    clock.advance(0.5)
    later = fired(scheduler.wait(fe, [a, b], among([a, b]), None))
    retried = fired(scheduler.wait_again(fe, among([a, b]), None, arrived))
    assert scheduler.depth("f") == 2, "the full queue takes it back all the same"
    scheduler.release(a, None)
    assert retried == [a] and later == []
    again = fired(scheduler.wait_again(fe, among([b]), None, arrived))
    clock.advance(0.499)
    assert again == []
    clock.advance(0.001)
    assert again[0].check(QueueRefused), "one second after it arrived, not after it came back"
    late = fired(scheduler.wait_again(fe, among([b]), None, arrived))
    assert late[0].check(QueueRefused), "a deadline already passed fails at once"


def test_who_may_take_a_slot_is_asked_when_it_frees() -> None:
    """Candidates are read at wake time: a backend that left a waiter's candidates after it
    queued is not handed to it, and one that joined is."""
    scheduler, _, (a, b), fe = make()
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    usable = {"a": a}
    waiting = fired(scheduler.wait(fe, [a], lambda be: usable.get(be.identifier), None))
    del usable["a"]
    usable["b"] = b
    scheduler.release(a, None)
    assert waiting == [] and scheduler.has_slot(a)
    scheduler.release(b, None)
    assert waiting == [b]


def test_a_backend_out_of_rotation_hands_its_slots_to_nobody() -> None:
    """The box that just failed a request would fail the queue one request after another."""
    scheduler, clock, (a, b), fe = make()
    scheduler.acquire(a, None)
    scheduler.acquire(b, None)
    waiting = fired(scheduler.wait(fe, [a, b], among([a, b]), None))
    scheduler.runtime.state("a").suspected(clock.seconds())
    scheduler.release(a, None)
    assert waiting == [] and scheduler.has_slot(a)
    scheduler.runtime.state("a").cleared(clock.seconds())
    scheduler.wake(a)
    assert waiting == [a]


def test_a_backend_on_probation_takes_one_request_at_a_time() -> None:
    """Back from a hold, a box is not handed a whole queue at once (LeastOutstanding would
    send everything to the idle newcomer): one request, until a stream is answered whole."""
    scheduler, _, (a, _b), _ = make(limit=4)
    state = scheduler.runtime.state("a")
    state.probation = True
    assert scheduler.has_slot(a)
    scheduler.acquire(a, None)
    assert not scheduler.has_slot(a)
    state.answered_whole(streamed=False)
    assert not scheduler.has_slot(a), "an embedding says nothing of the streams it cut"
    state.answered_whole(streamed=True)
    assert scheduler.has_slot(a) and state.hidden_failures == 0


def test_a_model_a_backend_fails_while_others_answer_is_steered_away_from_it_alone() -> None:
    """Blamed 500s hold one model off one backend, for a while; the backend keeps every other
    model, and a model is never steered off every candidate."""
    a, b = (Backend(identifier=n) for n in "ab")
    holds = ModelHolds()
    assert not holds.blamed("a", "big:latest", 0.0, threshold=2)
    holds.answered("a", "big:latest")
    assert not holds.blamed("a", "big:latest", 1.0, threshold=2), "a good answer starts over"
    assert holds.blamed("a", "big:latest", 2.0, threshold=2)
    assert holds.steer([a, b], "big:latest", 3.0) == [b]
    assert holds.steer([a, b], "small:latest", 3.0) == [a, b]
    assert holds.steer([a], "big:latest", 3.0) == [a], "the last candidate is kept"
    assert holds.steer([a, b], "big:latest", 2.0 + MODEL_HOLD) == [a, b]
    assert not holds, "an expired hold is forgotten"


# -- end to end -----------------------------------------------------------------------------


class Setup(DaemonUnderTest):
    """A fleet whose backends have slot limits and simulators with room to spare."""

    async def add(self, name: str, *, limit: int = 4, **config: Any) -> RunningSimulator:
        limits = {"MaxParallelRequests": limit, "RateLimitRequestsThreshold": 1000}
        return await super().add(name, backend=limits, num_parallel=64, **config)

    def in_flight(self, name: str) -> tuple[int, dict[str, int]]:
        state = self.daemon.runtime.state(name)
        return state.active_requests, dict(state.active_by_model)

    def generate(self, prompt: str = "x", path: str = "/api/generate", **kw: Any) -> Any:
        body = {"model": "llama3", "prompt": prompt, "stream": False}
        return treq.post(self.url + path, json=body, persistent=False, **kw)


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    made = Setup(await start_daemon(tmp_path, {"HealthCheckIntervalMs": 60000}))
    yield made
    await made.stop()


@pytest_twisted.ensureDeferred
async def test_in_flight_returns_to_zero_on_every_exit_path(setup: Setup) -> None:
    sim = await setup.add("a", limit=8, tokens=5, tokens_per_second=50)
    await setup.add("b")
    await setup.serve("a", TimeoutMs=400)

    async def settled() -> None:
        await until(lambda: setup.in_flight("a") == (0, {}))
        # Passive health counts the faults below; put "a" back for the next exit path.
        state = setup.daemon.runtime.state("a")
        while not state.healthy:
            state.succeeded(setup.daemon.now(), threshold=2)

    # success
    response = await setup.generate()
    await response.content()
    await settled()
    # backend error
    await sim.configure(error500=True)
    assert (await setup.generate()).code == 500
    await settled()
    await sim.configure(error500=False)
    # time-out before the first byte
    await sim.configure(hang=True)
    assert (await setup.generate()).code == 504
    await settled()
    await sim.configure(hang=False)
    # client disconnect, before the response and in the middle of a stream
    pending = setup.generate()
    await until(lambda: setup.in_flight("a")[0] == 1)
    pending.cancel()
    with pytest.raises(Exception):  # noqa: B017 - treq's error for a cancelled request
        await pending
    await settled()
    streaming = await treq.post(
        setup.url + "/api/generate", json={"model": "llama3", "prompt": "x"}, unbuffered=True
    )
    assert setup.in_flight("a") == (1, {"llama3:latest": 1})
    streaming.deliverBody(_Dropper())
    await settled()
    # the backend breaking off a stream
    await sim.configure(drop_mid_stream_after=2)
    torn = await treq.post(setup.url + "/api/generate", json={"model": "llama3", "prompt": "x"})
    with pytest.raises(Exception):  # noqa: B017 - the client's error for a torn stream
        await torn.content()
    await settled()
    await sim.configure(drop_mid_stream_after=None)
    # a retry: a refusing backend, then the other one
    await setup.serve("a", "b", LoadBalancing="RoundRobin", TimeoutMs=400)
    await sim.configure(refuse=True)
    for _ in range(2):
        response = await setup.generate()
        assert response.code == 200
        await response.content()
    await settled()
    await until(lambda: setup.in_flight("b") == (0, {}))


async def loaded_and_known(daemon: Daemon, sim: RunningSimulator, backend: str) -> None:
    """Load llama3 on the simulator and let the daemon read it, then zero its counters: the
    gateway reads a backend's models again when it sees one loaded, and that read would count
    among the requests the simulator has at once."""
    await treq.post(sim.url + "/api/generate", json={"model": "llama3", "prompt": ""})
    await daemon.inventory.refresh_now(backend)
    assert daemon.inventory.is_loaded(backend, "llama3")
    sim.counters.reset()


class _Dropper(Protocol):
    """Reads the first chunk, then hangs up."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_max_parallel_requests_is_enforced_and_the_rest_wait(setup: Setup) -> None:
    sim = await setup.add("a", limit=2, tokens=10, tokens_per_second=100)
    await setup.serve("a")
    await loaded_and_known(setup.daemon, sim, "a")
    responses = [setup.generate(str(i)) for i in range(6)]
    await until(lambda: setup.daemon.gateway.scheduler.depth("frontend1") == 4)
    health = (await setup.http.get("/v1.0/health")).json
    queue = next(q for q in health["Queues"] if q["Identifier"] == "frontend1")
    assert queue["QueueDepth"] == 4
    for pending in responses:
        response = await pending
        assert response.code == 200
        await response.content()
    assert sim.counters.peak_in_flight == 2, "never more than MaxParallelRequests at once"
    health = (await setup.http.get("/v1.0/health")).json
    queue = next(q for q in health["Queues"] if q["Identifier"] == "frontend1")
    assert queue["QueueDepth"] == 0 and queue["ServedFromQueue"] == 4
    assert queue["PeakQueueDepth"] == 4 and queue["AverageQueueWaitMs"] > 0


@pytest_twisted.ensureDeferred
async def test_a_full_queue_and_a_long_wait_are_429_with_retry_after(setup: Setup) -> None:
    await setup.add("a", limit=1, tokens=20, tokens_per_second=20)
    await setup.serve("a", MaxQueueDepth=1, QueueTimeoutMs=300)
    busy = setup.generate("long")
    await until(lambda: setup.in_flight("a")[0] == 1)
    queued = setup.generate("waits")
    await until(lambda: setup.daemon.gateway.scheduler.depth("frontend1") == 1)
    refused = await setup.generate("no room")
    assert refused.code == 429 and refused.headers.getRawHeaders("retry-after") == ["1"]
    assert "already waiting" in (await refused.json())["error"]
    openai = await setup.generate(path="/v1/completions")
    assert openai.code == 429
    assert (await openai.json())["error"]["message"].startswith("frontend 'frontend1'")
    timed_out = await queued
    assert timed_out.code == 429 and "within 300 ms" in (await timed_out.json())["error"]
    await (await busy).content()


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_the_queue_is_removed(setup: Setup) -> None:
    sim = await setup.add("a", limit=1, tokens=20, tokens_per_second=40)
    await setup.serve("a")
    busy = setup.generate("long")
    await until(lambda: setup.in_flight("a")[0] == 1)
    queued = setup.generate("leaves")
    await until(lambda: setup.daemon.gateway.scheduler.depth("frontend1") == 1)
    queued.cancel()
    with pytest.raises(Exception):  # noqa: B017 - treq's error for a cancelled request
        await queued
    await until(lambda: setup.daemon.gateway.scheduler.depth("frontend1") == 0)
    await (await busy).content()
    await until(lambda: setup.in_flight("a") == (0, {}))
    assert sim.counters.requests["/api/generate"] == 1, "the one that left never got there"


@pytest_twisted.ensureDeferred
async def test_least_outstanding_sends_new_work_to_the_idle_backend(setup: Setup) -> None:
    slow = await setup.add("slow", tokens=40, tokens_per_second=20)
    await setup.add("fast")
    await setup.serve("slow")
    long = setup.generate("long")
    await until(lambda: setup.in_flight("slow")[0] == 1)
    await setup.serve("slow", "fast")  # LeastOutstanding: the default for frontend1
    served = []
    for _ in range(5):
        response = await setup.generate("short")
        await response.content()
        served.append(response.headers.getRawHeaders("x-ollamaflow-backend")[0])
    assert served == ["fast"] * 5, "round robin would have sent every other one to 'slow'"
    assert slow.counters.requests["/api/generate"] == 1
    await (await long).content()


@pytest_twisted.ensureDeferred
async def test_warm_backends_are_preferred_unless_saturated(setup: Setup) -> None:
    warm = await setup.add("warm", limit=1, tokens=20, tokens_per_second=40)
    await setup.add("cold", limit=1)
    await setup.serve("warm", "cold")
    await treq.post(warm.url + "/api/generate", json={"model": "llama3", "prompt": ""})
    await setup.daemon.inventory.refresh_now("warm")
    first = setup.generate("a")
    await until(lambda: setup.in_flight("warm")[0] == 1)
    second = await setup.generate("b")
    await second.content()
    assert second.headers.getRawHeaders("x-ollamaflow-backend") == ["cold"], (
        "a saturated warm backend does not hold a request back"
    )
    response = await first
    await response.content()
    assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["warm"]


@pytest_twisted.ensureDeferred
async def test_50_clients_at_once_on_one_backend_at_1_2_defaults_are_all_answered(
    tmp_path: Path,
) -> None:
    """A 1.2 backend record as it is (MaxParallelRequests 4, RateLimitRequestsThreshold 10)
    and a frontend at our defaults: the burst queues, as Ollama would queue it, and every
    client gets its answer; the backend never has more than 4 at once."""
    fleet = DaemonUnderTest(await start_daemon(tmp_path, {"HealthCheckIntervalMs": 60000}))
    try:
        sim = await fleet.add("gpu", num_parallel=4, tokens=10, tokens_per_second=200)
        record = (await fleet.http.get("/v1.0/backends/gpu")).json
        assert (record["MaxParallelRequests"], record["RateLimitRequestsThreshold"]) == (4, 10)
        await fleet.serve("gpu")
        await loaded_and_known(fleet.daemon, sim, "gpu")
        body = {"model": "llama3", "prompt": "hi", "stream": False}
        responses = await gatherResults(
            [treq.post(fleet.url + "/api/generate", json=body, persistent=False) for _ in range(50)]
        )
        assert [r.code for r in responses] == [200] * 50
        for response in responses:
            assert (await response.json())["done"] is True
        assert sim.counters.peak_in_flight == 4
        health = (await fleet.http.get("/v1.0/health")).json
        queue = next(q for q in health["Queues"] if q["Identifier"] == "frontend1")
        assert queue["Rejected"] == 0 and queue["TimedOut"] == 0
        assert queue["PeakQueueDepth"] > 10, "the burst waited in the queue, past the threshold"
        assert queue["ServedFromQueue"] == queue["Queued"]
    finally:
        await fleet.stop()
