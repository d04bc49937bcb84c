"""Idle keep-alive connections to backends, kept for the next request.

Per backend (``(host, port, ssl)``) the newest idle connection is reused first; at most
``max_idle_per_backend`` are kept, and one periodic sweep per pool closes those idle longer
than ``idle_seconds`` (the oldest are first in line, so it stops at the first young one).
Backends the pool was told to forget get no connection back into it.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ollamaflow.upstream.contracts import Where


class Pooled(Protocol):
    """A connection as the pool handles it."""

    @property
    def where(self) -> Where: ...

    def close(self) -> None:
        """Close it (no request is using it)."""

    def when_closed(self) -> Deferred[None]:
        """Fires once it is closed."""
        ...


C = TypeVar("C", bound=Pooled)


class ConnectionPool(Generic[C]):
    """The idle connections, per backend, oldest first."""

    def __init__(
        self, clock: IReactorTime, max_idle_per_backend: int = 1024, idle_seconds: float = 120.0
    ) -> None:
        self.clock = clock
        self.max_idle_per_backend = max_idle_per_backend
        self.idle_seconds = idle_seconds
        #: Idle connections per backend with the time each became idle, oldest first.
        self._idle: dict[Where, list[tuple[C, float]]] = {}
        #: Backends dialled since they were last forgotten (their connections are kept).
        self._known: set[Where] = set()
        self._sweep_call: IDelayedCall | None = None

    def take(self, where: Where) -> C | None:
        """The newest idle connection to ``where``, out of the pool; None if there is none."""
        idle = self._idle.get(where)
        if idle:
            return idle.pop()[0]
        return None

    def dialled(self, where: Where) -> None:
        """A connection to ``where`` is being opened: keep it when its request is done."""
        self._known.add(where)

    def release(self, connection: C) -> None:
        """A connection finished a request cleanly: keep it for the next one, or close it."""
        where = connection.where
        idle = self._idle.get(where)
        if idle is None:
            if where not in self._known:  # forgotten while the request ran
                connection.close()
                return
            idle = self._idle[where] = []
        if len(idle) >= self.max_idle_per_backend:
            connection.close()
            return
        idle.append((connection, self.clock.seconds()))
        if self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self._sweep_every(), self._sweep)

    def discard(self, connection: C) -> None:
        """An idle connection closed (by the server, mostly): it leaves the pool."""
        where = connection.where
        idle = self._idle.get(where)
        if idle is None:
            return
        for index, (pooled, _) in enumerate(idle):
            if pooled is connection:
                del idle[index]
                if not idle:
                    del self._idle[where]
                return

    def idle(self, where: Where) -> list[C]:
        """The idle connections to ``where``, oldest first."""
        return [connection for connection, _ in self._idle.get(where, ())]

    def __len__(self) -> int:
        """How many connections are idle."""
        return sum(len(idle) for idle in self._idle.values())

    def forget(self, keep: Set[Where]) -> None:
        """Close the idle connections of the backends not in ``keep``, and keep none of theirs
        that finish a request later."""
        self._known &= keep
        for where in [w for w in self._idle if w not in keep]:
            for connection, _ in self._idle.pop(where):
                connection.close()

    async def close(self) -> None:
        """Close every idle connection and wait until they are closed."""
        if self._sweep_call is not None:
            if self._sweep_call.active():
                self._sweep_call.cancel()
            self._sweep_call = None
        closing: list[Deferred[None]] = []
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection, _ in connections:
                closing.append(connection.when_closed())
                connection.close()
        await gatherResults(closing)

    def _sweep_every(self) -> float:
        return max(self.idle_seconds / 2, 0.001)

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_seconds`` or more (the oldest are first)."""
        self._sweep_call = None
        oldest_kept = self.clock.seconds() - self.idle_seconds
        for where, idle in list(self._idle.items()):
            stale = 0
            while stale < len(idle) and idle[stale][1] <= oldest_kept:
                stale += 1
            if stale:
                expired = idle[:stale]
                del idle[:stale]
                for connection, _ in expired:
                    connection.close()
            if not idle:
                del self._idle[where]
        if self._idle:
            self._sweep_call = self.clock.callLater(self._sweep_every(), self._sweep)
