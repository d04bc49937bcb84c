"""What the gateway asks of a limiter, and what it answers."""

from __future__ import annotations

from typing import Protocol

import attrs
from twisted.internet.defer import Deferred


@attrs.frozen
class Limits:
    """What one key may take; 0 means no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0

    def __bool__(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_concurrent)


NO_LIMITS = Limits()


@attrs.frozen
class Admitted:
    """The request may go; ``lease`` is what :meth:`RateLimiter.release` gives back."""

    lease: str


@attrs.frozen
class OverLimit:
    """The request must not go: ``which`` limit (``"requests per minute"``, ``"tokens per
    minute"`` or ``"concurrent requests"``), its value, and when to try again (seconds, >= 1)."""

    which: str
    limit: int
    retry_after: int


Admission = Admitted | OverLimit


class RateLimiter(Protocol):
    """Counts what each key takes. ``admit`` answers at once when it can (this instance's
    counts), else with a Deferred (a shared store's answer), which never fails."""

    def admit(self, key_id: str, limits: Limits) -> Admission | Deferred[Admission]:
        """Count one request against ``key_id`` if every limit allows it."""

    def release(self, key_id: str, lease: str) -> None:
        """The admitted request ended: its concurrency slot is free."""

    def finish(self, key_id: str, limits: Limits, lease: str, tokens: int) -> None:
        """A request of ``key_id`` ended: its lease goes back (as :meth:`release`), and the
        ``tokens`` (prompt + completion) the backend reported count against the key."""
