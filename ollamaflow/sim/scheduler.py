"""Ollama's scheduler in miniature: model loads, per-model parallel slots and keep_alive expiry.

Requests for a model that is not loaded wait for its load and count against `max_queue` (beyond it:
`ServerBusy`, a 503); requests for a loaded model wait silently, without limit, for a free slot.
"""

from __future__ import annotations

import math
import re
from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ollamaflow.sim.catalog import InstalledModel
from ollamaflow.sim.config import SimConfig
from ollamaflow.sim.counters import Counters
from ollamaflow.sim.events import Events
from ollamaflow.sim.timefmt import FOREVER_SECONDS, rfc3339

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class ServerBusy(Exception):
    """Too many requests are waiting for model loads."""


def parse_keep_alive(value: Any, default: float, *, units_required: bool = False) -> float:
    """Seconds from a `keep_alive`: a number of seconds or a Go duration like `5m`.

    Raises `ValueError` for anything else. Negative means "forever", 0 "unload when idle"; a
    duration past Go's longest (about 292 years) is forever too. `units_required`: a string
    must be a Go duration, as in a request (Ollama's `time.ParseDuration` refuses "30").
    """
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"invalid keep_alive {value!r}")
    seconds = _duration(value, units_required) if isinstance(value, str) else float(value)
    if math.isnan(seconds):
        raise ValueError(f"invalid keep_alive {value!r}")
    return -1.0 if seconds > FOREVER_SECONDS else seconds


def _duration(value: str, units_required: bool) -> float:
    """Go's `time.ParseDuration` in seconds (or, unless `units_required`, a bare number)."""
    text = value if units_required else value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return 0.0
    if not units_required:
        try:
            return float(text)
        except ValueError:
            pass
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if body and position == 0 and _NUMBER.fullmatch(body):
        raise ValueError(f'time: missing unit in duration "{value}"')
    if not body or position != len(body) or total > FOREVER_SECONDS:
        raise ValueError(f'time: invalid duration "{value}"')
    return sign * total


@attrs.define(eq=False)
class _Waiter:
    deferred: Deferred[Lease] | None
    arrived: float
    load_duration: float = 0.0


@attrs.define(eq=False)
class _Runner:
    """One model's state: loading or loaded, its slots, its waiters and its expiry."""

    model: InstalledModel
    key: str
    keep_alive: float
    loaded: bool = False
    busy: int = 0
    load_waiters: deque[_Waiter] = attrs.Factory(deque)
    slot_waiters: deque[_Waiter] = attrs.Factory(deque)
    expires_at: float | None = None
    """Set when the model goes idle and kept while it serves, as Ollama's `expiresAt`."""
    timer: IDelayedCall | None = None
    """The pending load completion or keep_alive expiry."""
    unload_reason: str = "keep_alive"
    """Why it unloads when it goes idle with keep_alive 0 (an `Events.unloaded` reason)."""

    def idle(self) -> bool:
        return self.loaded and self.busy == 0 and not self.slot_waiters


@attrs.define(eq=False)
class Lease:
    """A parallel slot on a loaded model, held while a request generates; release it once."""

    _scheduler: Scheduler
    _runner: _Runner
    load_duration: float
    """Seconds the request waited for the model to load."""
    _released: bool = False

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        if not self._released:
            self._released = True
            self._scheduler.release_runner(self._runner)


@attrs.define
class Scheduler:
    """Hands out `Lease`s per model, loading and unloading models with the reactor's time."""

    clock: IReactorTime
    config: SimConfig
    counters: Counters
    events: Events = attrs.Factory(Events)
    _runners: dict[str, _Runner] = attrs.Factory(dict)
    _pending_loads: int = 0
    _grants: deque[tuple[Deferred[Lease], Lease]] = attrs.Factory(deque)
    _granting: bool = False

    def acquire(self, model: InstalledModel, keep_alive: float) -> Deferred[Lease]:
        """A Deferred firing with a lease (at once when a slot is free); raises `ServerBusy`."""
        key = model.name.lower()
        runner = self._runners.get(key)
        if runner is None or not runner.loaded:
            if self._pending_loads >= self.config.max_queue:
                self.counters.busy_rejections += 1
                raise ServerBusy(BUSY_MESSAGE)
            if runner is None:
                runner = self._start_load(model, key, keep_alive)
        runner.keep_alive = keep_alive
        runner.unload_reason = "keep_alive"
        if runner.loaded:
            self._cancel_timer(runner)
            if runner.busy < self.config.num_parallel and not runner.slot_waiters:
                runner.busy += 1
                return succeed(Lease(self, runner, 0.0))
        waiter = _Waiter(deferred=None, arrived=self.clock.seconds())
        waiter.deferred = Deferred(lambda _d: self._cancel(runner, waiter))
        if runner.loaded:
            runner.slot_waiters.append(waiter)
        else:
            runner.load_waiters.append(waiter)
            self._pending_loads += 1
        return waiter.deferred

    def loaded(self) -> list[dict[str, Any]]:
        """The `/api/ps` entries: every loaded model and when it will expire, the longest to
        live first (Ollama's order). A model that has not yet gone idle expires its keep_alive
        from now, as Ollama estimates it."""
        now = self.clock.seconds()
        expiring = []
        for runner in self._runners.values():
            if not runner.loaded:
                continue
            expires = runner.expires_at
            if expires is None and not runner.idle() and runner.keep_alive >= 0:
                expires = now + runner.keep_alive
            if expires is None:
                expires = now + FOREVER_SECONDS
            expiring.append((runner, expires))
        expiring.sort(key=lambda pair: -int(pair[1]))
        entries = []
        for runner, expires in expiring:
            model = runner.model
            entry = model.tag_entry()
            del entry["modified_at"]
            entry["expires_at"] = rfc3339(expires)
            entry["size_vram"] = model.spec.size
            entry["context_length"] = min(4096, model.spec.context_length)
            entries.append(entry)
        return entries

    def is_loaded(self, model_name: str) -> bool:
        """Whether the model with this display name is loaded."""
        runner = self._runners.get(model_name.lower())
        return runner is not None and runner.loaded

    def unload(self, model_name: str, reason: str = "keep_alive") -> None:
        """Unload a model now, or as soon as its requests finish (Ollama's expireRunner)."""
        runner = self._runners.get(model_name.lower())
        if runner is None:
            return
        runner.keep_alive = 0.0
        runner.unload_reason = reason
        if runner.loaded:  # a loading model's timer is its load: it unloads once idle
            runner.expires_at = self.clock.seconds()
            self._cancel_timer(runner)
        if runner.idle():
            self._unload(runner, reason)

    def unload_all(self) -> None:
        """Unload every model (busy ones when they go idle)."""
        for runner in list(self._runners.values()):
            self.unload(runner.model.name, "control")

    def close(self) -> None:
        """Cancel every timer; used when the simulator stops."""
        for runner in self._runners.values():
            self._cancel_timer(runner)

    def _start_load(self, model: InstalledModel, key: str, keep_alive: float) -> _Runner:
        runner = _Runner(model=model, key=key, keep_alive=keep_alive)
        self._runners[key] = runner
        self.counters.loads += 1
        if self.config.load_time <= 0:
            runner.loaded = True
        else:
            runner.timer = self.clock.callLater(self.config.load_time, self._finish_load, runner)
        return runner

    def _finish_load(self, runner: _Runner) -> None:
        runner.timer = None
        runner.loaded = True
        now = self.clock.seconds()
        while runner.load_waiters:
            waiter = runner.load_waiters.popleft()
            self._pending_loads -= 1
            waiter.load_duration = now - waiter.arrived
            runner.slot_waiters.append(waiter)
        self._dispatch(runner)

    def _dispatch(self, runner: _Runner) -> None:
        """Give free slots to waiters in order; an idle model starts its keep_alive countdown."""
        while runner.slot_waiters and runner.busy < self.config.num_parallel:
            waiter = runner.slot_waiters.popleft()
            runner.busy += 1
            assert waiter.deferred is not None
            self._grants.append((waiter.deferred, Lease(self, runner, waiter.load_duration)))
        if runner.idle() and self._runners.get(runner.key) is runner:
            self._start_expiry(runner)
        # Fire grants in a loop rather than recursively: a granted request may finish (and
        # release) synchronously, which dispatches again.
        if self._granting:
            return
        self._granting = True
        try:
            while self._grants:
                deferred, lease = self._grants.popleft()
                if deferred.called:
                    lease.release()
                else:
                    deferred.callback(lease)
        finally:
            self._granting = False

    def release_runner(self, runner: _Runner) -> None:
        runner.busy -= 1
        self._dispatch(runner)

    def _cancel(self, runner: _Runner, waiter: _Waiter) -> None:
        if waiter in runner.load_waiters:
            runner.load_waiters.remove(waiter)
            self._pending_loads -= 1
        elif waiter in runner.slot_waiters:
            runner.slot_waiters.remove(waiter)
            if runner.idle():
                self._start_expiry(runner)

    def _start_expiry(self, runner: _Runner) -> None:
        self._cancel_timer(runner)
        keep_alive = runner.keep_alive
        if keep_alive == 0:
            self._unload(runner, runner.unload_reason)
        elif keep_alive < 0:
            runner.expires_at = None
        else:
            runner.expires_at = self.clock.seconds() + keep_alive
            runner.timer = self.clock.callLater(keep_alive, self._unload, runner, "expired")

    def _unload(self, runner: _Runner, reason: str) -> None:
        self._cancel_timer(runner)
        if self._runners.get(runner.key) is runner:
            del self._runners[runner.key]
            self.counters.unloads += 1
            self.events.unloaded.append({"model": runner.model.name, "reason": reason})

    @staticmethod
    def _cancel_timer(runner: _Runner) -> None:
        if runner.timer is not None:
            if runner.timer.active():
                runner.timer.cancel()
            runner.timer = None
