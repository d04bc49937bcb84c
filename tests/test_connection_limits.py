"""``Webserver.MaxConnections``: connections over the cap are answered 503 and closed cleanly
(never reset), counted in ``/metrics``; the open-files limit is raised only as far as the cap
needs."""

from __future__ import annotations

import json
import resource
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import start_daemon, until
from logcapture import keeping
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from ollamaflow import tap
from ollamaflow.daemon import Daemon
from ollamaflow.frontdoor import FrontDoor, Root
from ollamaflow.server.acceptor import REFUSAL_LOG_SECONDS, Acceptor
from ollamaflow.server.connection import HTTPConnection
from ollamaflow.server.refusal import LINGER_SECONDS, MAX_LINGERING, Refusal
from ollamaflow.settings import DEFAULT_MAX_CONNECTIONS

# -- over real sockets ----------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class RawClient(Protocol):
    """A client that writes ``send`` on connecting and keeps every byte it receives. Like an
    HTTP client uploading a body, it goes on sending after the server's FIN and closes only
    when all is sent: a server that closed instead of lingering makes those sends fail."""

    def __init__(self, send: bytes = b"") -> None:
        self.send = send
        self.received = b""
        self.reason: Failure | None = None
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]  # after what is queued

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.closed.callback(None)


async def connect(daemon: Daemon, send: bytes = b"") -> RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.address.port)
    client: RawClient = await connectProtocol(endpoint, RawClient(send))
    return client


def answered(client: RawClient) -> Callable[[], bool]:
    """Whether ``client`` got the root page's answer (for :func:`until`)."""
    return lambda: client.received.endswith(b"Ollama is running")


def connect_and_send_now(daemon: Daemon, data: bytes) -> RawClient:
    """Connect and send ``data`` before the reactor runs again, so that it is waiting unread in
    the daemon's socket when the daemon accepts the connection (closing a socket with unread
    data resets it: that is what a refusal must not do)."""
    with socket.create_connection(("127.0.0.1", daemon.address.port)) as plain:
        plain.setblocking(False)
        assert plain.send(data) == len(data)  # fits in the kernel's buffers
        client = RawClient()
        factory = Factory.forProtocol(lambda: client)
        reactor.adoptStreamConnection(plain.fileno(), socket.AF_INET, factory)  # type: ignore[attr-defined]
    return client


def parse(answer: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, header fields (lower-case names), body of one response."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    return status, fields, body


async def whole_answer(client: RawClient) -> bytes:
    """What the client received up to the server's close; fails if the close was a reset."""
    await client.closed
    reason = client.reason
    assert reason is not None and reason.check(error.ConnectionDone), f"not clean: {reason}"
    return client.received


def assert_refused(answer: bytes) -> None:
    status, fields, body = parse(answer)
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert fields[b"content-type"] == b"application/json"
    assert fields[b"retry-after"] == b"1"
    assert fields[b"connection"] == b"close"
    assert int(fields[b"content-length"]) == len(body)
    assert b"date" in fields
    document = json.loads(body)
    assert list(document) == ["error"] and "too many connections" in document["error"]


KEEP_ALIVE = b"GET / HTTP/1.1\r\nHost: flow\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_a_connection_over_the_cap_is_answered_503_and_closed_cleanly(
    tmp_path: Path,
) -> None:
    daemon = await start_daemon(tmp_path, {"Webserver": {"MaxConnections": 3}})
    held: list[RawClient] = []
    try:
        assert daemon.acceptor.max_connections == 3
        for _ in range(3):
            client = await connect(daemon, KEEP_ALIVE)
            held.append(client)
            await until(answered(client))
        assert len(daemon.acceptor.connections) == 3

        # Says nothing: answered at once all the same, then a FIN, not a reset.
        silent = await connect(daemon)
        assert_refused(await whole_answer(silent))
        # Its request is in the daemon's socket before it is accepted: never read, still no reset.
        body = b'{"model": "llama3", "prompt": "' + b"x" * 30_000 + b'"}'
        head = b"POST /api/generate HTTP/1.1\r\nHost: flow\r\nContent-Length: %d\r\n\r\n"
        talkative = connect_and_send_now(daemon, head % len(body) + body)
        assert_refused(await whole_answer(talkative))
        # A body larger than the socket buffers, still being sent after the answer: no reset.
        body = b"x" * 16_000_000
        head = b"POST /api/chat HTTP/1.1\r\nHost: flow\r\nContent-Length: %d\r\n\r\n"
        streaming = await connect(daemon, head % len(body) + body)
        assert_refused(await whole_answer(streaming))
        assert len(daemon.acceptor.connections) == 3
        assert daemon.acceptor.refused == 3
        await until(lambda: not daemon.acceptor.lingering, 1.0)  # they closed: no waiting

        # The three are still served (keep-alive) while the others were refused.
        before = held[0].received
        held[0].transport.write(KEEP_ALIVE)  # type: ignore[union-attr]
        await until(lambda: held[0].received.count(b"Ollama is running") == 2)
        assert held[0].received.startswith(before)

        # One of the three leaves: a new connection is served again.
        held.pop().transport.loseConnection()  # type: ignore[union-attr]
        await until(lambda: len(daemon.acceptor.connections) == 2)
        scrape_request = b"GET /metrics HTTP/1.1\r\nHost: flow\r\nConnection: close\r\n\r\n"
        scrape = await connect(daemon, scrape_request)
        status, _fields, text = parse(await whole_answer(scrape))
        assert status == b"HTTP/1.1 200 OK"
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text.decode())
            for sample in family.samples
        }
        assert values["ollamaflow_connections_refused_total"] == 3
        assert values["ollamaflow_client_connections"] == 3  # two held and the scrape itself
        assert values["ollamaflow_client_connections_limit"] == 3
    finally:
        for client in held:
            client.transport.loseConnection()  # type: ignore[union-attr]
        await daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_the_default_cap_is_set_and_counted_from_zero(daemon: Daemon) -> None:
    assert daemon.acceptor.max_connections == DEFAULT_MAX_CONNECTIONS
    assert daemon.acceptor.refused == 0


# -- the refusal, on a fake clock -----------------------------------------------------------------


class HalfClosingTransport(StringTransport):
    """A StringTransport that also half-closes, like a TCP transport."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Unused:
    """A gateway or resource these tests never reach."""

    def render(self, request: object) -> bytes:
        raise AssertionError("no request is served")


def acceptor_of(max_connections: int, clock: Clock) -> Acceptor:
    front_door = FrontDoor(Unused(), Root(Unused()), lambda host: 1 << 20)
    return Acceptor(front_door, clock, max_connections=max_connections)


def accept(acceptor: Acceptor) -> tuple[Any, HalfClosingTransport]:
    """A connection made as a listening port makes it: built, then connected."""
    protocol = acceptor.buildProtocol(None)
    assert protocol is not None
    transport = HalfClosingTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_in_memory_the_connection_over_the_cap_is_refused_in_ollamas_error_shape() -> None:
    clock = Clock()
    clock.advance(1_900_000_000)
    acceptor = acceptor_of(2, clock)
    served = [accept(acceptor)[0] for _ in range(2)]
    assert all(isinstance(p, HTTPConnection) for p in served)
    refused, transport = accept(acceptor)
    assert isinstance(refused, Refusal)
    answer = transport.value()
    assert_refused(answer)
    assert b"Date: Sun, 17 Mar 2030 17:46:40 GMT\r\n" in answer
    assert acceptor.refused == 1 and acceptor.lingering == {refused}
    served[0].connectionLost(Failure(error.ConnectionDone()))
    assert isinstance(accept(acceptor)[0], HTTPConnection), "a place is free again"


def test_refusals_are_each_counted_and_logged_once_a_minute_at_most() -> None:
    clock = Clock()
    acceptor = acceptor_of(1, clock)
    accept(acceptor)
    logged: list[dict[str, Any]] = []
    observer = keeping(logged)
    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(3):
            accept(acceptor)
        clock.advance(REFUSAL_LOG_SECONDS)
        accept(acceptor)
    finally:
        globalLogPublisher.removeObserver(observer)
    warnings = [e for e in logged if "MaxConnections" in e.get("log_format", "")]
    assert [e["refused"] for e in warnings] == [1, 4]
    assert acceptor.refused == 4


def test_a_refusal_half_closes_reads_and_discards_then_closes_after_lingering() -> None:
    clock = Clock()
    lingering: set[Refusal] = set()
    refusal = Refusal(clock, b"answer", lingering)
    transport = HalfClosingTransport()
    refusal.makeConnection(transport)
    assert transport.value() == b"answer"
    assert transport.write_closed and not transport.disconnecting
    refusal.dataReceived(b"POST / HTTP/1.1\r\n" * 1000)  # read and dropped
    clock.advance(LINGER_SECONDS - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting  # a client that never closes: closed for it


def test_past_the_lingering_bound_a_refusal_answers_and_closes_at_once() -> None:
    """Clients that never close cannot make refusals hold more than MAX_LINGERING sockets."""
    clock = Clock()
    lingering: set[Refusal] = {Refusal(clock, b"", set()) for _ in range(MAX_LINGERING)}
    transport = HalfClosingTransport()
    Refusal(clock, b"answer", lingering).makeConnection(transport)
    assert transport.value() == b"answer"
    assert transport.disconnecting and not transport.write_closed
    assert len(lingering) == MAX_LINGERING and clock.getDelayedCalls() == []


def test_a_refusal_whose_client_closes_leaves_no_timer() -> None:
    clock = Clock()
    lingering: set[Refusal] = set()
    refusal = Refusal(clock, b"answer", lingering)
    refusal.makeConnection(HalfClosingTransport())
    assert lingering == {refusal}
    refusal.connectionLost(Failure(error.ConnectionDone()))
    assert clock.getDelayedCalls() == [] and lingering == set()


# -- the open-files limit -------------------------------------------------------------------------

UNLIMITED = resource.RLIM_INFINITY


class FakeLimits:
    """RLIMIT_NOFILE as (soft, hard); a raise of the soft limit above ``refuse_above`` fails."""

    def __init__(self, soft: int, hard: int, refuse_above: int | None = None) -> None:
        self.limits = (soft, hard)
        self.refuse_above = refuse_above
        self.calls: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        return self.limits

    def set(self, soft: int, hard: int) -> None:
        self.calls.append((soft, hard))
        if self.refuse_above is not None and soft > self.refuse_above:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = (soft, hard)


def adjust(fake: FakeLimits, max_connections: int) -> tap.OpenFiles:
    return tap.adjust_open_files(max_connections, fake.get, fake.set, UNLIMITED)


def test_two_sockets_per_connection_and_a_margin() -> None:
    assert tap.files_needed(4096) == 2 * 4096 + tap.FILES_MARGIN
    assert tap.connections_carried(tap.files_needed(4096)) == 4096
    assert tap.connections_carried(tap.files_needed(4096) + 1) == 4096
    assert tap.connections_carried(tap.files_needed(4096) - 1) == 4095
    assert tap.connections_carried(100) == 0
    # The margin holds the refusals lingering, and 384 more for the rest.
    assert tap.FILES_MARGIN - MAX_LINGERING >= 384


def test_the_soft_limit_is_raised_to_what_max_connections_needs_and_no_further() -> None:
    fake = FakeLimits(1024, 524288)
    result = adjust(fake, 4096)
    assert fake.limits == (tap.files_needed(4096), 524288)
    assert (result.before, result.after, result.enough) == (1024, tap.files_needed(4096), True)
    fake = FakeLimits(256, UNLIMITED)
    assert adjust(fake, 10).after == tap.files_needed(10) == 532
    assert fake.limits == (532, UNLIMITED)


def test_a_higher_or_unlimited_soft_limit_is_never_lowered() -> None:
    for soft, hard in ((20000, 20000), (9000, UNLIMITED), (UNLIMITED, UNLIMITED)):
        fake = FakeLimits(soft, hard)
        result = adjust(fake, 4096)
        assert fake.calls == []
        assert (result.before, result.after, result.enough) == (soft, soft, True)


def test_a_hard_limit_too_low_raises_to_it_and_names_what_it_carries() -> None:
    fake = FakeLimits(1024, 4096)
    result = adjust(fake, 4096)
    assert fake.limits == (4096, 4096)
    assert not result.enough
    assert result.carried == tap.connections_carried(4096) == 1792
    warning, text = tap.describe_open_files(result)
    assert warning
    assert "4096" in text and "1792" in text and "Webserver.MaxConnections" in text
    # Already at a hard limit that is too low: nothing to set, the same warning.
    fake = FakeLimits(4096, 4096)
    assert not adjust(fake, 4096).enough
    assert fake.calls == []


def test_a_refused_raise_falls_back_and_never_fails() -> None:
    # macOS refuses more than its own ceiling below an unlimited hard limit.
    fake = FakeLimits(256, UNLIMITED, refuse_above=10240)
    result = adjust(fake, 100_000)
    assert fake.calls == [(tap.files_needed(100_000), UNLIMITED), (10240, UNLIMITED)]
    assert (result.after, result.enough) == (10240, False)
    assert result.refused == tap.files_needed(100_000)
    fake = FakeLimits(256, 65536, refuse_above=256)
    result = adjust(fake, 4096)
    assert (result.after, result.refused, result.enough) == (256, tap.files_needed(4096), False)
    assert fake.limits == (256, 65536)
    warning, text = tap.describe_open_files(result)
    assert warning and "refused" in text


def test_every_outcome_is_one_log_line() -> None:
    cases = {
        (FakeLimits(20000, 20000), 4096): (False, "open files limit 20000 (hard limit 20000)"),
        (FakeLimits(1024, 20000), 4096): (False, "open files limit raised from 1024 to 8704"),
        (FakeLimits(1024, 2048), 4096): (True, "2048 is too low: it carries MaxConnections 768 "),
        (FakeLimits(1024, 20000, 1024), 4096): (True, "raising it to 8704 was refused"),
    }
    for (fake, max_connections), (warning, start) in cases.items():
        result = adjust(fake, max_connections)
        assert tap.describe_open_files(result)[0] is warning
        text = tap.describe_open_files(result)[1]
        assert start in text and "\n" not in text
        assert f"MaxConnections {max_connections}" in text


def test_the_real_limit_is_read_through_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLimits(1024, 524288)
    monkeypatch.setattr(resource, "getrlimit", lambda _which: fake.get())
    monkeypatch.setattr(resource, "setrlimit", lambda _which, limits: fake.set(*limits))
    result = tap.raise_open_files_limit(1000)
    assert result is not None and result.after == tap.files_needed(1000) == fake.limits[0]

    def broken(_which: Any) -> tuple[int, int]:
        raise OSError("no")

    monkeypatch.setattr(resource, "getrlimit", broken)
    assert tap.raise_open_files_limit(1000) is None
