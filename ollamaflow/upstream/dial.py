"""Opening fresh connections to backends, each dial bounded by a timeout.

An IP address over plain TCP is dialled with a connector straight to the protocol (an
endpoint's wrapping protocol would sit in the way of every read), on a transport that sends at
once (:mod:`ollamaflow.tcp`); a host name or TLS goes through an endpoint (resolution, happy
eyeballs, TLS). The dialler's own timer bounds the whole dial, resolution included, and fails
it with ``twisted.internet.error.TimeoutError``. Both ways of connecting are injected, so tests
hand out in-memory transports (``MemoryReactor.connectTCP`` fits ``connect_ip``).
"""

from __future__ import annotations

from collections.abc import Callable, Set
from typing import Any, Protocol, TypeVar

from twisted.internet import protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure

from ollamaflow import tcp
from ollamaflow.upstream.contracts import Where

P = TypeVar("P", bound=protocol.Protocol)
#: Builds the protocol of a fresh connection; given a callable, the protocol calls it (with
#: itself) from ``connectionMade``.
Build = Callable[[Callable[[P], None] | None], P]
#: Dials an IP address: ``reactor.connectTCP(host, port, factory)`` in effect.
ConnectIP = Callable[[str, int, protocol.ClientFactory], IConnector]
#: The endpoint that dials a backend by name, or over TLS.
EndpointFor = Callable[[Where], IStreamClientEndpoint]


class Dialling(Protocol):
    """A dial under way."""

    def cancel(self) -> None:
        """Stop it: neither of its callables is called afterwards."""


class Dialler(Protocol):
    """Opens connections to backends."""

    def dial(
        self,
        where: Where,
        build: Build[P],
        connected: Callable[[P], None],
        failed: Callable[[Failure], None],
    ) -> Dialling:
        """Open a connection to ``where`` with the protocol ``build`` makes: ``connected``
        gets it once connected, or ``failed`` gets why not."""
        ...

    def forget(self, keep: Set[Where]) -> None:
        """Let go of what is kept for the backends not in ``keep``."""


class TCPDialler:
    """The dialler the daemon uses: TCP, TLS where the backend says so, a timeout per dial."""

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        connect_ip: ConnectIP | None = None,
        endpoint_for: EndpointFor | None = None,
    ) -> None:
        self.clock: IReactorTime = reactor
        self.timeout = timeout
        self._connect_ip = connect_ip or self._tcp_connect
        self._endpoint_for = endpoint_for or self._hostname_endpoint
        self._reactor = reactor
        self._endpoints: dict[Where, IStreamClientEndpoint] = {}

    def dial(
        self,
        where: Where,
        build: Build[P],
        connected: Callable[[P], None],
        failed: Callable[[Failure], None],
    ) -> Dialling:
        host, port, ssl = where
        direct = not ssl and (isIPAddress(host) or isIPv6Address(host))
        attempt = _Dial(build, connected, failed, direct)
        attempt.timer = self.clock.callLater(self.timeout, attempt.time_out)
        if direct:
            connector = self._connect_ip(host, port, attempt)
            if attempt.live:
                attempt.connector = connector
            return attempt
        endpoint = self._endpoints.get(where)
        if endpoint is None:
            endpoint = self._endpoints[where] = self._endpoint_for(where)
        connecting: Deferred[Any] = endpoint.connect(attempt)
        if attempt.live:
            attempt.connecting = connecting
        connecting.addCallbacks(attempt.made, attempt.refused)
        return attempt

    def forget(self, keep: Set[Where]) -> None:
        for where in [w for w in self._endpoints if w not in keep]:
            del self._endpoints[where]

    def _tcp_connect(self, host: str, port: int, factory: protocol.ClientFactory) -> IConnector:
        # Twisted's own connect timeout is the same: whichever timer fires first, the dial
        # fails with TimeoutError.
        return tcp.connect(self._reactor, host, port, factory, timeout=self.timeout)

    def _hostname_endpoint(self, where: Where) -> IStreamClientEndpoint:
        host, port, ssl = where
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, port, timeout=self.timeout
        )
        if ssl:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint


class _Dial(protocol.ClientFactory):
    """One dial: the factory of its one connection, and the handle that cancels it."""

    noisy = False

    def __init__(
        self,
        build: Build[Any],
        connected: Callable[[Any], None],
        failed: Callable[[Failure], None],
        direct: bool,
    ) -> None:
        self._build: Build[Any] | None = build
        self._connected = connected
        self._failed = failed
        #: Straight to an address: the protocol says when it is connected (else the endpoint).
        self.direct = direct
        self.timer: IDelayedCall | None = None
        #: The connector while connecting straight to an address.
        self.connector: IConnector | None = None
        #: The endpoint's connection attempt while dialling through one.
        self.connecting: Deferred[Any] | None = None

    @property
    def live(self) -> bool:
        """Whether the dial is still under way."""
        return self._build is not None

    def buildProtocol(self, addr: object) -> Any:
        build = self._build
        assert build is not None, "one connection per dial"
        return build(self.made if self.direct else None)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.refused(reason)

    def made(self, connection: Any) -> None:
        if self._build is not None:
            connected = self._connected
            self._over()
            connected(connection)

    def refused(self, reason: Failure) -> None:
        if self._build is not None:
            failed = self._failed
            self._over()
            failed(reason)

    def time_out(self) -> None:
        self.timer = None
        if self._build is not None:
            failed = self._failed
            self.cancel()
            failed(Failure(TimeoutError()))

    def cancel(self) -> None:
        """Stop connecting; what the connector or endpoint then reports is ignored."""
        if self._build is None:
            return
        connector, connecting = self.connector, self.connecting
        self._over()
        if connector is not None:
            connector.stopConnecting()
        elif connecting is not None:
            connecting.cancel()

    def _over(self) -> None:
        """Let go of everything: the connector holds this factory as long as the connection
        lives, so no cycle is left with the connection or the request."""
        self._build = None
        self.connector = self.connecting = None
        self._connected = self._failed = _ignore
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()


def _ignore(outcome: object) -> None:
    """What an ended dial calls instead of its callables (never called)."""
