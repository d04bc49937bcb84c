"""What the fleet did lately, for the dashboard: the latest finished requests, and per backend
and frontend the counts of the last 15 minutes in 10-second buckets.

:class:`Activity` observes every :class:`~ollamaflow.gateway.completed.Completed` (a deque
append and a few integer additions: it runs for every request); the live feed reads it once a
second, and only while a dashboard is open.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterator
from typing import Any, NamedTuple

import attrs

from ollamaflow.gateway.completed import Completed

#: Seconds per bucket, and buckets kept: 15 minutes.
BUCKET_SECONDS = 10
BUCKETS = 90
#: Finished requests kept for the live requests view.
RECENT_REQUESTS = 200
#: What a request line shows of a client-supplied path or model at most.
SHOWN_CHARACTERS = 256


@attrs.define
class Buckets:
    """Counts per bucket over the last :data:`BUCKETS` buckets, in a ring; ``last`` is the
    absolute number (``seconds // BUCKET_SECONDS``) of the newest bucket written."""

    counts: list[int] = attrs.field(factory=lambda: [0] * BUCKETS)
    last: int = 0

    def add(self, bucket: int, amount: int = 1) -> None:
        self._advance(bucket)
        self.counts[bucket % BUCKETS] += amount

    def window(self, bucket: int) -> list[int]:
        """The counts of the :data:`BUCKETS` buckets that end with ``bucket``, oldest first
        (the ring holds ``last - BUCKETS + 1`` to ``last``; any other bucket counted none)."""
        self._advance(bucket)
        held = range(self.last - BUCKETS + 1, self.last + 1)
        counts = self.counts
        return [
            counts[b % BUCKETS] if b in held else 0 for b in range(bucket - BUCKETS + 1, bucket + 1)
        ]

    def total(self, bucket: int) -> int:
        self._advance(bucket)
        return sum(self.counts)

    def _advance(self, bucket: int) -> None:
        """Zero the buckets between the newest written and ``bucket`` (time went on)."""
        if bucket <= self.last:
            return
        counts = self.counts
        if bucket - self.last >= BUCKETS:
            counts[:] = [0] * BUCKETS
        else:
            for b in range(self.last + 1, bucket + 1):
                counts[b % BUCKETS] = 0
        self.last = bucket


@attrs.define
class BackendActivity:
    requests: Buckets = attrs.field(factory=Buckets)
    tokens: Buckets = attrs.field(factory=Buckets)


@attrs.define
class FrontendActivity:
    requests: Buckets = attrs.field(factory=Buckets)
    errors: Buckets = attrs.field(factory=Buckets)
    too_many: Buckets = attrs.field(factory=Buckets)
    #: Requests per backend that served them.
    routes: dict[str, Buckets] = attrs.field(factory=dict)


class Finished(NamedTuple):
    """A finished request as the live requests view keeps it: when, and in what order (a
    named tuple: one is made for every request, at a third of a frozen class's cost)."""

    sequence: int
    seconds: float
    completed: Completed


@attrs.define
class Activity:
    """A gateway observer keeping the latest requests and 15 minutes of counts; ``clock``
    gives seconds since the epoch."""

    clock: Callable[[], float]
    recent: deque[Finished] = attrs.field(factory=lambda: deque(maxlen=RECENT_REQUESTS))
    backends: dict[str, BackendActivity] = attrs.field(factory=dict)
    frontends: dict[str, FrontendActivity] = attrs.field(factory=dict)
    #: Requests seen since start: the sequence number of the latest.
    sequence: int = 0

    def __call__(self, c: Completed) -> None:
        now = self.clock()
        self.sequence += 1
        self.recent.append(Finished(self.sequence, now, c))
        bucket = int(now) // BUCKET_SECONDS
        frontend = self.frontends.get(c.frontend)
        if frontend is None:
            frontend = self.frontends[c.frontend] = FrontendActivity()
        frontend.requests.add(bucket)
        if c.failed:
            frontend.errors.add(bucket)
            if c.status == 429:
                frontend.too_many.add(bucket)
        served = c.backend
        if served is None:
            return
        route = frontend.routes.get(served)
        if route is None:
            route = frontend.routes[served] = Buckets()
        route.add(bucket)
        backend = self.backends.get(served)
        if backend is None:
            backend = self.backends[served] = BackendActivity()
        backend.requests.add(bucket)
        if c.eval_count:
            backend.tokens.add(bucket, c.eval_count)

    def forget_all_but(self, frontends: Collection[str], backends: Collection[str]) -> None:
        """Deleted frontends and backends go (a registry subscriber calls this)."""
        for gone in [f for f in self.frontends if f not in frontends]:
            del self.frontends[gone]
        for gone in [b for b in self.backends if b not in backends]:
            del self.backends[gone]
        for frontend in self.frontends.values():
            for gone in [b for b in frontend.routes if b not in backends]:
                del frontend.routes[gone]

    def bucket(self) -> int:
        """The bucket now is in."""
        return int(self.clock()) // BUCKET_SECONDS

    def after(self, sequence: int) -> Iterator[Finished]:
        """The requests kept that finished after the one numbered ``sequence``, oldest first."""
        if sequence >= self.sequence:
            return iter(())
        return (f for f in self.recent if f.sequence > sequence)

    def series(self, identifiers: Collection[str]) -> dict[str, Any]:
        """Requests and tokens per whole bucket of the last 15 minutes, per backend: the bucket
        filling now is left out, so the series changes once per bucket."""
        ended = self.bucket() - 1
        out: dict[str, Any] = {}
        for identifier in identifiers:
            backend = self.backends.get(identifier) or BackendActivity()
            out[identifier] = {
                "Requests": backend.requests.window(ended),
                "Tokens": backend.tokens.window(ended),
            }
        return out

    def recent_counts(self, frontend: str) -> dict[str, Any]:
        """A frontend's last 15 minutes: requests, errors, 429s, and requests per backend."""
        bucket = self.bucket()
        found = self.frontends.get(frontend)
        if found is None:
            return {"Requests": 0, "Errors": 0, "TooManyRequests": 0, "Backends": {}}
        routes = {name: b.total(bucket) for name, b in found.routes.items()}
        return {
            "Requests": found.requests.total(bucket),
            "Errors": found.errors.total(bucket),
            "TooManyRequests": found.too_many.total(bucket),
            "Backends": {name: n for name, n in routes.items() if n},
        }


def request_line(finished: Finished, format_time: Callable[[float], str]) -> dict[str, Any]:
    """One line of the live requests view, in the admin API's style."""
    c = finished.completed
    rate = c.tokens_per_second
    backend = c.backend if c.backend is not None else ",".join(c.backends) or None
    return {
        "Time": format_time(finished.seconds),
        "Id": c.request_id,
        "Method": c.method,
        "Path": c.path[:SHOWN_CHARACTERS],
        "Frontend": c.frontend,
        "Backend": backend,
        "Model": None if c.model is None else c.model[:SHOWN_CHARACTERS],
        "Status": c.status,
        "Outcome": c.outcome,
        "DurationMs": round(c.duration * 1000.0, 1),
        "Tokens": c.eval_count,
        "TokensPerSecond": None if rate is None else round(rate, 1),
        "Key": c.api_key,
    }
