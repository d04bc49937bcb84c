"""Backend slots and the wait for them.

Every request holds a slot on the backend serving it (``MaxParallelRequests`` per backend, or
``RateLimitRequestsThreshold`` when lower) from
its first attempt to its last byte. When every candidate is full the request waits in its
frontend's FIFO queue and takes the first slot that frees on a backend it may use — one queue
per frontend, not one per backend, so nobody waits behind a long generation while another box
idles. Which backends a waiter may use is asked when a slot frees, not fixed when it arrived:
health changes meanwhile. A request made with an API key of higher ``Priority`` goes ahead of
those of lower ones (FIFO within one priority). A request whose attempt failed comes back to
the queue in its old place, with its old deadline. A backend out of rotation (it just failed a
request) hands its freed slots to nobody. Slots are taken and given back only here, which keeps
the counts exact.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ollamaflow.modelnames import comparable
from ollamaflow.records import Backend, Frontend
from ollamaflow.runtime import Runtime


class QueueRefused(Exception):
    """The request cannot wait: the queue is full, or it waited too long. ``retry_after`` is
    a hint in seconds for the client."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: Whether a waiting request would take a slot of this backend now, and the record to use.
Eligible = Callable[[Backend], Backend | None]


@attrs.define(eq=False)
class _Waiter:
    frontend: str
    eligible: Eligible
    model: str | None
    #: When the request arrived: the queue's order, and where its deadline counts from.
    since: float
    deferred: Deferred[Backend]
    priority: int = 0
    timer: IDelayedCall | None = None
    #: Its place: higher priority first, then earlier arrival.
    rank: tuple[int, float] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.rank = (-self.priority, self.since)


@attrs.define
class QueueStats:
    """What an operator wants to know about one frontend's queue."""

    peak_depth: int = 0
    queued: int = 0
    served: int = 0
    timed_out: int = 0
    rejected: int = 0
    total_wait: float = 0.0
    max_wait: float = 0.0

    def to_wire(self, depth: int) -> dict[str, object]:
        return {
            "QueueDepth": depth,
            "PeakQueueDepth": self.peak_depth,
            "Queued": self.queued,
            "ServedFromQueue": self.served,
            "TimedOut": self.timed_out,
            "Rejected": self.rejected,
            "AverageQueueWaitMs": round(1000 * self.total_wait / self.served) if self.served else 0,
            "MaxQueueWaitMs": round(1000 * self.max_wait),
        }


@attrs.define
class Scheduler:
    """Slots per backend, and the per-frontend queues of requests waiting for one."""

    clock: IReactorTime
    runtime: Runtime
    _queues: dict[str, deque[_Waiter]] = attrs.field(factory=dict)
    stats: dict[str, QueueStats] = attrs.field(factory=dict)
    #: Requests waiting per model (:func:`modelnames.comparable`), and in which frontends'
    #: queues: what placement and the preloader ask.
    _waiting: dict[str, dict[str, int]] = attrs.field(factory=dict)

    def has_slot(self, backend: Backend, model: str | None = None) -> bool:
        """Whether the backend may take one more request (for ``model``, if it limits those)."""
        state = self.runtime.states.get(backend.identifier)
        if state is None:
            return True
        active = state.active_requests
        if active >= backend.slots or (active and state.probation):
            return False
        per_model = backend.model_parallel_requests
        return not (per_model and model and state.active_by_model.get(model, 0) >= per_model)

    def acquire(self, backend: Backend, model: str | None) -> None:
        self.runtime.state(backend.identifier).begin(model)

    def release(self, backend: Backend, model: str | None) -> None:
        """Give a slot back, and hand it straight to the longest-waiting request that can use it."""
        state = self.runtime.states.get(backend.identifier)
        if state is not None:
            state.end(model)
        self.wake(backend)

    def wake(self, backend: Backend) -> None:
        """Hand free slots of ``backend`` to waiting requests, oldest first; none while it is
        out of rotation."""
        state = self.runtime.states.get(backend.identifier)
        if state is not None and state.suspect:
            return
        while self._queues and self.has_slot(backend):
            found = self._oldest_for(backend)
            if found is None:
                return
            waiter, chosen = found
            self._remove(waiter)
            stats = self.stats[waiter.frontend]
            waited = self.clock.seconds() - waiter.since
            stats.served += 1
            stats.total_wait += waited
            stats.max_wait = max(stats.max_wait, waited)
            self.acquire(chosen, waiter.model)
            waiter.deferred.callback(chosen)

    def waiting_for(self, key: str) -> int:
        """Requests waiting for model ``key`` (:func:`modelnames.comparable`)."""
        found = self._waiting.get(key)
        return sum(found.values()) if found else 0

    def waiting_models(self) -> dict[str, dict[str, int]]:
        """Model key → frontend → requests waiting for it there (a copy)."""
        return {key: dict(frontends) for key, frontends in self._waiting.items()}

    def depth(self, frontend: str) -> int:
        queue = self._queues.get(frontend)
        return len(queue) if queue else 0

    def wait(
        self,
        frontend: Frontend,
        backends: Sequence[Backend],
        eligible: Eligible,
        model: str | None,
        priority: int = 0,
    ) -> Deferred[Backend]:
        """Queue a request whose candidates (``backends``) are all full; fires with a backend
        ``eligible`` chose, whose slot is already taken for it, or fails with
        :class:`QueueRefused`. Cancel it if the client leaves.

        Only the queue refuses (``MaxQueueDepth`` waiting, ``QueueTimeoutMs``), as Ollama
        queues a burst rather than refusing it: a backend's ``RateLimitRequestsThreshold``
        counts the requests sent to it (see :attr:`Backend.slots`), not those waiting here."""
        stats = self.stats.setdefault(frontend.identifier, QueueStats())
        depth = self.depth(frontend.identifier)
        if depth >= frontend.max_queue_depth:
            stats.rejected += 1
            raise QueueRefused(
                f"frontend {frontend.identifier!r}: all backends are busy and "
                f"{depth} requests are already waiting"
            )

        waiter = self._waiter(frontend, eligible, model, self.clock.seconds(), priority)
        self._enqueue(waiter)
        stats.queued += 1
        stats.peak_depth = max(stats.peak_depth, depth + 1)
        return waiter.deferred

    def wait_again(
        self,
        frontend: Frontend,
        eligible: Eligible,
        model: str | None,
        since: float,
        priority: int = 0,
    ) -> Deferred[Backend]:
        """Queue a request that arrived at ``since`` and whose attempt failed: in its place
        among the waiters by arrival (ahead of everyone who came later, whatever the depth),
        with the deadline it had. Fails at once if that deadline has passed."""
        stats = self.stats.setdefault(frontend.identifier, QueueStats())
        limit = frontend.queue_timeout_ms
        if limit and self.clock.seconds() - since >= limit / 1000:
            stats.timed_out += 1
            return fail(QueueRefused(f"no backend slot freed within {limit} ms", retry_after=2))
        waiter = self._waiter(frontend, eligible, model, since, priority)
        self._enqueue(waiter)
        stats.queued += 1
        stats.peak_depth = max(stats.peak_depth, self.depth(frontend.identifier))
        return waiter.deferred

    def _enqueue(self, waiter: _Waiter) -> None:
        """Into its frontend's queue in its place by rank (at the end, unless it outranks
        someone: a higher priority, or an earlier arrival coming back)."""
        queue = self._queues.setdefault(waiter.frontend, deque())
        place = len(queue)
        while place and queue[place - 1].rank > waiter.rank:
            place -= 1
        queue.insert(place, waiter)
        if waiter.model is not None:
            counts = self._waiting.setdefault(comparable(waiter.model), {})
            counts[waiter.frontend] = counts.get(waiter.frontend, 0) + 1

    def _waiter(
        self,
        frontend: Frontend,
        eligible: Eligible,
        model: str | None,
        since: float,
        priority: int,
    ) -> _Waiter:
        def cancelled(_: Deferred[Backend]) -> None:
            self._remove(waiter)

        waiter = _Waiter(frontend.identifier, eligible, model, since, Deferred(cancelled), priority)
        limit = frontend.queue_timeout_ms
        if limit:
            delay = max(0.0, since + limit / 1000 - self.clock.seconds())
            waiter.timer = self.clock.callLater(delay, self._expired, waiter, limit)
        return waiter

    def _expired(self, waiter: _Waiter, limit_ms: int) -> None:
        waiter.timer = None
        self._remove(waiter)
        self.stats[waiter.frontend].timed_out += 1
        waiter.deferred.errback(
            QueueRefused(f"no backend slot freed within {limit_ms} ms", retry_after=2)
        )

    def _oldest_for(self, backend: Backend) -> tuple[_Waiter, Backend] | None:
        """The first-ranked request (highest priority, then longest waiting) that may use a
        free slot of ``backend`` now, and the backend record it chose."""
        oldest: tuple[_Waiter, Backend] | None = None
        for queue in self._queues.values():
            for waiter in queue:
                if oldest is not None and waiter.rank >= oldest[0].rank:
                    break
                if self.has_slot(backend, waiter.model):
                    chosen = waiter.eligible(backend)
                    if chosen is not None:
                        oldest = (waiter, chosen)
                        break
        return oldest

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.frontend)
        if queue is not None:
            try:
                queue.remove(waiter)
            except ValueError:
                pass
            else:
                self._uncount(waiter)
            if not queue:
                del self._queues[waiter.frontend]
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    def _uncount(self, waiter: _Waiter) -> None:
        if waiter.model is None:
            return
        key = comparable(waiter.model)
        counts = self._waiting.get(key)
        if counts is None:
            return
        left = counts.get(waiter.frontend, 0) - 1
        if left > 0:
            counts[waiter.frontend] = left
        else:
            counts.pop(waiter.frontend, None)
            if not counts:
                del self._waiting[key]

    def forget(self, frontends: Callable[[str], bool]) -> None:
        """Drop the stats of frontends that no longer exist."""
        for name in [f for f in self.stats if not frontends(f)]:
            del self.stats[name]
