"""Per-backend runtime state: health as the checks and the proxy see it, and requests in flight.

This is state of one daemon process, never stored: each instance judges backends itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import Enum

import attrs

from ollamaflow.records import Backend
from ollamaflow.utctime import format_timespan, format_utc

#: The longest a backend is held out for failures a health check cannot see, in seconds.
MAX_HOLD = 300.0


class FailureKind(Enum):
    """How a request's failure on a backend shows."""

    #: Refused, reset, timed out, a gateway error: a health check would likely see it too.
    VISIBLE = "visible"
    #: A stream the backend broke off midway: its health check still passes.
    CUT_STREAM = "cut stream"


@attrs.define
class HealthEpoch:
    """Counts changes of any backend's health, so views derived from it know when to rebuild."""

    value: int = 0


@attrs.define
class BackendState:
    """What this daemon knows of one backend right now; starts as not yet checked."""

    _healthy: bool = attrs.field(default=False, alias="healthy")
    healthy_since: datetime | None = None
    unhealthy_since: datetime | None = None
    last_check: datetime | None = None
    last_error: str | None = None
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    active_requests: int = 0
    #: Requests in flight per model (by the model string the client sent).
    active_by_model: dict[str, int] = attrs.field(factory=dict)
    #: Out of rotation after failing a request, until a check started at or after
    #: ``suspect_until`` (reactor seconds) passes: healthy, but handed no requests meanwhile.
    _suspect: bool = attrs.field(default=False, alias="suspect")
    suspect_until: float = 0.0
    #: Failures a health check cannot see (streams cut midway, 500s another backend did not
    #: give), in a row: reset only by a response streamed to its end.
    hidden_failures: int = 0
    #: Times in a row the backend was held out for hidden failures, and when it last was: each
    #: hold is twice as long as the one before, so a box that keeps breaking streams stays out.
    holds: int = 0
    last_hold: float = 0.0
    #: Back from a hold: one request at a time (slow start) until a stream is answered whole.
    probation: bool = False
    _epoch: HealthEpoch = attrs.field(factory=HealthEpoch, alias="epoch", repr=False, eq=False)

    @property
    def healthy(self) -> bool:
        return self._healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        if value != self._healthy:
            self._healthy = value
            self._epoch.value += 1

    @property
    def suspect(self) -> bool:
        return self._suspect

    @property
    def in_rotation(self) -> bool:
        """Healthy and not suspect: new and queued requests may go here."""
        return self._healthy and not self._suspect

    def suspected(self, until: float) -> bool:
        """A request failed here: out of rotation until a check started at ``until`` or later
        passes. True when this took it out."""
        self.suspect_until = max(self.suspect_until, until)
        if self._suspect:
            return False
        self._suspect = True
        self._epoch.value += 1
        return True

    def cleared(self, check_started: float) -> bool:
        """A check started at ``check_started`` passed: True when this put it back."""
        if not self._suspect or check_started < self.suspect_until:
            return False
        self._suspect = False
        self._epoch.value += 1
        return True

    def request_failed(
        self, kind: FailureKind, now: float, threshold: int, interval: float
    ) -> float | None:
        """A request failed here: out of rotation at once for a failure a check can see, after
        ``threshold`` cut streams in a row (held out for ``interval``, doubled for each hold in
        a row, then one request at a time). When the next check is wanted, or None."""
        if kind is FailureKind.VISIBLE:
            self.suspected(now)
            return now
        if not self.in_rotation:  # requests sent before it went out are not new evidence
            return None
        self.hidden_failures += 1
        if self.hidden_failures < threshold:
            return None
        self.hidden_failures = 0
        if now - self.last_hold > 2 * MAX_HOLD:  # a quiet spell starts the doubling over
            self.holds = 0
        self.holds += 1
        self.last_hold = now
        until = now + min(MAX_HOLD, interval * 2 ** min(self.holds - 1, 32))
        self.suspected(until)
        self.probation = True
        return until

    def answered_whole(self, streamed: bool) -> None:
        """A response (``streamed``: over time) reached its end: a whole stream resets the count
        of failures a check cannot see, and ends a slow start."""
        if streamed:
            self.hidden_failures = 0
            self.probation = False

    def begin(self, model: str | None) -> None:
        self.active_requests += 1
        if model is not None:
            self.active_by_model[model] = self.active_by_model.get(model, 0) + 1

    def end(self, model: str | None) -> None:
        if self.active_requests > 0:
            self.active_requests -= 1
        if model is not None:
            left = self.active_by_model.get(model, 0) - 1
            if left > 0:
                self.active_by_model[model] = left
            else:
                self.active_by_model.pop(model, None)

    def succeeded(self, now: datetime, threshold: int) -> bool:
        """Count a successful check; True when this made the backend healthy.

        A backend never judged before is healthy on its first success, so a fresh daemon (or a
        new backend) serves within one round-trip; after a failure the threshold applies.
        """
        self.last_check = now
        self.consecutive_successes += 1
        self.consecutive_failures = 0
        never_judged = self.unhealthy_since is None
        if not self.healthy and (never_judged or self.consecutive_successes >= threshold):
            self.healthy = True
            self.healthy_since = now
            self.unhealthy_since = None
            return True
        return False

    def failed(self, now: datetime, threshold: int, error: str) -> bool:
        """Count a failed check; True when this made the backend unhealthy."""
        self.last_check = now
        self.last_error = error
        self.consecutive_failures += 1
        self.consecutive_successes = 0
        was_unknown = self.unhealthy_since is None and not self.healthy
        if was_unknown or (self.healthy and self.consecutive_failures >= threshold):
            changed = self.healthy
            self.healthy = False
            self.healthy_since = None
            self.unhealthy_since = self.unhealthy_since or now
            return changed
        return False

    def to_wire(self, now: datetime) -> dict[str, object]:
        out: dict[str, object] = {
            "Healthy": self.healthy,
            "InRotation": self.in_rotation,
            "ActiveRequests": self.active_requests,
            "ActiveRequestsByModel": dict(self.active_by_model),
            "ConsecutiveSuccesses": self.consecutive_successes,
            "ConsecutiveFailures": self.consecutive_failures,
        }
        if self.healthy_since is not None:
            out["HealthySinceUtc"] = format_utc(self.healthy_since)
            out["Uptime"] = format_timespan(now - self.healthy_since)
        if self.unhealthy_since is not None:
            out["UnhealthySinceUtc"] = format_utc(self.unhealthy_since)
            out["Downtime"] = format_timespan(now - self.unhealthy_since)
        if self.last_check is not None:
            out["LastCheckUtc"] = format_utc(self.last_check)
        if self.last_error is not None:
            out["LastError"] = self.last_error
        return out


#: How long a model is steered away from a backend that answered it 500 while others did not.
MODEL_HOLD = 30.0
#: (backend, model) pairs remembered at most (models come from clients).
_MODEL_PAIRS = 4096


@attrs.define
class ModelHolds:
    """Models a backend answered 500 for, the same requests answered by another backend: after
    ``threshold`` in a row the model is steered away from that backend for ``MODEL_HOLD``; the
    backend stays in rotation for everything else. A 500 may be the request's own doing (a
    context too large for that box), so no client can take a box out of service with them."""

    _blamed: dict[tuple[str, str], int] = attrs.field(factory=dict)
    _held: dict[tuple[str, str], float] = attrs.field(factory=dict)

    def __bool__(self) -> bool:
        return bool(self._blamed or self._held)

    def blamed(self, backend: str, model: str, now: float, threshold: int) -> bool:
        """Count a 500 of ``backend`` for ``model`` that another backend answered; True when
        this started a hold."""
        key = (backend, model)
        count = self._blamed.pop(key, 0) + 1
        if count < threshold:
            if len(self._blamed) >= _MODEL_PAIRS:
                del self._blamed[next(iter(self._blamed))]
            self._blamed[key] = count
            return False
        if len(self._held) >= _MODEL_PAIRS:
            del self._held[next(iter(self._held))]
        self._held[key] = now + MODEL_HOLD
        return True

    def answered(self, backend: str, model: str) -> None:
        """``backend`` answered a request for ``model`` well: its count starts over."""
        self._blamed.pop((backend, model), None)

    def steered(self, backend: str, now: float) -> list[str]:
        """The models steered away from ``backend`` now (for the health API)."""
        return sorted(m for (b, m), until in self._held.items() if b == backend and until > now)

    def steer(self, found: list[Backend], model: str, now: float) -> list[Backend]:
        """``found`` without the backends holding ``model`` off, unless none would be left."""
        held = self._held
        if not held:
            return found
        kept = []
        for backend in found:
            key = (backend.identifier, model)
            until = held.get(key)
            if until is not None:
                if until > now:
                    continue
                del held[key]
            kept.append(backend)
        return kept if kept and len(kept) < len(found) else found


@attrs.define
class Runtime:
    """The states of all configured backends, created on first use, dropped with the backend."""

    states: dict[str, BackendState] = attrs.field(factory=dict)
    #: Bumped whenever a backend turns healthy or unhealthy.
    epoch: HealthEpoch = attrs.field(factory=HealthEpoch)
    model_holds: ModelHolds = attrs.field(factory=ModelHolds)

    def state(self, identifier: str) -> BackendState:
        found = self.states.get(identifier)
        if found is None:
            found = self.states[identifier] = BackendState(epoch=self.epoch)
        return found

    def forget_all_but(self, identifiers: Iterable[str]) -> None:
        """Drop the state of backends no longer configured (or re-created afresh)."""
        keep = set(identifiers)
        for gone in [i for i in self.states if i not in keep]:
            del self.states[gone]
