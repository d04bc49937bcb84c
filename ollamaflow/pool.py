"""HTTP connection pools for talking to backends."""

from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool

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
