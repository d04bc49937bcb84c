"""The backend client in memory: dials on a ``MemoryReactorClock``, connections on
``StringTransport``s, time on its clock. The pool, the dial and its timeout, responses fed in
any split, cancelling at every stage, the one retry, backpressure."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from ollamaflow.records import Backend
from ollamaflow.upstream import BackendClient, UpstreamClient
from ollamaflow.upstream.connection import Connection
from ollamaflow.upstream.contracts import BackendResponse
from ollamaflow.upstream.dial import TCPDialler
from ollamaflow.upstream.request import Message

BACKEND = Backend(identifier="b", hostname="10.0.0.1", port=11434)
BY_NAME = Backend(identifier="n", hostname="ollama.internal", port=11434)
WHERE = ("10.0.0.1", 11434, False)
FIELDS = [(b"Host", b"10.0.0.1:11434")]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Read(Protocol):
    """A body's reader: what came, and how it ended."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason


@attrs.define
class Sent:
    """One request's outcome as its callables heard it."""

    attempt: Any = None
    responses: list[BackendResponse] = attrs.Factory(list)
    failures: list[Failure] = attrs.Factory(list)
    read: Read = attrs.Factory(Read)

    def responded(self, response: BackendResponse) -> None:
        self.responses.append(response)
        response.deliverBody(self.read)

    @property
    def outcomes(self) -> int:
        return len(self.responses) + len(self.failures)


@attrs.define
class Rig:
    """A client whose dials land on a memory reactor; each connection gets a StringTransport."""

    reactor: MemoryReactorClock
    client: BackendClient
    endpoint_dials: list[Deferred[Any]] = attrs.Factory(list)

    @classmethod
    def make(cls, **options: Any) -> Rig:
        reactor = MemoryReactorClock()
        rig = cls(reactor, BackendClient(reactor, 5.0))
        dialler = TCPDialler(
            reactor,
            5.0,
            connect_ip=lambda host, port, factory: reactor.connectTCP(host, port, factory),
            endpoint_for=lambda where: _Endpoint(rig.endpoint_dials),
        )
        rig.client = BackendClient(reactor, 5.0, dialler=dialler, **options)
        return rig

    def send(self, body: Any = None, backend: Backend = BACKEND, method: bytes = b"GET") -> Sent:
        sent = Sent()
        sent.attempt = self.client.send(
            backend, method, b"/api/tags", FIELDS, body, sent.responded, sent.failures.append
        )
        return sent

    def connect(self, index: int = -1) -> tuple[Connection, StringTransport]:
        """Complete a dial the reactor was asked for: the connection is made."""
        factory = self.reactor.tcpClients[index][2]
        connection = factory.buildProtocol(None)
        assert isinstance(connection, Connection)
        transport = StringTransport()
        connection.makeConnection(transport)
        return connection, transport


@implementer(IStreamClientEndpoint)
class _Endpoint:
    """An endpoint whose connection attempts wait for the test."""

    def __init__(self, dials: list[Deferred[Any]]) -> None:
        self.dials = dials

    def connect(self, factory: Any) -> Deferred[Any]:
        dial: Deferred[Any] = Deferred(lambda d: d.errback(CancelledError("endpoint")))
        self.dials.append(dial)
        return dial


def test_the_client_is_an_upstream_client() -> None:
    """What the gateway is given: the contract, with the client behind it."""
    client: UpstreamClient = Rig.make().client
    assert client.send is not None


# -- the pool ---------------------------------------------------------------------------------


def test_a_finished_connection_serves_the_next_request() -> None:
    rig = Rig.make()
    first = rig.send()
    connection, transport = rig.connect()
    connection.dataReceived(OK)
    assert rig.client.pool.idle(WHERE) == [connection]
    transport.clear()
    second = rig.send()
    assert len(rig.reactor.tcpClients) == 1, "no second dial"
    assert transport.value().startswith(b"GET /api/tags HTTP/1.1\r\n")
    connection.dataReceived(OK)
    assert first.read.chunks == second.read.chunks == [b"hello"]
    assert rig.client.pool.idle(WHERE) == [connection]


def test_a_connection_the_backend_closes_while_idle_leaves_the_pool() -> None:
    rig = Rig.make()
    rig.send()
    connection, _ = rig.connect()
    connection.dataReceived(OK)
    connection.connectionLost(Failure(ConnectionDone()))
    assert rig.client.pool.idle(WHERE) == []
    rig.send()
    assert len(rig.reactor.tcpClients) == 2, "a fresh dial for the next request"


def test_bytes_on_an_idle_connection_close_it_and_it_leaves_the_pool() -> None:
    rig = Rig.make()
    rig.send()
    connection, transport = rig.connect()
    connection.dataReceived(OK)
    connection.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert transport.disconnected and rig.client.pool.idle(WHERE) == []


def test_connections_past_the_cap_are_closed_when_done() -> None:
    rig = Rig.make(max_idle_per_backend=1)
    rig.send(), rig.send()
    (one, one_transport), (two, two_transport) = rig.connect(0), rig.connect(1)
    one.dataReceived(OK)
    two.dataReceived(OK)
    assert rig.client.pool.idle(WHERE) == [one]
    assert not one_transport.disconnecting and two_transport.disconnecting


def test_a_connection_of_a_forgotten_backend_is_not_kept() -> None:
    rig = Rig.make()
    sent = rig.send()
    connection, transport = rig.connect()
    rig.client.forget(set())
    connection.dataReceived(OK)
    assert sent.read.chunks == [b"hello"]
    assert transport.disconnecting and len(rig.client.pool) == 0


def test_close_closes_the_idle_connections_and_waits_for_them() -> None:
    rig = Rig.make()
    rig.send()
    connection, transport = rig.connect()
    connection.dataReceived(OK)
    closed = Deferred.fromCoroutine(rig.client.close())
    assert transport.disconnecting and not closed.called
    connection.connectionLost(Failure(ConnectionDone()))
    assert closed.called and len(rig.client.pool) == 0


# -- dialling ---------------------------------------------------------------------------------


def test_a_dial_that_takes_too_long_fails_with_a_timeout() -> None:
    rig = Rig.make()
    sent = rig.send()
    rig.reactor.advance(4.9)
    assert sent.outcomes == 0
    rig.reactor.advance(0.1)
    assert [f.type for f in sent.failures] == [TimeoutError]
    assert rig.reactor.connectors[0].stoppedConnecting
    assert rig.reactor.getDelayedCalls() == []


def test_a_dial_by_name_that_takes_too_long_fails_with_a_timeout() -> None:
    rig = Rig.make()
    sent = rig.send(backend=BY_NAME)
    rig.reactor.advance(5)
    assert [f.type for f in sent.failures] == [TimeoutError]
    assert rig.endpoint_dials[0].called, "the endpoint's attempt is cancelled"


def test_a_connected_dial_has_no_timer_left() -> None:
    rig = Rig.make()
    rig.send()
    _, transport = rig.connect()
    assert transport.value().startswith(b"GET /api/tags HTTP/1.1\r\n")
    assert rig.reactor.getDelayedCalls() == []


def test_a_refused_dial_fails_the_request_once() -> None:
    rig = Rig.make()
    sent = rig.send()
    factory = rig.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(rig.reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert [f.type for f in sent.failures] == [ConnectionRefusedError]
    rig.reactor.advance(10)
    assert sent.outcomes == 1 and rig.reactor.getDelayedCalls() == []


def test_a_dial_by_name_goes_through_the_endpoint() -> None:
    rig = Rig.make()
    sent = rig.send(backend=BY_NAME)
    assert rig.reactor.tcpClients == []
    connection = Connection(rig.client.pool, ("ollama.internal", 11434, False))
    transport = StringTransport()
    connection.makeConnection(transport)
    rig.endpoint_dials[0].callback(connection)
    assert transport.value().startswith(b"GET /api/tags HTTP/1.1\r\n")
    connection.dataReceived(OK)
    assert sent.read.chunks == [b"hello"]


# -- responses in any split -------------------------------------------------------------------

ANSWERS = {
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", b"hello world"),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"hello world",
    ),
    "interim first": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"ok",
    ),
    "no body": (b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n", b""),
}


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(
    answer=st.sampled_from(list(ANSWERS)),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_a_response_fed_in_any_split_reads_the_same(answer: str, cuts: list[int]) -> None:
    wire, body = ANSWERS[answer]
    rig = Rig.make()
    sent = rig.send()
    connection, _ = rig.connect()
    for piece in _cut(wire, cuts):
        connection.dataReceived(piece)
    assert len(sent.responses) == 1 and not sent.failures
    assert b"".join(sent.read.chunks) == body
    assert sent.read.reason is not None and sent.read.reason.check(ResponseDone)
    assert rig.client.pool.idle(WHERE) == [connection], "complete: pooled"


# -- cancelling -------------------------------------------------------------------------------


def test_cancelling_a_dial_stops_it_and_fails_once() -> None:
    rig = Rig.make()
    sent = rig.send()
    sent.attempt.cancel()
    assert [f.type for f in sent.failures] == [CancelledError]
    assert rig.reactor.connectors[0].stoppedConnecting
    assert rig.reactor.getDelayedCalls() == [], "no dial timer left"
    factory = rig.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(rig.reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert sent.outcomes == 1


def test_cancelling_a_dial_by_name_cancels_the_endpoints_attempt() -> None:
    rig = Rig.make()
    sent = rig.send(backend=BY_NAME)
    sent.attempt.cancel()
    assert rig.endpoint_dials[0].called
    assert [f.type for f in sent.failures] == [CancelledError]


def test_cancelling_while_waiting_for_the_head_drops_the_connection() -> None:
    rig = Rig.make()
    sent = rig.send()
    connection, transport = rig.connect()
    sent.attempt.cancel()
    assert transport.disconnected, "aborted: the backend stops working on it"
    assert [f.type for f in sent.failures] == [CancelledError]
    connection.dataReceived(OK)
    connection.connectionLost(Failure(ConnectionAborted()))
    assert sent.outcomes == 1 and len(rig.client.pool) == 0


def test_cancelling_on_a_pooled_connection_does_not_dial() -> None:
    rig = Rig.make()
    rig.send()
    connection, _ = rig.connect()
    connection.dataReceived(OK)
    sent = rig.send()
    sent.attempt.cancel()
    connection.connectionLost(Failure(ConnectionAborted()))
    assert [f.type for f in sent.failures] == [CancelledError]
    assert len(rig.reactor.tcpClients) == 1, "a cancelled request is not sent again"


@implementer(IBodyProducer)
class Trickle:
    """A streaming body written by the test."""

    def __init__(self, length: int | object = UNKNOWN_LENGTH) -> None:
        self.length = length
        self.consumer: IConsumer | None = None
        self.finished: Deferred[None] = Deferred()
        self.stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self.consumer = consumer
        return self.finished

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


def test_cancelling_while_a_body_streams_stops_its_producer() -> None:
    rig = Rig.make()
    producer = Trickle()
    sent = rig.send(producer, method=b"POST")
    _, transport = rig.connect()
    assert producer.consumer is not None
    producer.consumer.write(b"abc")
    assert transport.value().endswith(
        b"Transfer-Encoding: chunked\r\nHost: 10.0.0.1:11434\r\n\r\n3\r\nabc\r\n"
    )
    sent.attempt.cancel()
    assert producer.stopped and transport.disconnected
    producer.consumer.write(b"late")
    assert not transport.value().endswith(b"late\r\n")


def test_cancelling_after_the_head_does_nothing() -> None:
    rig = Rig.make()
    sent = rig.send()
    connection, transport = rig.connect()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    sent.attempt.cancel()
    assert sent.failures == [] and not transport.disconnecting
    connection.dataReceived(b"world")
    assert b"".join(sent.read.chunks) == b"helloworld"


# -- the one retry ----------------------------------------------------------------------------


def _idle_connection(rig: Rig) -> Connection:
    rig.send()
    connection, _ = rig.connect()
    connection.dataReceived(OK)
    return connection


def test_a_reused_connection_closed_before_any_answer_sends_again_on_a_fresh_one() -> None:
    rig = Rig.make()
    stale = _idle_connection(rig)
    sent = rig.send()
    stale.connectionLost(Failure(ConnectionDone()))
    assert sent.outcomes == 0 and len(rig.reactor.tcpClients) == 2
    fresh, transport = rig.connect()
    assert transport.value().startswith(b"GET /api/tags HTTP/1.1\r\n")
    fresh.dataReceived(OK)
    assert sent.read.chunks == [b"hello"]


def test_the_retry_happens_once() -> None:
    rig = Rig.make()
    stale = _idle_connection(rig)
    sent = rig.send()
    stale.connectionLost(Failure(ConnectionDone()))
    fresh, _ = rig.connect()
    fresh.connectionLost(Failure(ConnectionLost()))
    assert [f.type for f in sent.failures] == [ResponseNeverReceived]
    assert len(rig.reactor.tcpClients) == 2


def test_no_retry_after_part_of_an_answer() -> None:
    rig = Rig.make()
    stale = _idle_connection(rig)
    sent = rig.send()
    stale.dataReceived(b"HTTP/1.1 200")
    stale.connectionLost(Failure(ConnectionDone()))
    assert [f.type for f in sent.failures] == [ResponseFailed]
    assert len(rig.reactor.tcpClients) == 1


def test_no_retry_of_a_streamed_body() -> None:
    rig = Rig.make()
    stale = _idle_connection(rig)
    producer = Trickle()
    sent = rig.send(producer, method=b"POST")
    stale.connectionLost(Failure(ConnectionDone()))
    assert [f.type for f in sent.failures] == [RequestTransmissionFailed]
    assert producer.stopped and len(rig.reactor.tcpClients) == 1


# -- backpressure and stopping ----------------------------------------------------------------


def test_a_paused_reader_pauses_the_backend_socket() -> None:
    rig = Rig.make()
    sent = rig.send()
    connection, transport = rig.connect()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    reader_transport: Any = sent.read.transport
    assert reader_transport is not None and transport.producerState == "producing"
    reader_transport.pauseProducing()
    assert transport.producerState == "paused"
    connection.dataReceived(b"2\r\ncd\r\n")
    assert sent.read.chunks == [b"ab"], "held while paused"
    reader_transport.resumeProducing()
    assert sent.read.chunks == [b"ab", b"cd"] and transport.producerState == "producing"


def test_a_stopped_body_aborts_the_connection_and_ends_failed() -> None:
    rig = Rig.make()
    sent = rig.send()
    connection, transport = rig.connect()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    reader_transport: Any = sent.read.transport
    reader_transport.stopProducing()
    assert transport.disconnected and sent.read.reason is None
    connection.connectionLost(Failure(ConnectionDone()))
    assert sent.read.reason is not None
    failed = sent.read.reason.value
    assert isinstance(failed, ResponseFailed)
    assert failed.reasons[0].check(ConnectionAborted)
    assert len(rig.client.pool) == 0


# -- the request on the wire ------------------------------------------------------------------


def test_a_message_frames_the_body_itself() -> None:
    fields = [(b"Host", b"h"), (b"Content-Length", b"99"), (b"Transfer-Encoding", b"gzip")]
    assert Message(b"POST", b"/x", fields, b"abc").head == (
        b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nHost: h\r\n\r\n"
    )
    assert (
        Message(b"POST", b"/x", [], None).head == b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    )
    assert Message(b"GET", b"/x", [], None).head == b"GET /x HTTP/1.1\r\n\r\n"
    assert b"Transfer-Encoding: chunked\r\n" in Message(b"PUT", b"/", [], Trickle()).head
    assert b"Content-Length: 7\r\n" in Message(b"PUT", b"/", [], Trickle(7)).head


def test_a_message_notes_what_the_caller_asked_of_the_connection() -> None:
    assert Message(b"GET", b"/", [(b"Connection", b"close")], None).keep is False
    assert Message(b"GET", b"/", [(b"Connection", b"keep-alive")], None).keep is True
    assert Message(b"HEAD", b"/", [], None).is_head
    assert Message(b"GET", b"/", [], b"x").replayable
    assert not Message(b"PUT", b"/", [], Trickle()).replayable


@pytest.mark.parametrize(
    ("method", "target"), [(b"G T", b"/"), (b"", b"/"), (b"GET", b"/a b"), (b"GET", b"/\r\n")]
)
def test_a_message_refuses_what_would_break_the_request_line(method: bytes, target: bytes) -> None:
    with pytest.raises(ValueError):
        Message(method, target, [], None)


def test_a_producer_writing_past_its_length_fails_the_request() -> None:
    rig = Rig.make()
    producer = Trickle(2)
    sent = rig.send(producer, method=b"PUT")
    _, transport = rig.connect()
    assert producer.consumer is not None
    producer.consumer.write(b"abc")
    (failure,) = sent.failures
    assert isinstance(failure.value, RequestGenerationFailed)
    assert "more than its length" in str(failure.value.reasons[0].value)
    assert producer.stopped and transport.disconnected


def test_a_finished_producer_leaves_the_connection_reusable() -> None:
    rig = Rig.make()
    producer = Trickle()
    sent = rig.send(producer, method=b"PUT")
    connection, transport = rig.connect()
    assert producer.consumer is not None
    producer.consumer.write(b"ab")
    producer.finished.callback(None)
    assert transport.value().endswith(b"2\r\nab\r\n0\r\n\r\n")
    connection.dataReceived(OK)
    assert sent.read.chunks == [b"hello"] and rig.client.pool.idle(WHERE) == [connection]


def test_an_empty_in_memory_body_is_one_write() -> None:
    rig = Rig.make()
    rig.send(b"", method=b"POST")
    _, transport = rig.connect()
    assert transport.value() == (
        b"POST /api/tags HTTP/1.1\r\nContent-Length: 0\r\nHost: 10.0.0.1:11434\r\n\r\n"
    )


def test_succeed_is_a_finished_body() -> None:
    """A producer whose ``startProducing`` is already done is written and finished at once."""

    @implementer(IBodyProducer)
    class Done:
        length = 0

        def startProducing(self, consumer: IConsumer) -> Deferred[None]:
            return succeed(None)

        def pauseProducing(self) -> None: ...

        def resumeProducing(self) -> None: ...

        def stopProducing(self) -> None: ...

    rig = Rig.make()
    sent = rig.send(Done(), method=b"PUT")
    connection, _ = rig.connect()
    connection.dataReceived(OK)
    assert sent.read.chunks == [b"hello"] and rig.client.pool.idle(WHERE) == [connection]
