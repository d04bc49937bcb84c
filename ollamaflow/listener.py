"""The daemon's former way to build the server, kept until it builds its own.

The request path is now :mod:`ollamaflow.frontdoor` (where each request goes) served by
:mod:`ollamaflow.server` (connections: :class:`~ollamaflow.server.acceptor.Acceptor`). A
:class:`Listener` is an Acceptor serving a :class:`~ollamaflow.frontdoor.FrontDoor` built from
the arguments the daemon passes today; delete this module once it passes them to those two.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from ollamaflow import cors
from ollamaflow.frontdoor import (
    ADMIN_MAX_BODY,
    ADMIN_PREFIX,
    OLLAMA_IS_RUNNING,
    FrontDoor,
    Gateway,
    Root,
)
from ollamaflow.server.acceptor import IDLE_TIMEOUT, READ_TIMEOUT, Acceptor, Timeouts
from ollamaflow.settings import DEFAULT_MAX_CONNECTIONS

__all__ = ["ADMIN_MAX_BODY", "ADMIN_PREFIX", "OLLAMA_IS_RUNNING", "Listener", "Root"]


class Listener(Acceptor):
    """An :class:`Acceptor` of a :class:`FrontDoor`; ``body_limit(path, host)`` is asked only
    for client traffic (the front door bounds the admin API's bodies itself)."""

    def __init__(
        self,
        gateway: Gateway,
        root: Root,
        body_limit: Callable[[bytes, bytes | None], int],
        clock: IReactorTime,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        cors_policy: cors.Policy = cors.DEFAULT_POLICY,
    ) -> None:
        self.front_door = FrontDoor(
            gateway, root, lambda host: body_limit(b"/", host), cors_policy=cors_policy
        )
        super().__init__(
            self.front_door,
            clock,
            timeouts=Timeouts(idle_timeout, read_timeout),
            max_connections=max_connections,
        )
