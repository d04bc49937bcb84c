"""Preloading: a model whose requests wait in a ``ModelAware`` frontend's queue is loaded ahead
of demand onto a backend of that frontend with free VRAM (an empty generate request, as Ollama
documents), so the next requests find one more warm copy instead of waiting or evicting.

Checked twice a second while anything waits; at most ``max_concurrent`` preloads run at once
over the fleet, one per backend and model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ollamaflow.catalog import Registry
from ollamaflow.gateway.placement import Fit, Placement
from ollamaflow.records import ApiFormat, Backend, LoadBalancing
from ollamaflow.runtime import Runtime
from ollamaflow.services.common import backend_headers, backend_url, describe, drain

log = Logger()

#: Seconds between two looks at the queues.
INTERVAL = 0.5
#: Seconds a preload may take (a large model on a slow disk loads for minutes).
TIMEOUT = 600.0


class Preloader(Service):
    """Starts preloads while models' queues grow; ``on_loaded`` hears of each one done (the
    gateway hands the backend's free slots to the queue)."""

    def __init__(
        self,
        *,
        registry: Registry,
        runtime: Runtime,
        placement: Placement,
        waiting: Callable[[], Mapping[str, Mapping[str, int]]],
        clock: IReactorTime,
        http: object,
        on_loaded: Callable[[Backend, str], None],
        max_concurrent: int,
        queue_depth: int,
        keep_alive: str,
    ) -> None:
        self.registry = registry
        self.runtime = runtime
        self.placement = placement
        self.waiting = waiting
        self.clock = clock
        self.http = http
        self.on_loaded = on_loaded
        self.max_concurrent = max_concurrent
        self.queue_depth = queue_depth
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
        """Start the preloads the queues call for, within the limit."""
        try:
            for key, frontends in self.waiting().items():
                if len(self.running_preloads) >= self.max_concurrent:
                    return
                if sum(frontends.values()) >= self.queue_depth:
                    self._consider(key, frontends)
        except Exception:
            log.failure("preloading failed")

    def _consider(self, key: str, frontends: Mapping[str, int]) -> None:
        """Preload ``key`` onto the least busy backend of the frontends where it waits that
        has it on disk, free VRAM for it, and no copy loaded or loading."""
        catalog = self.registry.catalog
        inventory = self.placement.inventory
        best: tuple[int, Backend, str] | None = None
        for frontend_id in frontends:
            frontend = catalog.frontends.get(frontend_id)
            if frontend is None or frontend.load_balancing is not LoadBalancing.MODEL_AWARE:
                continue
            for backend_id in frontend.backends:
                backend = catalog.backends.get(backend_id)
                if backend is None or not backend.active or backend.api_format is ApiFormat.OPENAI:
                    continue
                state = self.runtime.states.get(backend_id)
                if state is None or not state.in_rotation:
                    continue
                entry = inventory.entries(backend_id).get(key)
                if entry is None or (backend_id, key) in self.running_preloads:
                    continue
                if self.placement.fit(backend, key)[0] is not Fit.FREE:
                    continue
                load = state.active_requests
                if best is None or load < best[0]:
                    name = str(entry.get("name") or entry.get("model") or key)
                    best = (load, backend, name)
        if best is not None:
            self._start(best[1], key, best[2])

    def _start(self, backend: Backend, key: str, name: str) -> None:
        self.placement.sent(backend, name, preload=True)
        pending = Deferred.fromCoroutine(self._preload(backend, name))
        self.running_preloads[(backend.identifier, key)] = pending

        def done(_: object) -> None:
            self.running_preloads.pop((backend.identifier, key), None)

        pending.addBoth(done)

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
