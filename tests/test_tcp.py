"""Transports that send at once: whole, in order, and errors still end the connection."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest_twisted
from harness import Collect, until
from listening import port_number, stop_listening
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from ollamaflow import tcp
from ollamaflow.twisted_internals import socket_to_send_now
from ollamaflow.workers import listen_shared


class Writer(Protocol):
    """Runs ``action`` with its transport once connected; records how the connection ended."""

    def __init__(self, action: Callable[[tcp.Server], None]) -> None:
        self.action = action
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.action(self.transport)  # type: ignore[arg-type]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


async def _serve(
    action: Callable[[tcp.Server], None], *, shared: bool = False
) -> tuple[Collect, list[Writer]]:
    writers: list[Writer] = []

    def build() -> Writer:
        writers.append(Writer(action))
        return writers[-1]

    factory = Factory.forProtocol(build)
    if shared:  # Workers > 1: a socket bound with SO_REUSEPORT, adopted by the reactor
        port = listen_shared(reactor, 0, factory, backlog=1024, interface="127.0.0.1")
    else:
        port = tcp.listen(reactor, 0, factory, backlog=5, interface="127.0.0.1")
    try:
        client = Collect()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port_number(port))
        await connectProtocol(endpoint, client)
        await client.done
    finally:
        await stop_listening(port)
    return client, writers


@pytest_twisted.ensureDeferred
async def test_writes_arrive_whole_and_in_order_past_what_the_kernel_takes_at_once() -> None:
    pieces = [b"a" * 10, b"b" * (8 << 20), b"c" * 100, b"d" * (1 << 20), b"end"]

    def action(transport: tcp.Server) -> None:
        assert isinstance(transport, tcp.Server)
        transport.write(pieces[0])
        assert socket_to_send_now(transport), "sent at once: nothing queued"
        transport.write(pieces[1])  # more than the socket takes: the rest is queued
        transport.writeSequence(pieces[2:4])
        transport.write(pieces[4])
        transport.loseConnection()

    client, _ = await _serve(action)
    assert bytes(client.data) == b"".join(pieces)


@pytest_twisted.ensureDeferred
async def test_a_write_to_a_reset_connection_ends_it_without_raising() -> None:
    writers: list[Writer] = []

    def build() -> Writer:
        writers.append(Writer(lambda transport: None))
        return writers[-1]

    port = tcp.listen(reactor, 0, Factory.forProtocol(build), backlog=5, interface="127.0.0.1")
    try:
        raw = socket.create_connection(("127.0.0.1", port.getHost().port))
        await until(lambda: writers, 5.0)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()  # RST
        transport = writers[0].transport
        assert transport is not None
        for _ in range(50):
            transport.write(b"x" * 65536)  # never raises; the reactor learns of the reset
        await until(lambda: writers[0].lost is not None, 5.0)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_adopted_listening_socket_serves_transports_that_send_at_once() -> None:
    """``tcp.adopt`` (public ``adoptStreamPort``, then the port's documented ``transport``)."""
    pieces = [b"first", b"x" * (4 << 20), b"last"]

    def action(transport: tcp.Server) -> None:
        assert type(transport) is tcp.Server
        transport.write(pieces[0])
        assert socket_to_send_now(transport), "sent at once: nothing queued"
        transport.writeSequence(pieces[1:])
        transport.loseConnection()

    client, writers = await _serve(action, shared=True)
    assert len(writers) == 1
    assert bytes(client.data) == b"".join(pieces)
