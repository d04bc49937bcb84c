"""TCP transports that send at once.

Twisted's TCP transport queues every write and sends it when the reactor next finds the socket
writable: for a proxied request that is two ``epoll_ctl`` calls and one more trip through the
reactor per response. Like asyncio's and libuv's transports, these try the send immediately
when nothing is queued before it, and queue only what the kernel does not take (then Twisted's
own machinery — flushing, producers, closing — carries on as usual).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp
from twisted.python.failure import Failure

from ollamaflow.twisted_internals import TransportConnector, is_disconnected, socket_to_send_now

_RETRY_LATER = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS})


class _SendAtOnce(tcp.Connection):
    """``write`` tries the socket first when nothing is queued before the data."""

    def write(self, data: bytes) -> None:
        sock = socket_to_send_now(self) if data else None
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError as e:
                if e.errno not in _RETRY_LATER:
                    # Queue it: the reactor's write meets the error and closes the connection.
                    super().write(data)
                    return
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))


class Server(_SendAtOnce, tcp.Server):
    """An accepted connection whose writes go out at once when nothing waits before them."""


class Client(_SendAtOnce, tcp.Client):
    """An outgoing connection whose writes go out at once when nothing waits before them."""


class Connector(TransportConnector):
    """``reactor.connectTCP``'s connector, making :class:`Client` transports."""

    def make_transport(self) -> Client:
        return Client(self.host, self.port, self.bindAddress, self, self.reactor)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if is_disconnected(self):
            self.transport = None  # the connection is over: no cycle left with it


def connect(reactor: Any, host: str, port: int, factory: Any, *, timeout: float) -> Connector:
    """``reactor.connectTCP`` to an IP address, with a transport that sends at once."""
    connector = Connector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector


class Port(tcp.Port):
    """A listening port whose connections are :class:`Server` transports (``tcp.Port``
    documents its ``transport`` attribute as the one to replace)."""

    transport = Server


def listen(reactor: Any, port: int, factory: Any, *, backlog: int, interface: str) -> Port:
    """``reactor.listenTCP``, with transports that send at once."""
    listening = Port(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def adopt(reactor: Any, listening: socket.socket, factory: Any) -> tcp.Port:
    """``reactor.adoptStreamPort`` for a bound, listening TCP socket (the reactor keeps its own
    duplicate of the descriptor), with transports that send at once."""
    port = reactor.adoptStreamPort(listening.fileno(), listening.family, factory)
    if not isinstance(port, tcp.Port):
        port.stopListening()
        raise TypeError(
            f"{type(reactor).__name__} adopts sockets as {type(port).__name__}, not "
            "twisted.internet.tcp.Port: its connections could not send at once"
        )
    # Nothing is accepted before the reactor next runs, so every connection gets a Server.
    port.transport = Server
    return port
