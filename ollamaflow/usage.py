"""Usage accounting: requests, errors and tokens per API key, model and hour.

:class:`UsageLedger` observes every finished client request and adds it to in-memory counters;
:class:`UsageFlusher` writes them to the store every few seconds, one ``add_usage`` call (one
transaction) per flush. Counts the store could not take are kept and merged with the newer
ones, so an unreachable database delays the accounting without losing or doubling it (unless
memory runs out: past :data:`MAX_PENDING_ROWS` rows the oldest hours are dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ollamaflow.gateway.completed import Completed
from ollamaflow.metrics import OTHER
from ollamaflow.records import RESERVED_KEY_IDENTIFIERS, UsageRow
from ollamaflow.store.errors import StoreUnavailable

log = Logger()

#: Rows (key, model, hour) kept waiting for the database at most; past it the oldest hours go.
MAX_PENDING_ROWS = 100_000
#: Seconds between two flushes.
FLUSH_INTERVAL = 10.0

#: Seconds in an hour: counters are keyed by the epoch hour, ``int(seconds) // HOUR``.
HOUR = 3600

#: ``(key_id, model) → [requests, errors, prompt_tokens, completion_tokens]`` of one hour.
_Rows = dict[tuple[str, str], list[int]]
#: Epoch hour → its rows.
_Pending = dict[int, _Rows]


class UsageStore(Protocol):
    """What the ledger needs of the store."""

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add the counts of ``rows`` to the stored ones, in one transaction."""

    async def read_usage(self, key_id: str, since: datetime, limit: int) -> list[UsageRow]:
        """The stored rows of ``key_id`` from the hour containing ``since``, by hour then
        model, at most ``limit``."""


def _timestamp(moment: datetime) -> float:
    """Seconds since the epoch; a naive datetime is read as UTC."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _epoch_hour(moment: datetime) -> int:
    """The epoch hour ``moment`` falls in."""
    return int(_timestamp(moment)) // HOUR


def _hour_start(hour: int) -> datetime:
    return datetime.fromtimestamp(hour * HOUR, UTC)


def _merge_counts(into: list[int], counts: Sequence[int]) -> None:
    for i, n in enumerate(counts):
        into[i] += n


#: A model's name as counted (as the metrics label it): None for one no backend lists.
KnownModel = Callable[[str], str | None]


class UsageLedger:
    """Counts finished requests per (API key, model, hour) until they are flushed to ``store``.

    Models are counted by name only when ``known_model`` knows them (a backend lists them),
    else as ``other``: a client's made-up names must not become rows, nor crowd out the
    counts of real ones.

    Call it with each :class:`Completed` (a gateway observer): a few dict lookups and integer
    additions, no I/O. :meth:`flush` writes what is pending; :meth:`usage` answers the admin
    API from the store and what is not written yet. A flush the store reports as perhaps
    committed (``StoreUnavailable.unsure``) is kept as a failed one, so its counts may be
    written twice (logged): the store offers no idempotent write to rule that out.
    """

    def __init__(
        self,
        store: UsageStore,
        clock: IReactorTime,
        *,
        known_model: KnownModel = lambda model: model,
        max_rows: int = MAX_PENDING_ROWS,
    ) -> None:
        self.store = store
        self.known_model = known_model
        self.max_rows = max_rows
        self._seconds = clock.seconds
        self._pending: _Pending = {}
        self._rows = 0
        # Flushes and usage reads take turns: while neither runs, every count is either
        # stored or pending, never both or neither.
        self._lock = DeferredLock()
        self._failing = 0
        self._refused_hour: int | None = None

    @property
    def pending_rows(self) -> int:
        """How many (key, model, hour) rows wait for the next flush."""
        return self._rows

    def __call__(self, c: Completed) -> None:
        """Count one finished client request (the gateway observer)."""
        hour = int(self._seconds()) // HOUR
        rows = self._pending.get(hour)
        if rows is None:
            rows = self._pending[hour] = {}
        model = "" if c.model is None else self.known_model(c.model) or OTHER
        key = (c.api_key, model)
        counts = rows.get(key)
        if counts is None:
            if self._rows >= self.max_rows and not self._make_room(hour):
                if not rows:
                    del self._pending[hour]
                return
            counts = rows[key] = [0, 0, 0, 0]
            self._rows += 1
        counts[0] += 1
        if c.failed:
            counts[1] += 1
        if c.prompt_eval_count:
            counts[2] += c.prompt_eval_count
        if c.eval_count:
            counts[3] += c.eval_count

    def flush(self) -> Deferred[None]:
        """Write what is pending with one ``add_usage`` call; on failure (logged) keep it for
        the next flush. Waits for a flush or usage read under way; never fails."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._flush()))

    def usage(self, key_id: str, since: datetime, limit: int) -> Deferred[list[UsageRow]]:
        """The usage of ``key_id`` from the hour containing ``since``: the stored rows plus the
        pending counts, one row per (model, hour), by hour then model, at most
        ``limit`` (the oldest)."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._usage(key_id, since, limit)))

    async def _flush(self) -> None:
        taken, self._pending, self._rows = self._pending, {}, 0
        if not taken:
            return
        rows = [
            UsageRow(key_id, model, _hour_start(hour), *counts)
            for hour, hour_rows in taken.items()
            for (key_id, model), counts in hour_rows.items()
        ]
        try:  # the store writes them in one order (several daemons lock rows alike)
            await self.store.add_usage(rows)
        except Exception as e:
            self._put_back(taken)
            self._failing += 1
            if isinstance(e, StoreUnavailable) and e.unsure:
                log.warn(
                    "usage of {rows} rows kept for the next try, but may have been written "
                    "(then it will count twice): {error}",
                    rows=len(rows),
                    error=e,
                )
            elif self._failing > 1:
                pass  # logged when the failures began
            elif isinstance(e, StoreUnavailable):
                log.warn("usage not written, kept for the next try: {error}", error=e)
            else:
                log.failure("usage not written, kept for the next try")
            return
        if self._failing:
            log.info("usage written again after {n} failed flushes", n=self._failing)
            self._failing = 0

    async def _usage(self, key_id: str, since: datetime, limit: int) -> list[UsageRow]:
        merged: dict[tuple[int, str], list[int]] = {
            (_epoch_hour(row.hour), row.model): [
                row.requests,
                row.errors,
                row.prompt_tokens,
                row.completion_tokens,
            ]
            for row in await self.store.read_usage(key_id, since, limit)
        }
        first = _epoch_hour(since)
        for hour, rows in self._pending.items():
            if hour < first:
                continue
            for (key, model), counts in rows.items():
                if key != key_id:
                    continue
                existing = merged.get((hour, model))
                if existing is None:
                    merged[hour, model] = list(counts)
                else:
                    _merge_counts(existing, counts)
        return [
            UsageRow(key_id, model, _hour_start(hour), *counts)
            for (hour, model), counts in sorted(merged.items())[:limit]
        ]

    def _put_back(self, taken: _Pending) -> None:
        """Merge the counts of a failed flush into those counted since."""
        for hour, rows in taken.items():
            into = self._pending.get(hour)
            if into is None:
                self._pending[hour] = rows
                self._rows += len(rows)
                continue
            for key, counts in rows.items():
                existing = into.get(key)
                if existing is None:
                    into[key] = counts
                    self._rows += 1
                else:
                    _merge_counts(existing, counts)
        self._drop_oldest(keep=max(self._pending))

    def forget_keys(self, existing: Collection[str]) -> None:
        """Drop the pending counts of keys not in ``existing`` (a registry subscriber): a
        deleted key's stored usage is deleted with it, and the next flush must not write it
        back. Anonymous and admin usage stay."""
        kept = {*existing, *RESERVED_KEY_IDENTIFIERS}
        for hour, rows in list(self._pending.items()):
            for row in [row for row in rows if row[0] not in kept]:
                del rows[row]
                self._rows -= 1
            if not rows:
                del self._pending[hour]

    def _make_room(self, hour: int) -> bool:
        """At the cap, before a new row for ``hour``: drop the oldest other hours; False (the
        request goes uncounted, logged once per hour) if ``hour`` alone fills the cap."""
        self._drop_oldest(keep=hour, room=1)
        if self._rows < self.max_rows:
            return True
        if self._refused_hour != hour:
            self._refused_hour = hour
            log.warn(
                "usage not counted: {rows} rows of this hour wait for the database already",
                rows=self._rows,
            )
        return False

    def _drop_oldest(self, keep: int, room: int = 0) -> None:
        """Drop the oldest hours other than ``keep`` until ``room`` rows fit under the cap."""
        dropped: list[int] = []
        rows = 0
        while self._rows + room > self.max_rows and len(self._pending) > 1:
            oldest = min(hour for hour in self._pending if hour != keep)
            rows += len(self._pending[oldest])
            self._rows -= len(self._pending.pop(oldest))
            dropped.append(oldest)
        if dropped:
            log.warn(
                "usage of {hours} dropped ({rows} rows): more than {cap} rows were waiting "
                "for the database",
                hours=", ".join(f"{_hour_start(h):%Y-%m-%d %H:00}Z" for h in dropped),
                rows=rows,
                cap=self.max_rows,
            )


class UsageFlusher(Service):
    """Flushes a :class:`UsageLedger` every ``interval`` seconds, one flush at a time, and
    once more when stopped (shutdown waits for it)."""

    def __init__(
        self, ledger: UsageLedger, clock: IReactorTime, interval: float = FLUSH_INTERVAL
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None
        self._stopped: Deferred[LoopingCall] | None = None

    def startService(self) -> None:
        super().startService()
        # A flush never fails, and the loop waits for each one before the next is due.
        self._loop = LoopingCall(self.ledger.flush)
        self._loop.clock = self.clock
        self._stopped = self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        loop, stopped, self._loop, self._stopped = self._loop, self._stopped, None, None
        if loop is not None and loop.running:
            loop.stop()
        if stopped is None:
            return self.ledger.flush()
        # After the flush under way, if any (the ledger's lock would order them too).
        return stopped.addCallback(lambda _: self.ledger.flush())
