"""HTTP connection pools and the agent for the background traffic to backends (health checks,
inventories, pulls)."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from ollamaflow.twisted_internals import quiet_connection_pool


def connection_pool(
    reactor: Any, *, max_per_host: int = 64, idle_seconds: int = 120
) -> HTTPConnectionPool:
    """A persistent pool keeping up to ``max_per_host`` idle connections to each backend,
    without a "Starting factory" log line for every new backend connection."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_seconds
    return quiet_connection_pool(pool)


@implementer(IAgentEndpointFactory)
class DirectEndpoints:
    """Endpoints that dial an IP address directly: a backend configured by address (the usual
    case) needs no name lookup, so its health checks never wait behind the resolver's threads
    (a busy thread pool made a check of 127.0.0.1 time out as a failed lookup). Host names
    are resolved as Twisted's agent resolves them; ``https`` is wrapped in TLS as it wraps it."""

    def __init__(
        self, reactor: Any, connect_timeout: float, tls: IPolicyForHTTPS | None = None
    ) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.tls = tls if tls is not None else BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            endpoint = HostnameEndpoint(
                self.reactor, uri.host, uri.port, timeout=self.connect_timeout
            )
        else:
            direct = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = direct(self.reactor, str(address), uri.port, timeout=self.connect_timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def services_agent(reactor: Any, pool: HTTPConnectionPool, connect_timeout: float) -> Agent:
    """The agent of the background services, over ``pool``."""
    return Agent.usingEndpointFactory(reactor, DirectEndpoints(reactor, connect_timeout), pool=pool)
