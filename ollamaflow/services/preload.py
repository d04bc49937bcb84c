"""Preloading: the copies :meth:`Placement.next_move` calls for are loaded ahead of demand with an
empty generate request, as Ollama documents, onto backends of the ``ModelAware`` frontends the
model's requests come through: into free VRAM, or in place of an idle copy of a model with less
demand. The next requests then find one more warm copy instead of waiting.

Twice a second: each model's demand is sampled and the next preload started, at most
``max_concurrent`` running at once over the fleet and one per backend (Ollama loads one model
at a time).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ollamaflow.catalog import Registry
from ollamaflow.gateway.placement import Placement, model_key
from ollamaflow.records import ApiFormat, Backend, LoadBalancing
from ollamaflow.runtime import Runtime
from ollamaflow.services.common import backend_headers, backend_url, describe, drain

log = Logger()

#: Seconds between two looks at the queues.
INTERVAL = 0.5
#: Seconds a preload may take (a large model on a slow disk loads for minutes).
TIMEOUT = 600.0


class Preloader(Service):
    """Starts the preloads placement calls for. ``on_started`` hears of each one started (the
    gateway hands the backend's free slots to the queue: its requests wait there for the load,
    as Ollama makes them), ``on_loaded`` of each one done."""

    def __init__(
        self,
        *,
        registry: Registry,
        runtime: Runtime,
        placement: Placement,
        waiting: Callable[[], Mapping[str, Mapping[str, int]]],
        clock: IReactorTime,
        http: object,
        on_started: Callable[[Backend], None],
        on_loaded: Callable[[Backend, str], None],
        max_concurrent: int,
        keep_alive: str,
    ) -> None:
        self.registry = registry
        self.runtime = runtime
        self.placement = placement
        self.waiting = waiting
        self.clock = clock
        self.http = http
        self.on_started = on_started
        self.on_loaded = on_loaded
        self.max_concurrent = max_concurrent
        self.keep_alive = keep_alive
        #: Preloads running: (backend, model key) → the request.
        self.running_preloads: dict[tuple[str, str], Deferred[None]] = {}
        self._loop = LoopingCall(self.look)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        if self.max_concurrent:
            self._loop.start(INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        for pending in list(self.running_preloads.values()):
            pending.cancel()

    def look(self) -> None:
        """Sample the demand, and start the next preload placement calls for, within the
        limits."""
        try:
            waiting = self.waiting()
            queued = {key: sum(frontends.values()) for key, frontends in waiting.items()}
            demand, where = self._demand(waiting, queued)
            self.placement.demand.sample(self.clock.seconds(), demand)
            if len(self.running_preloads) >= self.max_concurrent or not where:
                return
            candidates = {key: self._candidates(key, frontends) for key, frontends in where.items()}
            busy = {backend_id for backend_id, _ in self.running_preloads}
            move = self.placement.next_move(candidates, queued, busy)
            if move is not None:
                self._start(move.backend, move.key)
        except Exception:
            log.failure("preloading failed")

    def _demand(
        self, waiting: Mapping[str, Mapping[str, int]], queued: Mapping[str, int]
    ) -> tuple[dict[str, int], dict[str, set[str]]]:
        """Per model key: requests in flight and waiting (``queued``: those waiting, summed),
        and the ``ModelAware`` frontends they came through (where it waits, and those listing
        a backend serving it)."""
        demand = dict(queued)
        where = {key: set(frontends) for key, frontends in waiting.items()}
        serving: dict[str, list[str]] = {}
        for frontend in self.registry.catalog.frontends.values():
            if frontend.load_balancing is LoadBalancing.MODEL_AWARE:
                for backend_id in frontend.backends:
                    serving.setdefault(backend_id, []).append(frontend.identifier)
        for backend_id, state in self.runtime.states.items():
            for model, count in state.active_by_model.items():
                key = model_key(model)
                demand[key] = demand.get(key, 0) + count
                if backend_id in serving:
                    where.setdefault(key, set()).update(serving[backend_id])
        return demand, where

    def _candidates(self, key: str, frontends: Iterable[str]) -> list[Backend]:
        """The backends ``key`` may be preloaded onto: of ``frontends`` (if ``ModelAware``),
        serving Ollama's API, in rotation, with it on disk; the least busy first."""
        catalog = self.registry.catalog
        inventory = self.placement.inventory
        found: dict[str, tuple[int, Backend]] = {}
        for frontend_id in frontends:
            frontend = catalog.frontends.get(frontend_id)
            if frontend is None or frontend.load_balancing is not LoadBalancing.MODEL_AWARE:
                continue
            for backend_id in frontend.backends:
                backend = catalog.backends.get(backend_id)
                if backend is None or backend_id in found:
                    continue
                if not backend.active or backend.api_format is ApiFormat.OPENAI:
                    continue
                state = self.runtime.states.get(backend_id)
                if state is None or not state.in_rotation:
                    continue
                if key in inventory.entries(backend_id):
                    found[backend_id] = (state.active_requests, backend)
        return [backend for _, backend in sorted(found.values(), key=lambda pair: pair[0])]

    def _start(self, backend: Backend, key: str) -> None:
        entry = self.placement.inventory.entries(backend.identifier).get(key) or {}
        name = str(entry.get("name") or entry.get("model") or key)
        self.placement.sent(backend, name, preload=True)
        pending = Deferred.fromCoroutine(self._preload(backend, name))
        self.running_preloads[(backend.identifier, key)] = pending

        def done(_: object) -> None:
            self.running_preloads.pop((backend.identifier, key), None)

        pending.addBoth(done)
        self.on_started(backend)

    async def _preload(self, backend: Backend, name: str) -> None:
        body = json.dumps({"model": name, "keep_alive": self.keep_alive}).encode()
        try:
            response = await self.http.post(  # type: ignore[attr-defined]
                backend_url(backend, "/api/generate"),
                data=body,
                headers=backend_headers(backend, json_body=True),
                timeout=TIMEOUT,
            )
            await drain(response)
        except CancelledError:  # stopping
            return
        except Exception as e:
            log.info(
                "preloading {model} on {backend} failed: {error}",
                model=name,
                backend=backend.identifier,
                error=describe(e),
            )
            return
        if response.code != 200:
            log.info(
                "preloading {model} on {backend}: it answered {status}",
                model=name,
                backend=backend.identifier,
                status=response.code,
            )
            return
        self.on_loaded(backend, name)
