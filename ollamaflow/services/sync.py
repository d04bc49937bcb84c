"""Model synchronization: every healthy Ollama backend gets the models its frontends require.

Missing required models are pulled, at most ``max_concurrent`` at once per backend and never
twice at once; a failure is retried with exponential backoff. Nothing is ever deleted. The
same machinery serves the gateway's client-facing pulls through :meth:`ModelSync.ensure`,
which starts a pull or joins the one already running.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ollamaflow import modelnames
from ollamaflow.catalog import Catalog, Registry
from ollamaflow.records import ApiFormat, Backend
from ollamaflow.runtime import Runtime
from ollamaflow.services.common import describe
from ollamaflow.services.inventory import ModelInventory
from ollamaflow.services.pull import (
    ProgressCallback,
    PullError,
    PullFailed,
    PullProgress,
    PullStreamBroken,
    PullUnavailable,
    pull,
)
from ollamaflow.services.pullstate import BackendPulls, FailedPull, Pull, Watcher, detach, notify
from ollamaflow.utctime import format_utc

log = Logger()

#: Told when a pull ends: the backend, the model (as asked for), and whether it succeeded.
PullDoneCallback = Callable[[str, str, bool], None]


def _key(model: str) -> str | None:
    try:
        return modelnames.normalize(model)
    except modelnames.InvalidModelName:
        return None


def _display(name: str) -> str:
    try:
        return modelnames.display(name)
    except modelnames.InvalidModelName:
        return name


def _eligible(backend: Backend | None) -> bool:
    return backend is not None and backend.active and backend.api_format is ApiFormat.OLLAMA


class ModelSync(Service):
    """Pulls each backend's missing required models, and runs (joinable) pulls on request."""

    def __init__(
        self,
        *,
        registry: Registry,
        runtime: Runtime,
        inventory: ModelInventory,
        clock: IReactorTime,
        http: Any,
        max_concurrent: int,
        idle_timeout: float,
        backoff_base: float = 5.0,
        backoff_max: float = 600.0,
        on_pull_done: PullDoneCallback | None = None,
        automatic: bool = True,
    ) -> None:
        self.registry = registry
        self.runtime = runtime
        self.inventory = inventory
        self.clock = clock
        self.http = http
        self.max_concurrent = max_concurrent
        self.idle_timeout = idle_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.on_pull_done = on_pull_done
        #: False in all but one of several worker processes: one of them keeps RequiredModels
        #: in step, the others only run the pulls clients ask for.
        self.automatic = automatic
        self._backends: dict[str, BackendPulls] = {}

    # -- queries ------------------------------------------------------------------------------

    def required(self, catalog: Catalog, backend_id: str) -> set[str]:
        """The models the backend must have, in the operator's spelling (one per model)."""
        return set(self._required(catalog, backend_id).values())

    @staticmethod
    def _required(catalog: Catalog, backend_id: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for frontend in catalog.frontends.values():
            if frontend.active and backend_id in frontend.backends:
                for name in frontend.required_models:
                    key = _key(name)
                    if key is not None:
                        out.setdefault(key, name)
        return out

    def pulling(self, backend_id: str, model: str) -> PullProgress | None:
        """The progress of a pull of ``model`` queued or running on the backend, if any."""
        pulls = self._backends.get(backend_id)
        key = _key(model)
        found = pulls.pulls.get(key) if pulls is not None and key is not None else None
        return None if found is None else found.progress

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th consecutive failure."""
        return float(min(self.backoff_base * 2 ** (attempts - 1), self.backoff_max))

    def models(self, backend_id: str) -> list[dict[str, Any]]:
        """Every model on, required of, or being pulled to the backend, for the models route."""
        entries = self.inventory.entries(backend_id)
        loaded = self.inventory.loaded_entries(backend_id)
        required = self._required(self.registry.catalog, backend_id)
        pulls = self._backends.get(backend_id) or BackendPulls()
        names: dict[str, str] = {}
        for source in (entries, loaded):
            for key, entry in source.items():
                names.setdefault(key, str(entry.get("name") or entry.get("model") or key))
        for key, name in required.items():
            names.setdefault(key, _display(name))
        for key, p in pulls.pulls.items():
            names.setdefault(key, _display(p.name))
        for key, f in pulls.failures.items():
            names.setdefault(key, _display(f.name))
        out: list[dict[str, Any]] = []
        for key in sorted(names, key=lambda k: (names[k].lower(), k)):
            item: dict[str, Any] = {
                "Name": names[key],
                "Present": key in entries,
                "Loaded": key in loaded,
                "Required": key in required,
            }
            entry = entries.get(key) or loaded.get(key) or {}
            for field, wire in (("size", "Size"), ("digest", "Digest")):
                if entry.get(field) is not None:
                    item[wire] = entry[field]
            vram = (loaded.get(key) or {}).get("size_vram")
            if isinstance(vram, int) and not isinstance(vram, bool):
                item["SizeVram"] = vram
            running = pulls.pulls.get(key)
            if running is not None:
                item["Pulling"] = {**running.progress.to_wire(), "Queued": running.queued}
            failure = pulls.failures.get(key)
            if failure is not None:
                failed: dict[str, Any] = {"Error": failure.error, "Attempts": failure.attempts}
                if running is None and key in required:
                    retry = datetime.fromtimestamp(failure.next_retry, UTC)
                    failed["NextRetryUtc"] = format_utc(retry)
                item["Failed"] = failed
            out.append(item)
        return out

    # -- the joinable pull ----------------------------------------------------------------------

    def ensure(
        self, backend_id: str, model: str, *, on_progress: ProgressCallback | None = None
    ) -> Deferred[None]:
        """Pull ``model`` on the backend, or join the pull of it already queued or running.

        ``on_progress`` gets every progress message from now on (a late joiner first gets a
        summary of the layers so far). Fires None on success, after the backend's inventory
        was re-read; fails with a :class:`PullError`. Cancelling detaches this caller only:
        the pull goes on for the others. Ignores backoff: a caller asking is a retry.
        """
        key = _key(model)
        if key is None:
            return fail(PullFailed(f"invalid model name {model!r}"))
        backend = self.registry.catalog.backends.get(backend_id)
        if not self.running:
            return fail(PullUnavailable("model synchronization is not running"))
        if backend is None or not _eligible(backend):
            return fail(PullUnavailable(f"backend {backend_id} is not an active Ollama backend"))
        pulls = self._backends.setdefault(backend_id, BackendPulls())
        found = pulls.pulls.get(key)
        if found is None:
            found = pulls.pulls[key] = Pull(key, model)
        watcher = Watcher(Deferred(lambda _d: detach(found, watcher)), on_progress)
        found.watchers.append(watcher)
        if on_progress is not None and found.running is not None:
            for message in found.progress.replay():
                notify(watcher, message)
        self._pump(backend_id)
        return watcher.done

    # -- configuration and lifecycle ------------------------------------------------------------

    def configuration_changed(self, catalog: Catalog) -> None:
        """Registry listener: drop backends gone or deactivated; look for new requirements."""
        if not self.running:
            return
        for identifier in list(self._backends):
            if not _eligible(catalog.backends.get(identifier)):
                self._forget(identifier, "backend deleted or deactivated")
        for identifier in catalog.backends:
            self._reconcile(identifier)

    def startService(self) -> None:
        super().startService()
        for identifier in self.registry.catalog.backends:
            self._reconcile(identifier)

    def stopService(self) -> Deferred[None] | None:
        for identifier in list(self._backends):
            self._forget(identifier, "shutting down")
        return super().stopService()

    def _forget(self, identifier: str, reason: str) -> None:
        pulls = self._backends.pop(identifier, None)
        if pulls is None:
            return
        for key in list(pulls.failures):
            pulls.drop_failure(key)
        for p in pulls.pulls.values():
            watchers, p.watchers = p.watchers, []
            if p.running is not None:
                p.running.cancel()
            for watcher in watchers:
                if not watcher.done.called:
                    watcher.done.errback(PullUnavailable(reason))

    # -- the work -------------------------------------------------------------------------------

    def models_read(self, identifier: str) -> None:
        """An inventory listener: a backend's models were read; pull what it lacks."""
        self._reconcile(identifier)

    def _reconcile(self, identifier: str) -> None:
        """Queue the missing required models of one backend, then start what may start."""
        try:
            self._plan(identifier)
            self._pump(identifier)
        except Exception:
            log.failure("model synchronization of {backend} failed", backend=identifier)

    def _plan(self, identifier: str) -> None:
        """Queue each required model the backend lacks, unless it is pulling or waits for its
        next retry; forget what is no longer required."""
        if not self.running:
            return
        catalog = self.registry.catalog
        if not _eligible(catalog.backends.get(identifier)):
            return
        required = self._required(catalog, identifier)
        pulls = self._backends.get(identifier)
        if pulls is not None:
            pulls.keep_only(required)
        if not self._pulls_now(identifier):
            return
        present = self.inventory.entries(identifier)
        now = self.clock.seconds()
        for key, name in required.items():
            if key in present:
                if pulls is not None:
                    pulls.drop_failure(key)
                continue
            if pulls is None:
                pulls = self._backends[identifier] = BackendPulls()
            last = pulls.failures.get(key)
            if key in pulls.pulls or (last is not None and last.next_retry > now):
                continue
            pulls.pulls[key] = Pull(key, name)

    def _pulls_now(self, identifier: str) -> bool:
        """Whether missing models are pulled on the backend now: synchronization is automatic,
        the backend is healthy and its tags have been read."""
        state = self.runtime.states.get(identifier)
        healthy = state is not None and state.healthy
        return self.automatic and healthy and self.inventory.known(identifier)

    def _pump(self, identifier: str) -> None:
        """Start queued pulls, oldest first, while fewer than ``max_concurrent`` run."""
        while True:
            backend = self.registry.catalog.backends.get(identifier)
            pulls = self._backends.get(identifier)
            if backend is None or not _eligible(backend) or pulls is None:
                return
            if pulls.running() >= self.max_concurrent:
                return
            queued = next((p for p in pulls.pulls.values() if p.queued), None)
            if queued is None:
                return
            self._start(backend, queued)

    def _start(self, backend: Backend, p: Pull) -> None:
        log.info("pulling {model} on {backend}", model=p.name, backend=backend.identifier)
        p.progress.status = "starting"
        running = Deferred.fromCoroutine(
            pull(
                self.http,
                backend,
                p.name,
                on_progress=lambda message: self._progress(p, message),
                idle_timeout=self.idle_timeout,
                clock=self.clock,
            )
        )
        p.running = running
        running.addBoth(self._finished, backend.identifier, p)

    def _progress(self, p: Pull, message: dict[str, Any]) -> None:
        p.progress.update(message)
        for watcher in list(p.watchers):
            notify(watcher, message)

    def _finished(self, result: object, identifier: str, p: Pull) -> None:
        p.running = None
        pulls = self._backends.get(identifier)
        if pulls is None or pulls.pulls.get(p.key) is not p:
            return  # forgotten (backend removed, service stopped): watchers already told
        if isinstance(result, Failure):
            del pulls.pulls[p.key]
            self._failed(identifier, pulls, p, result)
        else:
            p.finishing = True
            pulls.drop_failure(p.key)
            log.info("pulled {model} on {backend}", model=p.name, backend=identifier)
            refreshed = self.inventory.refresh_now(identifier)
            refreshed.addBoth(lambda _: self._pulled(identifier, p))
        self._pump(identifier)

    def _failed(self, identifier: str, pulls: BackendPulls, p: Pull, result: Failure) -> None:
        error = result.value
        if not isinstance(error, PullError):
            if not result.check(CancelledError):
                log.failure(
                    "pull of {model} on {backend}", result, model=p.name, backend=identifier
                )
            error = PullStreamBroken(describe(result))
        self._note_failure(identifier, pulls, p.key, p.name, str(error))
        self._done(identifier, p, False)
        for watcher in p.watchers:
            if not watcher.done.called:
                watcher.done.errback(error)
        p.watchers = []

    def _note_failure(
        self, identifier: str, pulls: BackendPulls, key: str, name: str, error: str
    ) -> None:
        previous = pulls.failures.pop(key, None)
        attempts = 1 if previous is None else previous.attempts + 1
        if previous is not None:
            previous.cancel_timer()
        delay = self.backoff(attempts)
        failed = pulls.failures[key] = FailedPull(
            name, error, attempts, self.clock.seconds() + delay
        )
        failed.timer = self.clock.callLater(delay, self._retry, identifier, failed)
        log.warn(
            "pull of {model} on {backend} failed (attempt {attempts}): {error}; "
            "next try in {delay:g}s if still required",
            model=name,
            backend=identifier,
            attempts=attempts,
            error=error,
            delay=delay,
        )

    def _done(self, identifier: str, p: Pull, ok: bool) -> None:
        if self.on_pull_done is None:
            return
        try:
            self.on_pull_done(identifier, p.name, ok)
        except Exception:
            log.failure("pull listener failed for {backend}", backend=identifier)

    def _retry(self, identifier: str, failed: FailedPull) -> None:
        failed.timer = None
        self._reconcile(identifier)

    def _pulled(self, identifier: str, p: Pull) -> None:
        """After the re-read of tags that follows a successful pull: release the watchers."""
        pulls = self._backends.get(identifier)
        if pulls is None or pulls.pulls.get(p.key) is not p:
            return
        del pulls.pulls[p.key]
        record = self.inventory.inventory(identifier)
        if (
            record is not None
            and record.known
            and not (record.last_error or "").startswith("/api/tags")
            and p.key not in record.entries
        ):
            # Believe /api/tags over the stream, but do not pull again in a tight loop.
            error = "the pull reported success but /api/tags does not list the model"
            self._note_failure(identifier, pulls, p.key, p.name, error)
            self._done(identifier, p, False)
        else:
            self._done(identifier, p, True)
        watchers, p.watchers = p.watchers, []
        for watcher in watchers:
            if not watcher.done.called:
                watcher.done.callback(None)
        self._reconcile(identifier)
