"""Which models each healthy Ollama backend has (``/api/tags``) and has loaded (``/api/ps``).

Refreshed every ``interval``, and on demand (a backend became healthy, a pull finished). The
read side is plain dictionary lookups for the hot path; no request ever waits for a refresh.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ollamaflow import modelnames
from ollamaflow.catalog import Catalog, Registry
from ollamaflow.records import ApiFormat, Backend
from ollamaflow.runtime import Runtime
from ollamaflow.services.common import (
    NETWORK_ERRORS,
    backend_headers,
    backend_url,
    describe,
    read_body,
)
from ollamaflow.utctime import utc_clock

log = Logger()

InventoryListener = Callable[[str], None]
_EMPTY: Mapping[str, dict[str, Any]] = MappingProxyType({})


class BadAnswer(Exception):
    """A backend's answer to ``/api/tags`` or ``/api/ps`` was not what Ollama sends."""


class RefreshTimeout(BadAnswer):
    """No complete answer within the timeout."""


@attrs.define
class BackendInventory:
    """One backend's models as last read; ``known`` once a refresh has succeeded."""

    base_url: str
    known: bool = False
    entries: Mapping[str, dict[str, Any]] = _EMPTY
    loaded: Mapping[str, dict[str, Any]] = _EMPTY
    last_refresh: datetime | None = None
    last_error: str | None = None


_EXPECTED = (*NETWORK_ERRORS, BadAnswer)


def index_models(answer: object) -> dict[str, dict[str, Any]]:
    """``{"models": [...]}`` as raw entries keyed by normalized name; invalid names skipped."""
    if not isinstance(answer, dict) or not isinstance(answer.get("models", 0), list | None):
        raise BadAnswer("expected a JSON object with a 'models' list")
    out: dict[str, dict[str, Any]] = {}
    for entry in answer.get("models") or ():
        if not isinstance(entry, dict):
            continue
        name = entry.get("name") or entry.get("model")
        if not isinstance(name, str):
            continue
        try:
            out[modelnames.normalize(name)] = entry
        except modelnames.InvalidModelName:
            continue
    return out


def _key(model: str) -> str | None:
    try:
        return modelnames.normalize(model)
    except modelnames.InvalidModelName:
        return None


class ModelInventory(Service):
    """The model inventories of every healthy Ollama-format backend."""

    def __init__(
        self,
        *,
        registry: Registry,
        runtime: Runtime,
        clock: IReactorTime,
        http: Any,
        interval: float,
        timeout: float = 30.0,
    ) -> None:
        self.registry = registry
        self.runtime = runtime
        self.clock = clock
        self.http = http
        self.interval = interval
        self.timeout = timeout
        self.now = utc_clock(clock.seconds)
        self._inventories: dict[str, BackendInventory] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._in_flight: dict[str, set[Deferred[None]]] = {}
        self._listeners: list[InventoryListener] = []
        self._loop = LoopingCall(self._refresh_all)
        self._loop.clock = clock

    # -- read side (hot path) ---------------------------------------------------------------

    def has(self, backend_id: str, model: str) -> bool | None:
        """Whether the backend has the model; None while its inventory is not known."""
        inventory = self._inventories.get(backend_id)
        if inventory is None or not inventory.known:
            return None
        key = _key(model)
        return key is not None and key in inventory.entries

    def is_loaded(self, backend_id: str, model: str) -> bool:
        inventory = self._inventories.get(backend_id)
        if inventory is None:
            return False
        key = _key(model)
        return key is not None and key in inventory.loaded

    def known(self, backend_id: str) -> bool:
        inventory = self._inventories.get(backend_id)
        return inventory is not None and inventory.known

    def entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]:
        """Raw ``/api/tags`` entries keyed by normalized name (empty if not known)."""
        inventory = self._inventories.get(backend_id)
        return _EMPTY if inventory is None else MappingProxyType(inventory.entries)

    def loaded_entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]:
        """Raw ``/api/ps`` entries keyed by normalized name (empty if not known)."""
        inventory = self._inventories.get(backend_id)
        return _EMPTY if inventory is None else MappingProxyType(inventory.loaded)

    def learned(self, backend_id: str, model: str) -> None:
        """The backend just answered a request for ``model``: so it has it and has it loaded.
        Shown at once (``/api/ps`` must not lag a model just loaded by a refresh interval),
        then the backend is read again for the details (size in VRAM, expiry)."""
        inventory = self._inventories.get(backend_id)
        key = _key(model)
        if inventory is None or not inventory.known or key is None or key in inventory.loaded:
            return
        entry = inventory.entries.get(key)
        if entry is None:
            name = modelnames.display(model)
            entry = {"name": name, "model": name}
        inventory.loaded = {**inventory.loaded, key: entry}
        if key not in inventory.entries:
            inventory.entries = {**inventory.entries, key: entry}
        self.refresh_now(backend_id)

    def inventory(self, backend_id: str) -> BackendInventory | None:
        """The whole record (with last refresh time and error); treat it as read-only."""
        return self._inventories.get(backend_id)

    # -- control ------------------------------------------------------------------------------

    def add_listener(self, listener: InventoryListener) -> None:
        """Call ``listener(backend_id)`` after every successful refresh of a backend."""
        self._listeners.append(listener)

    def forget(self, backend_id: str) -> None:
        """Drop a backend's inventory and cancel its refreshes."""
        self._inventories.pop(backend_id, None)
        self._locks.pop(backend_id, None)
        for pending in list(self._in_flight.pop(backend_id, ())):
            pending.cancel()

    def refresh_now(self, backend_id: str) -> Deferred[None]:
        """Refresh one backend now (after any refresh in progress); fires when done, never
        fails (errors are kept in ``last_error``). A no-op for a backend not eligible."""
        backend = self.registry.catalog.backends.get(backend_id)
        if not self.running or backend is None or not _eligible(backend):
            return succeed(None)
        return self._start_refresh(backend_id)

    def health_changed(self, backend: Backend, healthy: bool) -> None:
        """A ``HealthChecker.on_transition`` hook: refresh a backend as it becomes healthy."""
        if healthy:
            self.refresh_now(backend.identifier)

    def configuration_changed(self, catalog: Catalog) -> None:
        """Registry listener: forget backends deleted, deactivated or moved to another address."""
        for identifier in {*self._inventories, *self._in_flight}:
            backend = catalog.backends.get(identifier)
            inventory = self._inventories.get(identifier)
            if backend is None or not _eligible(backend):
                self.forget(identifier)
            elif inventory is not None and backend.base_url != inventory.base_url:
                self.forget(identifier)
                if self._healthy(identifier):
                    self.refresh_now(identifier)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        if self._loop.running:
            self._loop.stop()
        for identifier in list(self._in_flight):
            for pending in list(self._in_flight.pop(identifier, ())):
                pending.cancel()
        return super().stopService()

    # -- refreshing ---------------------------------------------------------------------------

    def _healthy(self, identifier: str) -> bool:
        state = self.runtime.states.get(identifier)
        return state is not None and state.healthy

    def _refresh_all(self) -> None:
        try:
            for backend in self.registry.catalog.backends.values():
                identifier = backend.identifier
                lock = self._locks.get(identifier)
                idle = lock is None or not lock.locked
                if idle and _eligible(backend) and self._healthy(identifier):
                    self._start_refresh(identifier)
        except Exception:
            log.failure("model inventory refresh round failed")

    def _start_refresh(self, identifier: str) -> Deferred[None]:
        lock = self._locks.get(identifier)
        if lock is None:
            lock = self._locks[identifier] = DeferredLock()
        done: Deferred[None] = lock.run(lambda: Deferred.fromCoroutine(self._refresh(identifier)))
        pending = self._in_flight.setdefault(identifier, set())
        pending.add(done)

        def finished(result: object) -> None:
            pending.discard(done)
            return None

        done.addBoth(finished)
        return done

    async def _refresh(self, identifier: str) -> None:
        backend = self.registry.catalog.backends.get(identifier)
        if backend is None or not _eligible(backend):
            return
        ps_error: str | None = None
        try:
            tags = index_models(await self._get(backend, "/api/tags"))
            try:
                loaded = index_models(await self._get(backend, "/api/ps"))
            except CancelledError:
                raise
            except Exception as e:
                loaded, ps_error = {}, f"/api/ps: {describe(e)}"
        except CancelledError:
            raise
        except Exception as e:
            error = f"/api/tags: {describe(e)}"
            if not isinstance(e, _EXPECTED):
                log.failure("reading the models of {backend}", backend=identifier)
            inventory = self._current(backend)
            if inventory is not None:
                if inventory.last_error != error:
                    log.warn(
                        "cannot read the models of {backend}: {error}",
                        backend=identifier,
                        error=error,
                    )
                inventory.last_error = error
            return
        inventory = self._current(backend)
        if inventory is None:
            return
        inventory.entries = tags
        inventory.loaded = loaded
        inventory.known = True
        inventory.last_refresh = self.now()
        inventory.last_error = ps_error
        for listener in list(self._listeners):
            try:
                listener(identifier)
            except Exception:
                log.failure("inventory listener {listener!r} failed", listener=listener)

    def _current(self, backend: Backend) -> BackendInventory | None:
        """The inventory to write a refresh of ``backend`` into, unless its record has gone or
        moved meanwhile."""
        current = self.registry.catalog.backends.get(backend.identifier)
        if current is None or not _eligible(current) or current.base_url != backend.base_url:
            return None
        inventory = self._inventories.get(backend.identifier)
        if inventory is None or inventory.base_url != current.base_url:
            inventory = self._inventories[backend.identifier] = BackendInventory(current.base_url)
        return inventory

    async def _get(self, backend: Backend, path: str) -> object:
        fetched = Deferred.fromCoroutine(self._fetch(backend, path))
        try:
            return await fetched.addTimeout(self.timeout, self.clock)
        except defer.TimeoutError:
            raise RefreshTimeout(f"no answer within {self.timeout:g}s") from None

    async def _fetch(self, backend: Backend, path: str) -> object:
        response = await self.http.request(
            "GET",
            backend_url(backend, path),
            headers=backend_headers(backend),
            unbuffered=True,
            allow_redirects=False,
        )
        body = await read_body(response)
        if not 200 <= response.code < 300:
            raise BadAnswer(f"HTTP {response.code}")
        try:
            return json.loads(body)
        except ValueError:
            raise BadAnswer("not JSON") from None


def _eligible(backend: Backend) -> bool:
    return backend.active and backend.api_format is ApiFormat.OLLAMA
