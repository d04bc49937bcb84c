"""Deadlines for requests in flight, cheaper than one reactor timer each.

Every proxied request waits for its backend's response head at most its frontend's TimeoutMs.
A ``callLater`` per request costs a heavy DelayedCall, a heap push whose comparisons are Python
calls, and a cancellation the reactor must clean up: about 6% of the gateway's throughput. All
requests of a frontend wait the same length, so their deadlines come in the order they were
set: one queue per length, appended to, and one reactor call per length, for the earliest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: A queue is compacted when it holds more cancelled deadlines than this and than live ones.
_COMPACT_ABOVE = 1024


@attrs.define(eq=False)
class Deadline:
    """One timeout; :meth:`cancel` it once what it guards is over."""

    at: float
    expired: Callable[[], object] | None
    queue: _Queue

    def cancel(self) -> None:
        if self.expired is not None:
            self.expired = None
            self.queue.cancelled()


@attrs.define(eq=False)
class _Queue:
    """The deadlines of one length, earliest first, and the reactor call for the first."""

    seconds: float
    pending: deque[Deadline] = attrs.field(factory=deque)
    dead: int = 0
    call: IDelayedCall | None = None

    def cancelled(self) -> None:
        self.dead += 1
        if self.dead > _COMPACT_ABOVE and self.dead * 2 > len(self.pending):
            self.pending = deque(d for d in self.pending if d.expired is not None)
            self.dead = 0


@attrs.define
class Deadlines:
    """Timeouts of a few distinct lengths (one per frontend's TimeoutMs), in FIFO queues."""

    clock: IReactorTime
    _queues: dict[float, _Queue] = attrs.field(factory=dict)

    def add(self, seconds: float, expired: Callable[[], object]) -> Deadline:
        """Call ``expired()`` in ``seconds`` unless the deadline is cancelled first."""
        queue = self._queues.get(seconds)
        if queue is None:
            queue = self._queues[seconds] = _Queue(seconds)
        deadline = Deadline(self.clock.seconds() + seconds, expired, queue)
        queue.pending.append(deadline)
        if queue.call is None:
            queue.call = self.clock.callLater(seconds, self._due, queue)
        return deadline

    def pending(self) -> int:
        """Deadlines not yet expired nor cancelled (for tests and metrics)."""
        return sum(len(q.pending) - q.dead for q in self._queues.values())

    def _due(self, queue: _Queue) -> None:
        # ``queue.call`` stays set meanwhile: deadlines added by the callbacks schedule nothing.
        now = self.clock.seconds()
        while queue.pending and queue.pending[0].at <= now:  # a callback may compact it
            deadline = queue.pending.popleft()
            expired, deadline.expired = deadline.expired, None
            if expired is None:
                queue.dead -= 1
                continue
            try:
                expired()
            except Exception:
                log.failure("a deadline's callback failed")
        if queue.pending:
            first = queue.pending[0].at
            queue.call = self.clock.callLater(max(0.0, first - now), self._due, queue)
        else:
            queue.call = None
            queue.dead = 0
            del self._queues[queue.seconds]
