"""Active and passive health checks: one loop per active backend, judged by its thresholds.

A backend is checked at start-up and as soon as it is created or changed, then every
``interval``; a deleted or deactivated backend's loop stops at once (its in-flight check is
cancelled and never written). A check never takes longer than the interval, so one stuck on a
hung connection does not put off the next.

Failures seen by the proxy count as failed checks, and take the backend out of rotation at once
until a check passes: a refused, reset or timed-out request, or a gateway error, calls for that
check right away. Failures a check cannot see (a stream cut midway, a 500 another backend did
not give) hold it out longer, twice as long each time they recur, so a box that keeps breaking
streams does not flap back in between them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ollamaflow.catalog import Catalog, Registry
from ollamaflow.records import Backend
from ollamaflow.runtime import FailureKind, Runtime
from ollamaflow.services.common import (
    NETWORK_ERRORS,
    backend_headers,
    backend_url,
    describe,
    drain,
)
from ollamaflow.utctime import utc_clock

log = Logger()

TransitionCallback = Callable[[Backend, bool], None]
#: Told when a backend that was out of rotation after a failed request is back in it.
AvailableCallback = Callable[[Backend], None]
#: Told after each active check: the backend, whether it passed, and its latency in seconds.
CheckCallback = Callable[[Backend, bool, float], None]


@attrs.define(eq=False)
class _Loop:
    """The check loop of one backend, for one version of its record."""

    backend: Backend
    timer: IDelayedCall | None = None
    running: Deferred[None] | None = None
    stopped: bool = False
    #: When the next check is wanted sooner than the interval (a request just failed there).
    due: float | None = None

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.running is not None:
            self.running.cancel()


class HealthChecker(Service):
    """Checks every active backend every ``interval`` seconds (``timeout`` seconds each)."""

    def __init__(
        self,
        *,
        registry: Registry,
        runtime: Runtime,
        clock: IReactorTime,
        http: Any,
        interval: float,
        timeout: float,
        on_transition: TransitionCallback | None = None,
        on_check: CheckCallback | None = None,
        on_available: AvailableCallback | None = None,
    ) -> None:
        self.registry = registry
        self.runtime = runtime
        self.clock = clock
        self.http = http
        self.interval = interval
        self.timeout = timeout
        self.on_transition = on_transition
        self.on_check = on_check
        self.on_available = on_available
        self.now = utc_clock(clock.seconds)
        self._loops: dict[str, _Loop] = {}

    def startService(self) -> None:
        super().startService()
        self.configuration_changed(self.registry.catalog)

    def stopService(self) -> Deferred[None] | None:
        loops, self._loops = self._loops, {}
        for loop in loops.values():
            loop.stop()
        return super().stopService()

    def configuration_changed(self, catalog: Catalog) -> None:
        """Registry listener: start loops for new or changed backends, stop removed ones."""
        if not self.running:
            return
        for identifier, loop in list(self._loops.items()):
            backend = catalog.backends.get(identifier)
            if backend is None or not backend.active or backend != loop.backend:
                del self._loops[identifier]
                loop.stop()
        for backend in catalog.backends.values():
            if backend.active and backend.identifier not in self._loops:
                loop = self._loops[backend.identifier] = _Loop(backend)
                self._run(loop)

    def checking(self) -> frozenset[str]:
        """The identifiers of the backends being checked."""
        return frozenset(self._loops)

    def report_failure(
        self, backend: Backend, reason: str, kind: FailureKind = FailureKind.VISIBLE
    ) -> None:
        """Passive health: a request failed on ``backend``. It counts as a failed check and
        takes the backend out of rotation until a check passes: at once for a failure a check
        can see too, after a hold for those it cannot."""
        try:
            self._failed_request(backend.identifier, reason, kind)
        except Exception:
            log.failure("recording a failure of backend {backend}", backend=backend.identifier)

    def _failed_request(self, identifier: str, reason: str, kind: FailureKind) -> None:
        backend = self.registry.catalog.backends.get(identifier)
        if backend is None or not backend.active:
            return
        state = self.runtime.state(identifier)
        now = self.clock.seconds()
        was_in = state.in_rotation
        due = state.request_failed(kind, now, backend.unhealthy_threshold, self.interval)
        if due is not None:
            if kind is not FailureKind.VISIBLE:
                log.warn(
                    "backend {backend} held out of rotation for {hold:g}s: {count} failures "
                    "in a row that a health check cannot see ({error})",
                    backend=identifier,
                    hold=due - now,
                    count=backend.unhealthy_threshold,
                    error=reason,
                )
            elif was_in:
                log.info(
                    "backend {backend} out of rotation until a check passes: {error}",
                    backend=identifier,
                    error=reason,
                )
            self._check_at(identifier, due)
        self._record(identifier, reason)

    def _check_at(self, identifier: str, when: float) -> None:
        """Run the backend's next check no later than ``when``."""
        loop = self._loops.get(identifier)
        if loop is None or loop.stopped:
            return
        if loop.running is not None:
            loop.due = when if loop.due is None else min(loop.due, when)
            return
        timer = loop.timer
        if timer is not None and timer.active() and timer.getTime() > when:
            timer.reset(max(0.0, when - self.clock.seconds()))

    # -- the loop ---------------------------------------------------------------------------

    def _run(self, loop: _Loop) -> None:
        loop.timer = None
        started = self.clock.seconds()
        checked = Deferred.fromCoroutine(self._check(loop))
        loop.running = checked
        checked.addBoth(self._checked, loop, started)

    def _checked(self, result: object, loop: _Loop, started: float) -> None:
        loop.running = None
        if isinstance(result, Failure) and not result.check(CancelledError):
            log.failure("health check loop of {backend}", result, backend=loop.backend.identifier)
        if not loop.stopped:
            due = started + self.interval
            if loop.due is not None:
                due, loop.due = min(due, loop.due), None
            delay = max(0.0, due - self.clock.seconds())
            loop.timer = self.clock.callLater(delay, self._run, loop)

    async def _check(self, loop: _Loop) -> None:
        backend = loop.backend
        started = self.clock.seconds()
        error: str | None
        timeout = min(self.timeout, self.interval)
        try:
            probe = Deferred.fromCoroutine(self._probe(backend))
            error = await probe.addTimeout(timeout, self.clock)
        except CancelledError:
            return
        except (defer.TimeoutError, ConnectingCancelledError):
            error = f"no answer within {timeout:g}s"
        except NETWORK_ERRORS as e:
            error = describe(e)
        except Exception as e:
            log.failure("health check of {backend} raised", backend=backend.identifier)
            error = describe(e)
        if loop.stopped:
            return
        if self.on_check is not None:
            try:
                self.on_check(backend, error is None, self.clock.seconds() - started)
            except Exception:
                log.failure(
                    "health check listener failed for {backend}", backend=backend.identifier
                )
        self._record(backend.identifier, error, started)

    async def _probe(self, backend: Backend) -> str | None:
        """One request; None if it answered 2xx, else the reason. The body is always read."""
        response = await self.http.request(
            backend.health_check_method.value,
            backend_url(backend, backend.health_check_url),
            headers=backend_headers(backend),
            unbuffered=True,
            allow_redirects=False,
        )
        await drain(response)
        code: int = response.code
        return None if 200 <= code < 300 else f"HTTP {code}"

    def _record(self, identifier: str, error: str | None, started: float | None = None) -> None:
        """Count one check result against the backend's current record, if it still exists;
        a check (started at ``started``) that passed may put a suspect backend back."""
        backend = self.registry.catalog.backends.get(identifier)
        if backend is None or not backend.active:
            return
        state = self.runtime.state(identifier)
        first = state.healthy_since is None and state.unhealthy_since is None
        now = self.now()
        if error is None:
            changed = state.succeeded(now, backend.healthy_threshold)
            if started is not None and state.cleared(started) and state.healthy and not changed:
                log.info("backend {backend} is back in rotation", backend=identifier)
                if self.on_available is not None:
                    try:
                        self.on_available(backend)
                    except Exception:
                        log.failure(
                            "availability listener failed for {backend}", backend=identifier
                        )
        else:
            changed = state.failed(now, backend.unhealthy_threshold, error)
            if first and not changed:
                log.warn("backend {backend} is unhealthy: {error}", backend=identifier, error=error)
        if not changed:
            return
        if state.healthy:
            log.info("backend {backend} is healthy", backend=identifier)
        else:
            log.warn("backend {backend} became unhealthy: {error}", backend=identifier, error=error)
        if self.on_transition is not None:
            try:
                self.on_transition(backend, state.healthy)
            except Exception:
                log.failure("health transition listener failed for {backend}", backend=identifier)
