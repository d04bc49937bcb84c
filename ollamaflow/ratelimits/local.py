"""Limits counted by this instance alone, in memory: a few integer operations per call.

A key's counts live in one :class:`_Usage`, kept in least-recently-used order so that keys idle
for over :data:`IDLE_SECONDS` (their windows are empty by then) are dropped from the front, a
few at a time: memory follows the keys active in the last two minutes, however many keys there
are. A key with requests still in flight is kept, whatever its age, or its concurrency count
would be lost.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime

from ollamaflow.ratelimits import window
from ollamaflow.ratelimits.contracts import Admitted, Limits, OverLimit
from ollamaflow.ratelimits.window import MINUTE_MS

#: A key untouched this long (seconds) with nothing in flight is forgotten: its windows are
#: empty by then.
IDLE_SECONDS = 120.0
#: Seconds between two looks at the least recently used keys.
SWEEP_SECONDS = 5.0
#: Keys looked at per call at most: a long quiet spell ends without one long sweep.
SWEEP_BATCH = 1000
#: Admitted without a lease to give back (no concurrency limit).
NO_LEASE = Admitted("")


@attrs.define(eq=False)
class _Usage:
    """One key's counts: requests and tokens of its current and previous minute, and the
    leases of its requests in flight (only kept while it has a concurrency limit)."""

    minute: int
    touched: float
    requests_previous: int = 0
    requests: int = 0
    tokens_previous: int = 0
    tokens: int = 0
    leases: set[str] = attrs.field(factory=set)

    def roll(self, minute: int) -> None:
        """Move the counts to ``minute`` (an earlier one, from a clock set back, keeps them)."""
        if minute > self.minute:
            self.requests_previous, self.requests = window.rolled(
                self.minute, self.requests_previous, self.requests, minute
            )
            self.tokens_previous, self.tokens = window.rolled(
                self.minute, self.tokens_previous, self.tokens, minute
            )
            self.minute = minute


class LocalLimits:
    """This instance's counts per key, on ``clock``: a :class:`~.contracts.RateLimiter` that
    answers at once, never with a Deferred."""

    def __init__(self, clock: IReactorTime, *, idle_seconds: float = IDLE_SECONDS) -> None:
        self._clock = clock
        self._idle_seconds = idle_seconds
        self._keys: OrderedDict[str, _Usage] = OrderedDict()
        self._next_sweep = clock.seconds() + SWEEP_SECONDS
        # Leases are unique across instances too (SharedLimits stores them in Redis).
        self._lease_prefix = secrets.token_hex(6) + ":"
        self._lease_numbers = itertools.count(1)

    # -- the RateLimiter protocol -------------------------------------------------------------

    def admit(self, key_id: str, limits: Limits) -> Admitted | OverLimit:
        """Count one request against ``key_id`` if every limit allows it: :meth:`check` then
        :meth:`record` in one pass, the limits asked first and :func:`window.refusal` only to
        say which refuses (the hot path of every request with a limited key). Without a
        concurrency limit there is nothing to release: the lease is empty."""
        rpm, tpm, most = limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent
        if not (rpm or tpm or most):
            return NO_LEASE
        now = self._clock.seconds()
        usage = self._keys.get(key_id)
        if usage is None or now - usage.touched >= 1.0 or now >= self._next_sweep:
            usage = self._usage(key_id, now)
        minute, elapsed = divmod(int(now * 1000), MINUTE_MS)
        if minute != usage.minute:
            elapsed = self._rolled(usage, now)
        # window.fits for both windows, written out: this runs for every request of a key.
        weight = MINUTE_MS - elapsed
        if (
            (rpm > 0 and usage.requests_previous * weight + (usage.requests + 1) * MINUTE_MS
             > rpm * MINUTE_MS)
            or (tpm > 0 and usage.tokens_previous * weight + usage.tokens * MINUTE_MS
                >= tpm * MINUTE_MS)
            or (most > 0 and len(usage.leases) >= most)
        ):  # fmt: skip
            refused = window.refusal(
                limits,
                elapsed,
                (usage.requests_previous, usage.requests),
                (usage.tokens_previous, usage.tokens),
                len(usage.leases),
            )
            assert refused is not None, "window.refusal and the test above disagree"
            return refused
        if rpm > 0:
            usage.requests += 1
        if most <= 0:
            return NO_LEASE
        lease = self.new_lease()
        usage.leases.add(lease)
        return Admitted(lease)

    def release(self, key_id: str, lease: str) -> None:
        """The request holding ``lease`` ended (an unknown or released lease is ignored)."""
        usage = self._keys.get(key_id)
        if usage is not None:
            usage.leases.discard(lease)

    def spend(self, key_id: str, limits: Limits, tokens: int) -> None:
        """Count ``tokens`` against ``key_id``'s tokens per minute (if it has that limit)."""
        if limits.tokens_per_minute > 0 and tokens > 0:
            now = self._clock.seconds()
            usage = self._usage(key_id, now)
            self._rolled(usage, now)
            usage.tokens += tokens

    def finish(self, key_id: str, limits: Limits, lease: str, tokens: int) -> None:
        """:meth:`release` and :meth:`spend` in one look at the key (every request of a
        limited key ends here)."""
        usage = self._keys.get(key_id)
        if usage is None:  # forgotten while the request ran (no lease keeps it): count anew
            self.spend(key_id, limits, tokens)
            return
        if lease:
            usage.leases.discard(lease)
        if tokens > 0 and limits.tokens_per_minute > 0:
            self._rolled(usage, self._clock.seconds())
            usage.tokens += tokens

    # -- the steps, for SharedLimits ------------------------------------------------------------

    def check(self, key_id: str, limits: Limits) -> OverLimit | None:
        """Which limit would refuse one more request of ``key_id`` here, without counting it."""
        if not limits:
            return None
        usage = self._keys.get(key_id)
        if usage is None:
            return None
        return window.refusal(
            limits,
            self._rolled(usage, self._clock.seconds()),
            (usage.requests_previous, usage.requests),
            (usage.tokens_previous, usage.tokens),
            len(usage.leases),
        )

    def record(self, key_id: str, limits: Limits, lease: str) -> None:
        """Count one admitted request of ``key_id``, holding ``lease``, whatever the limits."""
        if not limits:
            return
        now = self._clock.seconds()
        usage = self._usage(key_id, now)
        self._rolled(usage, now)
        if limits.requests_per_minute > 0:
            usage.requests += 1
        if limits.max_concurrent > 0:
            usage.leases.add(lease)

    def new_lease(self) -> str:
        """A lease no other request of any instance holds."""
        return f"{self._lease_prefix}{next(self._lease_numbers)}"

    # -- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """How many keys have state here."""
        return len(self._keys)

    def in_flight(self, key_id: str) -> int:
        """How many requests of ``key_id`` hold a lease here."""
        usage = self._keys.get(key_id)
        return 0 if usage is None else len(usage.leases)

    # -- the keys' states -----------------------------------------------------------------------

    def _usage(self, key_id: str, now: float) -> _Usage:
        """``key_id``'s state, created if needed and marked as used (to the second: the idle
        limit is minutes, so the order of keys used within one second does not matter)."""
        if now >= self._next_sweep:
            self._sweep(now)
        usage = self._keys.get(key_id)
        if usage is None:
            usage = self._keys[key_id] = _Usage(int(now * 1000) // MINUTE_MS, now)
        elif now - usage.touched >= 1.0:
            usage.touched = now
            self._keys.move_to_end(key_id)
        return usage

    @staticmethod
    def _rolled(usage: _Usage, now: float) -> int:
        """Roll ``usage`` to the minute of ``now``; the milliseconds elapsed in that minute
        (0 while the clock is behind the counts: set back)."""
        minute, elapsed = window.minute_of(int(now * 1000))
        if minute != usage.minute:
            usage.roll(minute)
            if minute < usage.minute:
                return 0
        return elapsed

    def _sweep(self, now: float) -> None:
        """Forget the keys idle for too long, from the least recently used on, a batch at a
        time: when the batch runs out, the next call goes on."""
        keys = self._keys
        idle_since = now - self._idle_seconds
        for _ in range(SWEEP_BATCH):
            key_id, usage = next(iter(keys.items()), ("", None))
            if usage is None or usage.touched > idle_since:
                self._next_sweep = now + SWEEP_SECONDS
                return
            if usage.leases:
                usage.touched = now
                keys.move_to_end(key_id)
            else:
                del keys[key_id]
