"""The live feed, ``GET /v1.0/events``: in memory (a clock, a fake source, fake requests) for
what it sends when, and end to end against a daemon and simulators for what a dashboard sees."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from eventstream import EventReader, parse_events
from harness import TOKEN, Collect, DaemonUnderTest, Http, start_daemon, until
from logcapture import keeping
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from ollamaflow.admin.events import (
    KEEP_ALIVE_SECONDS,
    SAMPLE_SECONDS,
    SOON_SECONDS,
    EventFeed,
    TooManyListeners,
)

# -- in memory ---------------------------------------------------------------------------------


@attrs.define
class FakeSource:
    """Sections the test sets, and request lines it adds."""

    sections: dict[str, Any] = attrs.field(factory=lambda: {"daemon": {"ActiveRequests": 0}})
    lines: list[dict[str, Any]] = attrs.field(factory=list)
    samples: int = 0
    broken: bool = False

    def hello(self) -> dict[str, Any]:
        return {"Version": "test"}

    def sample(self) -> dict[str, Any]:
        self.samples += 1
        if self.broken:
            raise RuntimeError("a bug")
        return dict(self.sections)

    def requests_after(self, sequence: int, at_most: int) -> tuple[int, list[dict[str, Any]]]:
        return len(self.lines), self.lines[sequence:][-at_most:]

    def finished(self, n: int) -> None:
        self.lines.append({"Id": str(n)})


@attrs.define
class FakeStream:
    """A request the feed writes to: what it was sent, and a producer it registered."""

    headers: dict[bytes, bytes] = attrs.field(factory=dict)
    written: bytes = b""
    producer: IPushProducer | None = None
    finished: Deferred[None] = attrs.field(factory=Deferred)

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def write(self, data: bytes) -> None:
        self.written += data

    def notifyFinish(self) -> Deferred[None]:
        return self.finished

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        if self.finished.called:  # twisted.web's request has no channel left to ask
            raise AttributeError("'NoneType' object has no attribute 'unregisterProducer'")
        self.producer = None

    def lose(self) -> None:
        """The client went away: what twisted.web tells those waiting for the request."""
        self.finished.errback(Failure(ConnectionError("gone")))
        outcome: list[object] = []
        self.finished.addBoth(outcome.append)
        assert outcome == [None], f"what listened to the request's end failed: {outcome}"

    def events(self) -> list[tuple[str, Any]]:
        return parse_events(self.written)[0]

    def names(self) -> list[str]:
        return [name for name, _ in self.events()]

    def take(self) -> list[tuple[str, Any]]:
        """The events sent since the last take."""
        events = self.events()
        self.written = b""
        return events


def feed_of(source: FakeSource, **kw: Any) -> tuple[EventFeed, task.Clock]:
    clock = task.Clock()
    return EventFeed(clock, source, **kw), clock


def listening(source: FakeSource) -> tuple[EventFeed, task.Clock, FakeStream]:
    """A feed with one listener, past what it was sent on connecting."""
    feed, clock = feed_of(source)
    stream = FakeStream()
    feed.listen(stream)
    stream.take()
    return feed, clock, stream


def test_a_listener_gets_hello_then_every_section_then_the_latest_requests() -> None:
    source = FakeSource(sections={"daemon": {"A": 1}, "backends": []})
    source.finished(1)
    source.finished(2)
    feed, _ = feed_of(source)
    stream = FakeStream()
    feed.listen(stream)
    assert stream.headers[b"Content-Type"].startswith(b"text/event-stream")
    assert stream.headers[b"Cache-Control"] == b"no-store"
    assert stream.events() == [
        ("hello", {"Version": "test"}),
        ("daemon", {"A": 1}),
        ("backends", []),
        ("requests", [{"Id": "1"}, {"Id": "2"}]),
    ]


def test_only_what_changed_is_sent_and_the_same_bytes_go_to_everyone() -> None:
    source = FakeSource(sections={"daemon": {"A": 1}, "backends": [1]})
    feed, clock = feed_of(source)
    first, second = FakeStream(), FakeStream()
    feed.listen(first)
    feed.listen(second)
    first.take(), second.take()
    clock.advance(SAMPLE_SECONDS)
    assert first.take() == [] and second.take() == []
    source.sections["backends"] = [1, 2]
    source.finished(1)
    clock.advance(SAMPLE_SECONDS)
    sent = [("backends", [1, 2]), ("requests", [{"Id": "1"}])]
    assert first.take() == sent
    assert second.take() == sent


def test_nothing_is_sampled_while_nobody_listens() -> None:
    source = FakeSource()
    feed, clock = feed_of(source)
    clock.advance(60)
    assert source.samples == 0
    stream = FakeStream()
    feed.listen(stream)
    clock.pump([SAMPLE_SECONDS] * 3)
    assert source.samples == 4  # on joining, then once a second
    stream.lose()
    assert feed.listeners == set()
    clock.advance(60)
    assert source.samples == 4
    assert clock.getDelayedCalls() == []


def test_a_listener_that_leaves_is_forgotten_through_the_cancelled_deferred() -> None:
    feed, clock = feed_of(FakeSource())
    stream = FakeStream()
    ended = feed.listen(stream)
    cancelled: list[Failure] = []
    ended.addErrback(cancelled.append)
    ended.cancel()  # what Klein does when the client goes away, before or after the request
    assert feed.listeners == set()
    assert len(cancelled) == 1
    stream.lose()
    assert clock.getDelayedCalls() == []


def test_a_change_worth_seeing_now_is_sent_within_a_moment() -> None:
    source = FakeSource()
    feed, clock, stream = listening(source)
    source.sections["backends"] = [{"Healthy": False}]
    feed.soon()
    feed.soon()  # coalesced
    clock.advance(SOON_SECONDS)
    assert stream.take() == [("backends", [{"Healthy": False}])]


def test_silence_is_broken_by_a_comment_so_proxies_keep_the_stream() -> None:
    _, clock, stream = listening(FakeSource())
    clock.pump([SAMPLE_SECONDS] * int(KEEP_ALIVE_SECONDS / SAMPLE_SECONDS + 1))
    assert b": keep-alive\n\n" in stream.written
    assert stream.events() == []


def test_a_paused_listener_is_skipped_then_sent_the_whole_state_once_it_drains() -> None:
    source = FakeSource(sections={"daemon": {"A": 1}, "backends": []})
    feed, clock = feed_of(source)
    slow, fast = FakeStream(), FakeStream()
    feed.listen(slow)
    feed.listen(fast)
    slow.take(), fast.take()
    assert slow.producer is not None
    slow.producer.pauseProducing()
    for n in range(5):
        source.sections["daemon"] = {"A": n}
        source.finished(n)
        clock.advance(SAMPLE_SECONDS)
    assert slow.written == b""  # nothing buffered for it meanwhile
    assert len(fast.take()) == 10
    slow.producer.resumeProducing()
    clock.advance(SAMPLE_SECONDS)
    caught_up = dict(slow.take())
    assert caught_up["daemon"] == {"A": 4}
    assert caught_up["backends"] == []
    assert [line["Id"] for line in caught_up["requests"]] == ["0", "1", "2", "3", "4"]
    source.finished(5)
    clock.advance(SAMPLE_SECONDS)
    assert slow.take() == fast.take() == [("requests", [{"Id": "5"}])]


def test_listeners_are_bounded() -> None:
    feed, _ = feed_of(FakeSource(), max_listeners=2)
    feed.listen(FakeStream())
    feed.listen(FakeStream())
    with pytest.raises(TooManyListeners):
        feed.listen(FakeStream())


def test_closing_the_feed_ends_every_stream() -> None:
    feed, clock = feed_of(FakeSource())
    ended = [feed.listen(FakeStream()) for _ in range(3)]
    results: list[bytes] = []
    for d in ended:
        d.addCallback(results.append)
    feed.close()
    assert results == [b"", b"", b""]
    assert feed.listeners == set()
    assert clock.getDelayedCalls() == []


def test_a_sampling_bug_is_logged_and_the_feed_goes_on() -> None:
    source = FakeSource()
    _, clock, stream = listening(source)
    source.broken = True
    logged: list[dict[str, Any]] = []
    observer = keeping(logged)
    globalLogPublisher.addObserver(observer)
    try:
        clock.advance(SAMPLE_SECONDS)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [e["log_format"] for e in logged if "log_failure" in e] == [
        "sampling the live feed failed"
    ]
    source.broken = False
    source.sections["daemon"] = {"ActiveRequests": 3}
    clock.advance(SAMPLE_SECONDS)
    assert stream.take() == [("daemon", {"ActiveRequests": 3})]


# -- end to end --------------------------------------------------------------------------------


async def open_feed(url: str, token: str | None = TOKEN) -> tuple[Any, EventReader]:
    headers: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {token}"} if token else {}
    response = await treq.get(url + "/v1.0/events", headers=headers, unbuffered=True)
    reader = EventReader()
    response.deliverBody(reader)
    return response, reader


@pytest_twisted.async_yield_fixture
async def fleet(tmp_path: Any) -> Any:
    daemon = await start_daemon(tmp_path, {"HealthCheckIntervalMs": 100})
    under_test = DaemonUnderTest(daemon)
    await under_test.add("sim0")
    await under_test.add("sim1", models=("llama3",))
    await under_test.serve("sim0", "sim1")
    yield under_test
    await under_test.stop()


@pytest_twisted.ensureDeferred
async def test_the_feed_needs_an_admin_token(fleet: DaemonUnderTest) -> None:
    for token in (None, "wrong"):
        reply = await Http(fleet.url, token).get("/v1.0/events")
        assert reply.status == 401
        assert reply.json["StatusCode"] == 401


@pytest_twisted.ensureDeferred
async def test_a_dashboard_sees_the_fleet_then_a_backend_going_down(
    fleet: DaemonUnderTest,
) -> None:
    response, reader = await open_feed(fleet.url)
    assert response.code == 200
    await until(lambda: reader.latest("models") is not None, 10, "the first sections")
    assert reader.events[0][0] == "hello"
    backends = {b["Identifier"]: b for b in reader.latest("backends")}
    assert backends["sim0"]["Healthy"] and backends["sim1"]["Healthy"]
    assert "Uptime" not in backends["sim0"]
    models = reader.latest("models")
    assert {m["Name"] for m in models["sim1"]} == {"llama3:latest"}
    frontend = reader.latest("frontends")[0]
    assert frontend["Identifier"] == "frontend1"
    assert frontend["Queue"]["QueueDepth"] == 0

    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    answered = await treq.post(fleet.url + "/api/chat", json=chat)
    assert answered.code == 200
    await answered.content()
    line = (await until(lambda: reader.latest("requests"), 10, "the request line"))[-1]
    assert line["Path"] == "/api/chat" and line["Status"] == 200
    assert line["Backend"] in ("sim0", "sim1")

    await fleet.sims["sim1"].stop()

    def sim1_down() -> bool:
        latest = {b["Identifier"]: b for b in reader.latest("backends")}
        return not latest["sim1"]["Healthy"] and bool(latest["sim1"].get("LastError"))

    await until(sim1_down, 10, "sim1 shown unhealthy with why")
    recent = reader.latest("frontends")[0]["Recent"]
    assert recent["Requests"] == 1

    reply = await fleet.http.put("/v1.0/backends/sim1", {"Name": "renamed"})
    assert reply.status == 200
    await until(lambda: len(reader.named("config")) >= 2, 10, "a config event")


@pytest_twisted.ensureDeferred
async def test_a_head_request_holds_no_stream_open(fleet: DaemonUnderTest) -> None:
    reply = await fleet.http.request("HEAD", "/v1.0/events")
    assert reply.status == 200
    assert reply.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    assert not fleet.daemon.admin.feed.listeners


@pytest_twisted.ensureDeferred
async def test_a_dashboard_that_goes_away_is_forgotten(fleet: DaemonUnderTest) -> None:
    feed = fleet.daemon.admin.feed
    head = f"GET /v1.0/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    client = Collect(head.encode())
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", fleet.daemon.address.port)
    await connectProtocol(endpoint, client)
    await until(lambda: b"event: models" in client.data, 10, "the first sections")
    assert len(feed.listeners) == 1
    assert client.transport is not None
    client.transport.loseConnection()
    await client.done
    await until(lambda: not feed.listeners, 10, "the listener forgotten")


@pytest_twisted.ensureDeferred
async def test_stopping_the_daemon_ends_open_feeds(tmp_path: Any) -> None:
    daemon = await start_daemon(tmp_path)
    url = f"http://127.0.0.1:{daemon.address.port}"
    _, reader = await open_feed(url)
    await until(lambda: reader.latest("daemon") is not None, 10, "the feed")
    await daemon.stopService()
    await reader.done
    assert reader.latest("hello") is not None


@pytest_twisted.ensureDeferred
async def test_the_dashboards_files_are_served_with_a_strict_policy(
    fleet: DaemonUnderTest,
) -> None:
    http = Http(fleet.url, None)
    page = await http.get("/dashboard/")
    assert page.status == 200
    assert page.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    policy = page.headers.getRawHeaders("content-security-policy")[0]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert b"dashboard.js" in page.body
    script = await http.get("/dashboard/dashboard.js")
    assert script.status == 200
    assert script.headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    moved = await treq.get(fleet.url + "/dashboard", allow_redirects=False, persistent=False)
    assert moved.code == 308
    assert moved.headers.getRawHeaders("location") == ["/dashboard/"]
    await moved.content()
    for path in ("/dashboard/nothing.js", "/dashboard/../ollamaflow.json", "/dashboard/%2e%2e/x"):
        assert (await http.get(path)).status == 404, path
    assert (await http.request("HEAD", "/dashboard/")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_dashboard_sees_requests_in_flight_and_the_queue_as_they_change(
    tmp_path: Any,
) -> None:
    """One slot, three chats of 2 s: the feed (sampled each second) shows one in flight and two
    queued, then none."""
    daemon = await start_daemon(tmp_path, {"HealthCheckIntervalMs": 100})
    fleet = DaemonUnderTest(daemon)
    try:
        await fleet.add("slow", backend={"MaxParallelRequests": 1}, tokens=20, tokens_per_second=10)
        await fleet.serve("slow")
        _, reader = await open_feed(fleet.url)
        await until(lambda: reader.latest("daemon") is not None, 10, "the first sections")
        body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
        chats = [treq.post(fleet.url + "/api/chat", json=body, persistent=False) for _ in range(3)]

        def busy() -> bool:
            daemon_section = reader.latest("daemon")
            slow = {b["Identifier"]: b for b in reader.latest("backends")}["slow"]
            return slow["ActiveRequests"] == 1 and daemon_section["Queues"][0]["QueueDepth"] == 2

        await until(busy, 10, "one in flight and two queued on the feed")
        for chat in chats:
            await (await chat).content()

        def idle() -> bool:
            slow = {b["Identifier"]: b for b in reader.latest("backends")}["slow"]
            return (
                slow["ActiveRequests"] == 0
                and reader.latest("daemon")["Queues"][0]["QueueDepth"] == 0
            )

        await until(idle, 10, "nothing in flight or queued on the feed")
    finally:
        await fleet.stop()
