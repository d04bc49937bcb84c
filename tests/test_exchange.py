"""The exchange in memory: attempts, retries, first-byte deadlines, the queue, backpressure and
client loss, on a ``task.Clock`` with a fake backend client and a fake client request."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from fakerequest import Request
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from ollamaflow.credentials import NO_TOKENS
from ollamaflow.gateway.balancer import StickyPins
from ollamaflow.gateway.callers import ANONYMOUS_CALLER, Caller
from ollamaflow.gateway.classify import RequestClass
from ollamaflow.gateway.completed import Completed, RequestIds
from ollamaflow.gateway.context import ExchangeContext
from ollamaflow.gateway.deadlines import Deadlines
from ollamaflow.gateway.exchange import Exchange
from ollamaflow.gateway.routing import Forward
from ollamaflow.gateway.scheduler import Scheduler
from ollamaflow.records import ApiKey, Backend, Frontend
from ollamaflow.runtime import FailureKind, Runtime

NOW = datetime(2026, 1, 1, tzinfo=UTC)


# -- fakes -------------------------------------------------------------------------------------


@attrs.define
class BodyTransport:
    """The backend connection under a relayed body: a push producer."""

    paused: bool = False
    stopped: bool = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@attrs.define
class Response:
    code: int = 200
    phrase: bytes = b"OK"
    headers: Headers = attrs.field(factory=Headers)
    length: Any = None
    protocol: Any = None
    transport: BodyTransport = attrs.field(factory=BodyTransport)

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))

    def cut(self) -> None:
        self.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionRefusedError())])))


@attrs.define
class Attempt:
    backend: Backend
    target: bytes
    body: Any
    on_response: Callable[[Any], object]
    on_failure: Callable[[Failure], object]
    fired: bool = False

    def respond(self, response: Response) -> Response:
        assert not self.fired
        self.fired = True
        self.on_response(response)
        return response

    def fail(self, error: Exception) -> None:
        assert not self.fired
        self.fired = True
        self.on_failure(Failure(error))

    def cancel(self) -> None:
        if not self.fired:
            self.fail(CancelledError())


@attrs.define
class Sender:
    attempts: list[Attempt] = attrs.field(factory=list)

    def send(
        self,
        backend: Any,
        method: bytes,
        target: bytes,
        fields: Any,
        body: Any,
        on_response: Callable[[Any], object],
        on_failure: Callable[[Failure], object],
    ) -> Attempt:
        attempt = Attempt(backend, target, body, on_response, on_failure)
        self.attempts.append(attempt)
        return attempt

    def forget(self, keep: object) -> None:
        pass

    async def close(self) -> None:
        pass

    @property
    def last(self) -> Attempt:
        return self.attempts[-1]


@attrs.define
class World:
    clock: Clock
    runtime: Runtime
    scheduler: Scheduler
    sender: Sender
    context: ExchangeContext
    backends: dict[str, Backend]
    frontend: Frontend
    failures: list[tuple[str, str, FailureKind]]
    answered: list[tuple[str, bool]]
    completed: list[Completed]

    def forward(
        self,
        *order: str,
        request_class: RequestClass = RequestClass.COMPLETIONS,
        caller: Caller = ANONYMOUS_CALLER,
    ) -> Forward:
        return Forward(
            self.frontend,
            [self.backends[name] for name in order],
            request_class,
            {"model": "llama3"},
            "llama3",
            "llama3:latest",
            None,
            None,
            caller,
        )

    def run(
        self, *order: str, caller: Caller = ANONYMOUS_CALLER, **request: Any
    ) -> tuple[Exchange, Request]:
        client = Request(**request)
        forward = self.forward(*order, caller=caller)
        exchange = Exchange(self.context, client, forward)  # type: ignore[arg-type]
        assert exchange.run() is None
        return exchange, client

    def in_flight(self, name: str) -> int:
        return self.runtime.state(name).active_requests


def world(*names: str, slots: int = 4, **frontend: Any) -> World:
    clock = Clock()
    runtime = Runtime()
    backends = {
        name: Backend(identifier=name, max_parallel_requests=slots, unhealthy_threshold=2)
        for name in names
    }
    for name in names:
        runtime.state(name).succeeded(NOW, threshold=1)
    fe = Frontend(identifier="f", backends=names, **frontend)
    scheduler = Scheduler(clock, runtime)
    sender = Sender()
    failures: list[tuple[str, str, FailureKind]] = []
    answered: list[tuple[str, bool]] = []
    completed: list[Completed] = []

    def candidates_now(forward: Forward) -> list[Backend]:
        return [b for b in backends.values() if runtime.state(b.identifier).healthy]

    def configured() -> Mapping[str, Backend]:
        return backends

    context = ExchangeContext(
        clock=clock,
        scheduler=scheduler,
        upstream=sender,
        deadlines=Deadlines(clock),
        runtime=runtime,
        pins=StickyPins(),
        candidates_now=candidates_now,
        new_id=RequestIds(),
        observers=[completed.append],
        report=completed.append,
        backend_failed=lambda b, why, kind: failures.append((b.identifier, why, kind)),
        answered=lambda f, b, streamed: answered.append((b.identifier, streamed)),
        withheld=NO_TOKENS,
        configured=configured,
    )
    return World(
        clock, runtime, scheduler, sender, context, backends, fe, failures, answered, completed
    )


# -- the paths ---------------------------------------------------------------------------------


def test_a_stream_is_relayed_as_it_comes_and_the_slot_given_back_at_its_end() -> None:
    w = world("a", "b")
    exchange, client = w.run("a", "b")
    assert [a.backend.identifier for a in w.sender.attempts] == ["a"]
    assert w.in_flight("a") == 1
    response = w.sender.last.respond(Response(headers=Headers({b"X-Backend": [b"1"]})))
    assert client.started, "the head goes out at once, not with the first chunk"
    assert client.out[b"x-ollamaflow-backend"] == [b"a"] and client.out[b"x-backend"] == [b"1"]
    assert client.producer is response.transport, "the client paces the backend"
    response.send(b'{"n": 1}\n')
    response.send(b'{"n": 2, "done": true, "eval_count": 2}\n')
    assert client.body_out == b'{"n": 1}\n{"n": 2, "done": true, "eval_count": 2}\n'
    response.end()
    assert client.finished and w.in_flight("a") == 0
    assert w.answered == [("a", True)]
    assert w.context.running == set()
    [done] = w.completed
    assert (done.backend, done.status, done.outcome, done.eval_count) == ("a", 200, "ok", 2)
    assert exchange.relay is None


def test_a_refused_connection_is_retried_on_the_next_backend() -> None:
    w = world("a", "b")
    _, client = w.run("a", "b")
    w.sender.last.fail(ConnectionRefusedError())
    assert w.failures[0][0] == "a" and w.failures[0][2] is FailureKind.VISIBLE
    assert w.in_flight("a") == 0 and w.in_flight("b") == 1
    response = w.sender.last.respond(Response())
    response.send(b"ok")
    response.end()
    assert client.body_out == b"ok" and client.finished
    assert w.completed[0].retries == 1


@pytest.mark.parametrize("code", [502, 503, 504])
def test_a_gateway_error_is_retried_and_counted_against_the_backend(code: int) -> None:
    w = world("a", "b")
    _, client = w.run("a", "b")
    first = w.sender.last.respond(Response(code=code))
    assert first.transport.stopped is False, "read to its end, so the connection is reused"
    first.end()
    assert [f[0] for f in w.failures] == ["a"]
    second = w.sender.last.respond(Response())
    second.end()
    assert client.code == 200 and client.finished


def test_a_500_is_retried_once_and_blamed_only_when_another_backend_answers() -> None:
    w = world("a", "b", "c")
    _, client = w.run("a", "b", "c")
    w.sender.last.respond(Response(code=500)).end()
    w.sender.last.respond(Response(code=200)).end()
    assert client.code == 200
    assert w.failures == [], "a 500 never takes a backend out of rotation"
    holds = w.runtime.model_holds
    assert holds.blamed("a", "llama3:latest", w.clock.seconds(), 2), "one more steers it away"
    w2 = world("a", "b")
    _, client2 = w2.run("a", "b")
    w2.sender.last.respond(Response(code=500)).end()
    w2.sender.last.respond(Response(code=500)).end()
    assert client2.code == 500, "both said 500: the request's own answer, blamed on nobody"
    assert len(w2.sender.attempts) == 2


def test_every_backend_failing_is_a_502_naming_them() -> None:
    w = world("a", "b")
    _, client = w.run("a", "b")
    w.sender.last.fail(ConnectionRefusedError())
    w.sender.last.fail(ConnectionRefusedError())
    assert client.code == 502 and b"tried a, b" in client.body_out
    assert w.in_flight("a") == w.in_flight("b") == 0


def test_the_first_byte_deadline_cancels_the_attempt_and_moves_on_then_504() -> None:
    w = world("a", "b", timeout_ms=2000)
    _, client = w.run("a", "b")
    w.clock.advance(1.9)
    assert len(w.sender.attempts) == 1
    w.clock.advance(0.2)
    assert w.sender.attempts[0].fired and len(w.sender.attempts) == 2
    w.clock.advance(2.1)
    assert client.code == 504 and b"no response within 2000 ms" in client.body_out
    assert w.in_flight("a") == w.in_flight("b") == 0


def test_a_client_that_leaves_before_the_answer_cancels_the_attempt_and_frees_the_slot() -> None:
    w = world("a")
    _, client = w.run("a")
    client.leave()
    assert w.sender.last.fired, "the attempt was cancelled"
    assert w.in_flight("a") == 0 and w.context.running == set()
    assert w.completed[0].outcome == "client_gone"


def test_a_client_that_leaves_mid_stream_stops_the_backend() -> None:
    w = world("a")
    _, client = w.run("a")
    response = w.sender.last.respond(Response())
    response.send(b"part")
    client.leave()
    assert response.transport.stopped, "Ollama stops generating when its connection closes"
    assert w.in_flight("a") == 0
    response.cut()  # what the backend connection then reports
    assert w.completed[0].outcome == "client_gone" and len(w.completed) == 1


def test_a_stream_the_backend_cuts_is_cut_for_the_client_too() -> None:
    w = world("a", "b")
    _, client = w.run("a", "b")
    response = w.sender.last.respond(Response())
    response.send(b"part")
    response.cut()
    assert client.aborted and not client.finished, "never looks complete"
    assert w.failures == [("a", "broke off a response", FailureKind.CUT_STREAM)]
    assert len(w.sender.attempts) == 1, "after the first byte there is no retry"
    assert w.in_flight("a") == 0


def test_a_backend_gone_quiet_mid_stream_is_cut_off_after_the_idle_timeout() -> None:
    w = world("a", timeout_ms=1000)
    w.run("a")
    response = w.sender.last.respond(Response())
    w.clock.advance(0.9)
    response.send(b"x")
    w.clock.advance(0.9)
    assert not response.transport.stopped, "each chunk restarts the idle timer"
    w.clock.advance(0.2)
    assert response.transport.stopped


def test_requests_queue_for_a_slot_and_take_the_first_to_free() -> None:
    w = world("a", "b", slots=1, max_queue_depth=1, queue_timeout_ms=5000)
    w.run("a", "b")
    _, second = w.run("b", "a")
    assert w.in_flight("a") == w.in_flight("b") == 1
    waiting, third = w.run("a", "b")
    assert len(w.sender.attempts) == 2, "the third waits in the queue"
    client = Request()
    refused = Exchange(w.context, client, w.forward("a", "b")).run()  # type: ignore[arg-type]
    assert refused is not None, "the queue holds one"
    w.sender.attempts[1].respond(Response()).end()
    assert second.finished and w.sender.last.backend.identifier == "b"
    assert waiting.waited == 0.0
    w.sender.last.respond(Response()).end()
    assert third.finished


def test_a_keys_priority_puts_its_requests_ahead_in_the_queue_and_they_are_its_own() -> None:
    w = world("a", slots=1)
    w.run("a")
    low = Caller.of(ApiKey(identifier="batch", priority=-1))
    high = Caller.of(ApiKey(identifier="chat", priority=5))
    _, batch = w.run("a", caller=low)
    _, plain = w.run("a")
    _, chat = w.run("a", caller=high)
    order = [batch, plain, chat]
    finished: list[str] = []
    for _ in range(4):  # the request holding the slot, then the three queued
        w.sender.last.respond(Response()).end()
        finished += [("batch", "plain", "chat")[i] for i, c in enumerate(order) if c.finished]
        order = [c if not c.finished else Request() for c in order]
    assert finished == ["chat", "plain", "batch"]
    assert [c.api_key for c in w.completed] == ["anonymous", "chat", "anonymous", "batch"]


def test_a_queued_request_past_its_deadline_is_429() -> None:
    w = world("a", slots=1, queue_timeout_ms=3000)
    w.run("a")
    _, queued = w.run("a")
    w.clock.advance(3.0)
    assert queued.code == 429 and queued.out[b"retry-after"] == [b"2"]
    assert w.scheduler.depth("f") == 0


def test_a_bug_in_any_callback_answers_500_and_gives_the_slot_back() -> None:
    w = world("a")
    _, client = w.run("a")

    class Broken(Response):
        def deliverBody(self, protocol: Any) -> None:
            raise RuntimeError("bug")

    w.sender.last.respond(Broken())
    assert client.code == 500 and b"internal error" in client.body_out
    assert w.in_flight("a") == 0
    assert w.completed[0].outcome == "error"


def test_a_bug_after_the_response_began_cuts_it_off() -> None:
    w = world("a")
    _, client = w.run("a")
    response = w.sender.last.respond(Response())
    response.send(b"part")
    client.fail_writes = True
    response.send(b"more")
    assert client.aborted and w.in_flight("a") == 0
    assert response.transport.stopped
