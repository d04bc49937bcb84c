"""Real listening ports for end-to-end tests: listening on loopback with any server factory,
the port number it got, and a stop that waits until the port is closed."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ServerFactory


def listen_local(factory: Factory[Any]) -> IListeningPort:
    """Listen on 127.0.0.1, on any free port, with a server factory of any protocol.

    ``ServerFactory.forProtocol`` is annotated as giving a plain ``Factory``, and listenTCP's
    ``ServerFactory[_ProtoWithFactory]`` is invariant in the protocol: the check is made here.
    """
    assert isinstance(factory, ServerFactory), factory
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


def port_number(port: IListeningPort) -> int:
    """The TCP port ``port`` listens on (``getHost`` is annotated as any ``IAddress``)."""
    address = port.getHost()
    assert isinstance(address, IPv4Address | IPv6Address), address
    return address.port


async def stop_listening(port: IListeningPort) -> None:
    """Stop ``port`` and wait until it has (``stopListening`` may answer at once, with None)."""
    stopped = port.stopListening()
    if stopped is not None:
        await stopped
