"""Requests to backends over the persistent connection pool.

``Agent.request`` parses the URL and builds an endpoint for every request; a gateway talks to
the same few backends all day, so the endpoint and pool key are made once per backend and
each request goes straight to ``HTTPConnectionPool.getConnection``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import HTTPConnectionPool, Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from ollamaflow.records import Backend

_Key = tuple[bytes, bytes, int]


class BackendClient:
    """Sends one request to a backend on a pooled connection; cancel the Deferred to abort."""

    def __init__(self, reactor: Any, pool: HTTPConnectionPool, connect_timeout: float) -> None:
        self.reactor = reactor
        self.pool = pool
        self.connect_timeout = connect_timeout
        self._endpoints: dict[tuple[str, int, bool], tuple[_Key, IStreamClientEndpoint]] = {}

    def request(
        self,
        backend: Backend,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        """``target`` is the request's path and query; ``headers`` must carry ``Host``."""
        where = (backend.hostname, backend.port, backend.ssl)
        found = self._endpoints.get(where)
        if found is None:
            found = self._endpoints[where] = self._endpoint(backend)
        key, endpoint = found
        request = Request(method, target, headers, body, persistent=True)
        connecting = self.pool.getConnection(key, endpoint)
        return connecting.addCallback(lambda protocol: protocol.request(request))

    def _endpoint(self, backend: Backend) -> tuple[_Key, IStreamClientEndpoint]:
        host = backend.hostname
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, host, backend.port, timeout=self.connect_timeout
        )
        if backend.ssl:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        scheme = b"https" if backend.ssl else b"http"
        return (scheme, host.encode("idna"), backend.port), endpoint

    def forget(self, keep: set[tuple[str, int, bool]]) -> None:
        """Drop endpoints of backends that are gone."""
        for where in [w for w in self._endpoints if w not in keep]:
            del self._endpoints[where]


def host_header(backend: Backend) -> bytes:
    """The ``Host`` a backend expects: its own host and port (Ollama refuses foreign ones)."""
    host = f"[{backend.hostname}]" if ":" in backend.hostname else backend.hostname
    return f"{host}:{backend.port}".encode("idna")
