"""The streaming reverse proxy: one client request, relayed to a backend over a pooled connection.

The response is relayed as it arrives: every read from the backend is one write to the client,
and the backend connection is the client request's producer, so a slow reader pauses the
backend instead of growing a buffer. The hot path runs on plain Deferred callbacks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast
from urllib.parse import unquote

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    FileBodyProducer,
    PotentialDataLoss,
    ResponseDone,
)
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.server import NOT_DONE_YET

from ollamaflow import jsonlimits, modelnames
from ollamaflow.catalog import Catalog, Registry
from ollamaflow.credentials import NO_TOKENS, Tokens
from ollamaflow.gateway import fanout, fleet
from ollamaflow.gateway import headers as hdrs
from ollamaflow.gateway.backendhttp import Attempt, BackendClient
from ollamaflow.gateway.balancer import (
    Balancer,
    NoCandidate,
    StickyPins,
    candidates,
    stick,
)
from ollamaflow.gateway.classify import (
    MODEL_TRANSFER_PATHS,
    RequestClass,
    allowed_methods,
    classify,
    manages_models,
)
from ollamaflow.gateway.completed import (
    LOGGED_BODY_BYTES,
    TAIL_BYTES,
    Completed,
    RequestIds,
    logged_text,
    usage,
)
from ollamaflow.gateway.deadlines import Deadline, Deadlines
from ollamaflow.gateway.dialect import quoted, refuse
from ollamaflow.gateway.modelops import ModelOperations, unloads
from ollamaflow.gateway.pinning import deep_merge
from ollamaflow.gateway.requestdoc import ModelNameTooLong, body_size, json_object, model_of
from ollamaflow.gateway.requesthead import logged_head
from ollamaflow.gateway.scheduler import QueueRefused, QueueStats, Scheduler
from ollamaflow.records import Backend, Frontend
from ollamaflow.runtime import MODEL_HOLD, FailureKind, Runtime
from ollamaflow.server.request import ClientRequest

log = Logger()

CONNECT_TIMEOUT = 5.0
#: At most this many remembered candidate lists (labels come from clients: keep it bounded).
_REMEMBERED = 1024
#: Client strings longer than these are never remembered: no label or Host of ours is longer.
_REMEMBERED_LABEL = 256
_REMEMBERED_HOST = 300
#: Pulls and pushes may sit silent for minutes while a registry answers or layers are hashed.
MODEL_TRANSFER_IDLE = 1800.0
#: Bodies up to this size are replayed from memory on a retry; larger ones from the spool file.
_IN_MEMORY_BODY = 1 << 20
#: Answers that say the backend, not the request, failed (as Envoy's gateway errors): retried
#: on another backend while nothing reached the client, and counted against its health.
_GATEWAY_ERRORS = frozenset({502, 503, 504})
#: A 500 may be the request's own fault: it is retried once elsewhere, and counts against the
#: backend only when the other backend answered it (see ``_Exchange._take``).
_SERVER_ERROR = 500


class _Discard(Protocol):
    """Drops a response body we will not relay: read to the end (a 502/503 we retry past,
    so the connection can be reused) or closed at once (nobody is left to read it)."""

    def __init__(self, close: bool = False) -> None:
        self.close = close

    def connectionMade(self) -> None:
        if self.close:
            _producer(self).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass


class Gateway:
    """The resource for everything outside ``/v1.0/``: route, forward, relay, retry."""

    def __init__(
        self,
        *,
        registry: Registry,
        runtime: Runtime,
        reactor: Any,
        http: HTTPClient,
        sticky_headers: tuple[str, ...] = (),
        balancer: Balancer | None = None,
        inventory: fleet.Inventory | None = None,
        sync: fanout.Puller | None = None,
        on_failure: Callable[[Backend, str, FailureKind], None] | None = None,
        on_models_changed: Callable[[str], Deferred[None]] | None = None,
        admin_tokens: Tokens = NO_TOKENS,
        withheld: Tokens = NO_TOKENS,
    ) -> None:
        """``admin_tokens`` may manage models where a frontend does not let clients;
        ``withheld``: tokens of ours that must never reach a backend (admin, metrics)."""
        self.registry = registry
        self.runtime = runtime
        self.clock: IReactorTime = reactor
        self.backends = BackendClient(reactor, CONNECT_TIMEOUT)
        #: For the fan-out requests (delete on every backend), off the hot path.
        self.http = http
        self.balancer = balancer or Balancer()
        self._frontends: tuple[Catalog | None, dict[bytes | None, Frontend | None]] = (None, {})
        self.new_id = RequestIds()
        self.pins = StickyPins()
        self._remembered: dict[
            tuple[str, RequestClass, str | None],
            tuple[Catalog, int, list[Backend] | NoCandidate],
        ] = {}
        self.scheduler = Scheduler(reactor, runtime)
        #: Each attempt's wait for its response head (the frontend's TimeoutMs).
        self.deadlines = Deadlines(reactor)
        self.inventory = inventory
        self._inventory_version = 0
        self._remembered_models: dict[
            tuple[int, str], tuple[list[Backend], int, list[Backend], frozenset[str]]
        ] = {}
        if inventory is not None:
            inventory.add_listener(self._inventory_changed)
        #: Pull, delete, copy, create, blobs and unloading across a frontend's backends.
        self.model_ops = ModelOperations(
            registry, http, self, reactor, withheld, sync=sync, refresh=on_models_changed
        )
        #: Requests being proxied right now (for draining, metrics and tests).
        self.exchanges: set[_Exchange] = set()
        self.sticky_headers = tuple(h.lower().encode() for h in sticky_headers)
        #: Called with (backend, reason, kind) when proxying sees a backend fail (passive
        #: health).
        self.on_failure = on_failure
        #: Told about every finished request (the access log, the metrics).
        self.observers: list[Callable[[Completed], None]] = []
        #: Set while the daemon shuts down: requests in flight finish, new ones are refused.
        self.draining = False
        self.admin_tokens = admin_tokens
        self.withheld = withheld
        registry.subscribe(self._configuration_changed)

    def _configuration_changed(self, catalog: Catalog) -> None:
        self.backends.forget({(b.hostname, b.port, b.ssl) for b in catalog.backends.values()})
        self.pins.prune(catalog)
        self.balancer.forget(catalog)
        self.scheduler.forget(lambda f: f in catalog.frontends)
        for backend in catalog.backends.values():
            self.scheduler.wake(backend)

    def backend_available(self, backend: Backend, healthy: bool) -> None:
        """A backend became healthy: requests queued for a slot may use it now."""
        if healthy:
            self.scheduler.wake(backend)

    async def close(self) -> None:
        await self.backends.close()

    def body_limit(self, host: bytes | None) -> int:
        """The request body limit for a Host: its frontend's MaxRequestBodySize."""
        frontend = self._frontend_for(host)
        return frontend.max_request_body_size if frontend else 1 << 20

    def _frontend_for(self, host: bytes | None) -> Frontend | None:
        """The frontend serving a Host, remembered per Host until the configuration changes
        (each request asks twice: for its body limit, then to be routed)."""
        catalog = self.registry.catalog
        if self._frontends[0] is not catalog:
            self._frontends = (catalog, {})
        known = self._frontends[1]
        try:
            return known[host]
        except KeyError:
            pass
        frontend = catalog.frontend_for_host(host.decode("latin-1") if host else "")
        if len(known) < _REMEMBERED and (host is None or len(host) <= _REMEMBERED_HOST):
            known[host] = frontend
        return frontend

    def render(self, request: ClientRequest) -> bytes | int:
        if self.draining:
            request.persistent = False
            return self.refuse(request, None, 503, "OllamaFlow is shutting down", retry_after=1)
        catalog = self.registry.catalog
        host = request.getHeader(b"host")
        frontend = self._frontend_for(host)
        if frontend is None:
            name = host.decode("latin-1") if host else ""
            return self.refuse(request, None, 404, f"no frontend for host {quoted(name)}")
        # HTTP/1.0 is served whatever BlockHttp10 says: 1.2 stores it (true) but never enforces it.
        path = request.path
        allowed = allowed_methods(path)
        if allowed is not None and request.method not in allowed:
            request.setHeader(b"Allow", b", ".join(allowed))
            return self.refuse(request, frontend, 405, "405 method not allowed")
        if (
            not frontend.allow_model_management
            and manages_models(request.method, path)
            and not self.admin_tokens.match(request.getHeader(b"authorization"))
        ):
            return self.refuse(
                request,
                frontend,
                403,
                f"frontend {frontend.identifier!r} does not allow model management (pull, "
                "delete, copy, create, push, blob uploads) without an admin token",
            )
        request_class = classify(path)
        if (request_class is RequestClass.EMBEDDINGS and not frontend.allow_embeddings) or (
            request_class is RequestClass.COMPLETIONS and not frontend.allow_completions
        ):
            return self.refuse(
                request,
                frontend,
                403,
                f"frontend {frontend.identifier!r} does not allow {request_class.value} requests",
            )
        document: dict[str, Any] | None = None
        if request_class is not RequestClass.OTHER:
            try:
                document = json_object(request.content)
            except ValueError as e:
                return self.refuse(request, frontend, 400, str(e))
            pins = _frontend_pins(frontend, request_class)
            if pins:
                # Before routing: a pinned "model" is the model the request is routed by.
                document = deep_merge(document, pins)
        elif path in _NAMES_A_MODEL and request.method == b"POST":
            try:
                document = json_object(request.content)
            except jsonlimits.TooDeep as e:
                return self.refuse(request, frontend, 400, str(e))
            except ValueError:
                document = None  # the backend will say what is wrong with it
        try:
            model = model_of(document, path) if document is not None else None
        except ModelNameTooLong as e:
            return self.refuse(request, frontend, 400, str(e))
        label = request.getHeader(b"x-ollamaflow-label")
        found = self._candidates(
            catalog, frontend, request_class, label.decode("latin-1") if label else None
        )
        if isinstance(found, NoCandidate):
            return self.refuse(request, frontend, 503, found.message, retry_after=1, model=model)
        operation = self.model_ops.route(request.method, path)
        if operation is not None:
            return operation(request, frontend, found)
        inventory = self.inventory
        warm: frozenset[str] = frozenset()
        if inventory is not None:
            answered = self._fleet(request, frontend, inventory, found)
            if answered is not None:
                return answered
            if (
                model is not None
                and document is not None
                and request_class is RequestClass.COMPLETIONS
                and unloads(document, path)
            ):
                loaded = [b for b in found if inventory.is_loaded(b.identifier, model)]
                if loaded:
                    return self.model_ops.unload(request, frontend, loaded, document, model)
            if model is not None:
                found, warm = self._with_model(inventory, found, model)
                if not found:
                    return self.refuse(
                        request, frontend, 404, f"model {quoted(model)} not found", model=model
                    )
        model_key = _model_key(model)
        holds = self.runtime.model_holds
        if holds and model_key is not None:
            found = holds.steer(found, model_key, self.clock.seconds())
        client = self._client_id(request) if frontend.use_sticky_sessions else None
        pinned = None
        if client is not None:
            pinned = self.pins.lookup(frontend.identifier, client, self.clock.seconds())
        scheduler = self.scheduler
        if pinned is not None and any(b.identifier == pinned for b in found):
            ordered = stick(found, pinned)
        else:
            load = self.in_flight if model_key is None else partial(self._model_load, model_key)
            ordered = self.balancer.order(frontend, found, load)
            if warm and len(warm) < len(ordered):  # all warm (or all cold): nothing to move
                ordered = warm_first(ordered, warm)
        first: Backend | None = ordered[0]
        if not scheduler.has_slot(ordered[0], model_key):
            first = _first_free(scheduler, ordered, model_key) if len(ordered) > 1 else None
        exchange = _Exchange(
            self,
            request,
            frontend,
            document,
            client,
            model,
            model_key,
            request_class,
            label.decode("latin-1") if label else None,
        )
        if first is not None:
            exchange.start(first)
            return NOT_DONE_YET
        try:
            waiting = scheduler.wait(frontend, ordered, exchange.may_use, exchange.model)
        except QueueRefused as e:
            return self.refuse(
                request, frontend, 429, str(e), retry_after=e.retry_after, model=model
            )
        exchange.queue(waiting)
        return NOT_DONE_YET

    def refuse(
        self,
        request: ClientRequest,
        frontend: Frontend | None,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        model: str | None = None,
    ) -> bytes:
        """Answer a request the gateway will not forward; logged and reported like any other
        (``model``: the one it names, once known)."""
        request_id = self.new_id()
        request.setHeader(b"X-OllamaFlow-Request", request_id.encode())
        body = refuse(request, status, message, retry_after=retry_after)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        (log.warn if status >= 500 else log.info)(
            "request {rid}: {status} {message}", rid=request_id, status=status, message=message
        )
        if self.observers:
            self.report(
                Completed(
                    request_id=request_id,
                    client=request.client_host,
                    frontend=frontend.identifier if frontend else "",
                    backend=None,
                    method=request.method.decode("latin-1"),
                    path=request.path.decode("latin-1"),
                    model=_model_key(model),
                    status=status,
                    outcome="refused",
                    bytes=len(body),
                    queued=0.0,
                    ttfb=None,
                    duration=0.0,
                    retries=0,
                    request_head=logged_head(
                        request, frontend, (), self.withheld, self.registry.catalog.backends
                    ),
                )
            )
        return body

    def answering(
        self,
        request: ClientRequest,
        frontend: Frontend,
        model: str | None,
        backends: Sequence[Backend],
        size: int = 0,
    ) -> str:
        """A request the gateway answers for the whole frontend (the catalog, a fan-out over
        ``backends``): its id, and its one report when it ends (``size``: its body, if known)."""
        request_id = self.new_id()
        request.setHeader(b"X-OllamaFlow-Request", request_id.encode())
        if not self.observers:
            return request_id
        started = self.clock.seconds()

        def ended(outcome: str) -> None:
            self.report(
                Completed(
                    request_id=request_id,
                    client=request.client_host,
                    frontend=frontend.identifier,
                    backend=None,
                    method=request.method.decode("latin-1"),
                    path=request.path.decode("latin-1"),
                    model=_model_key(model),
                    status=request.code,
                    outcome=outcome,
                    bytes=size,
                    queued=0.0,
                    ttfb=None,
                    duration=self.clock.seconds() - started,
                    retries=0,
                    backends=tuple(b.identifier for b in backends),
                    request_head=logged_head(
                        request,
                        frontend,
                        (b.identifier for b in backends),
                        self.withheld,
                        self.registry.catalog.backends,
                    ),
                )
            )

        request.watch(partial(ended, "ok"), lambda _: ended("client_gone"))
        return request_id

    def report(self, completed: Completed) -> None:
        for observer in self.observers:
            try:
                observer(completed)
            except Exception:
                log.failure("request observer {observer!r} failed", observer=observer)

    def queue_report(self) -> list[dict[str, object]]:
        """Each frontend's queue: depth now, peak, waits and refusals (for the admin API)."""
        scheduler = self.scheduler
        out = []
        for identifier in self.registry.catalog.frontends:
            stats = scheduler.stats.get(identifier) or QueueStats()
            out.append({"Identifier": identifier, **stats.to_wire(scheduler.depth(identifier))})
        return out

    def _candidates(
        self,
        catalog: Catalog,
        frontend: Frontend,
        request_class: RequestClass,
        label: str | None,
    ) -> list[Backend] | NoCandidate:
        """The candidates, remembered until the configuration or some backend's health changes
        (so a frontend of a hundred backends is not walked on every request). Never mutate."""
        key = (frontend.identifier, request_class, label)
        epoch = self.runtime.epoch.value
        remembered = self._remembered.get(key)
        if remembered is not None and remembered[0] is catalog and remembered[1] == epoch:
            return remembered[2]
        found = candidates(catalog, self.runtime, frontend, request_class, label)
        if label is not None and len(label) > _REMEMBERED_LABEL:
            return found
        if len(self._remembered) >= _REMEMBERED:
            self._remembered.clear()
        self._remembered[key] = (catalog, epoch, found)
        return found

    def _with_model(
        self, inventory: fleet.Inventory, found: list[Backend], model: str
    ) -> tuple[list[Backend], frozenset[str]]:
        """The candidates that have the model (or whose inventory is not read yet), and which
        of them have it loaded; remembered until the candidates or any inventory change."""
        key = (id(found), model)
        remembered = self._remembered_models.get(key)
        if (
            remembered is not None
            and remembered[0] is found
            and remembered[1] == self._inventory_version
        ):
            return remembered[2], remembered[3]
        having = [b for b in found if inventory.has(b.identifier, model) is not False]
        warm = frozenset(b.identifier for b in having if inventory.is_loaded(b.identifier, model))
        if len(self._remembered_models) >= _REMEMBERED:
            self._remembered_models.clear()
        self._remembered_models[key] = (found, self._inventory_version, having, warm)
        return having, warm

    def candidates_now(
        self,
        frontend: Frontend,
        request_class: RequestClass,
        label: str | None,
        model: str | None,
        model_key: str | None,
    ) -> Sequence[Backend]:
        """A request's candidates as they are now: health, configuration, inventories and
        models steered away change while it waits for a slot or after an attempt failed.
        Never mutate."""
        catalog = self.registry.catalog
        current = catalog.frontends.get(frontend.identifier)
        if current is None:
            return ()
        found = self._candidates(catalog, current, request_class, label)
        if isinstance(found, NoCandidate):
            return ()
        if self.inventory is not None and model is not None:
            found, _ = self._with_model(self.inventory, found, model)
        holds = self.runtime.model_holds
        if holds and model_key is not None:
            found = holds.steer(found, model_key, self.clock.seconds())
        return found

    def _inventory_changed(self, backend_id: str) -> None:
        self._inventory_version += 1

    def in_flight(self, backend_id: str) -> int:
        state = self.runtime.states.get(backend_id)
        return state.active_requests if state is not None else 0

    def _model_load(self, model: str, backend_id: str) -> int:
        """Requests in flight for this model first (Ollama gives each model its own slots),
        then in all."""
        state = self.runtime.states.get(backend_id)
        if state is None:
            return 0
        return state.active_by_model.get(model, 0) * 1_000_000 + state.active_requests

    def _fleet(
        self,
        request: ClientRequest,
        frontend: Frontend,
        inventory: fleet.Inventory,
        found: list[Backend],
    ) -> bytes | None:
        """Answer the model catalog routes from the inventory of the frontend's backends."""
        method, path = request.method, request.path
        if method not in (b"GET", b"HEAD") or not (
            path in _CATALOG_ROUTES or path.startswith(b"/v1/models/")
        ):
            return None
        readable = [b for b in found if inventory.known(b.identifier)]
        if not readable:
            return None  # nothing read yet: let a backend answer
        if path in _CATALOG_ROUTES:
            catalog = _CATALOG_ROUTES[path](inventory, readable)
            self.answering(request, frontend, None, readable, len(catalog))
            return _json_answer(request, catalog)
        name = unquote(path[len(b"/v1/models/") :].decode("utf-8", "replace"))
        if len(name) > modelnames.MAX_LENGTH:
            return self.refuse(request, frontend, 400, "the model name is too long")
        body = fleet.openai_model(inventory, readable, name)
        if body is None:
            return self.refuse(request, frontend, 404, f"model {quoted(name)} not found")
        self.answering(request, frontend, name, readable, len(body))
        return _json_answer(request, body)

    def _client_id(self, request: ClientRequest) -> bytes:
        for name in self.sticky_headers:
            value = request.getHeader(name)
            if value:
                return value
        return request.client_host.encode()


#: The model catalog, answered for the whole frontend from the inventory.
_CATALOG_ROUTES = {
    b"/api/tags": fleet.tags,
    b"/api/ps": fleet.ps,
    b"/v1/models": fleet.openai_models,
}

#: Non-completion requests that name a model which must exist on the chosen backend.
_NAMES_A_MODEL = frozenset({b"/api/show", b"/api/copy", b"/api/push"})


def _frontend_pins(frontend: Frontend, request_class: RequestClass) -> Mapping[str, Any]:
    """The properties a frontend pins on requests of ``request_class`` (empty for others)."""
    if request_class is RequestClass.EMBEDDINGS:
        return frontend.pinned_embeddings_properties
    if request_class is RequestClass.COMPLETIONS:
        return frontend.pinned_completions_properties
    return {}


def _model_key(model: str | None) -> str | None:
    """How in-flight requests per model are counted: the name as Ollama displays it."""
    return modelnames.display(model) if model is not None else None


def _first_free(
    scheduler: Scheduler, ordered: Sequence[Backend], model: str | None
) -> Backend | None:
    """The first candidate with a free slot (the balancer's choice had none), if any."""
    for backend in ordered:
        if scheduler.has_slot(backend, model):
            return backend
    return None


def warm_first(ordered: Sequence[Backend], loaded: frozenset[str]) -> Sequence[Backend]:
    """Backends with the model already loaded first (no cold load), order otherwise kept."""
    warm: list[Backend] = []
    cold: list[Backend] = []
    for backend in ordered:
        (warm if backend.identifier in loaded else cold).append(backend)
    return [*warm, *cold] if warm and cold else ordered


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """An entry into an exchange from outside it (the scheduler, the backend client, the
    relay, a timer): a bug there ends the request (500, or a cut-off response) and frees its
    slot, never leaves it hanging with the slot held."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception:
            exchange = self if isinstance(self, _Exchange) else self.exchange
            exchange.crashed(Failure())

    return guarded


def _json_answer(request: ClientRequest, body: bytes) -> bytes:
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


class _Exchange:
    """One client request's trip through one or more backends.

    It owns the backend slot its request holds (``_active``) from the moment the slot is taken
    to :meth:`end_attempt`; whatever way the request ends (finished, the client gone, a bug in
    any callback, see :func:`_guarded`), the slot is given back.
    """

    __slots__ = (
        "_active",
        "_attempt",
        "_blamed",
        "_reported",
        "_timed_out",
        "_ttfb",
        "answering",
        "captured",
        "client",
        "document",
        "first_byte",
        "frontend",
        "gateway",
        "keep_tail",
        "label",
        "last_error",
        "logged_body",
        "model",
        "model_name",
        "outcome",
        "relay",
        "relayed",
        "request",
        "request_class",
        "request_id",
        "started",
        "status",
        "tail",
        "tried",
        "waited",
    )

    def __init__(
        self,
        gateway: Gateway,
        request: ClientRequest,
        frontend: Frontend,
        document: dict[str, Any] | None,
        client: bytes | None,
        model_name: str | None,
        model: str | None,
        request_class: RequestClass,
        label: str | None,
    ) -> None:
        self.gateway = gateway
        #: The model as the client named it (what inventories are asked), and as slots count it.
        self.model_name = model_name
        self.model = model
        self.request_class = request_class
        self.label = label
        self.request = request
        self.frontend = frontend
        self.document = document
        self.client = client
        self.request_id = gateway.new_id()
        #: False once nobody is to be answered the usual way: the client left, or a bug ended it.
        self.answering = True
        self.relay: _Relay | None = None
        self.relayed = 0
        self.last_error = ""
        self.tried: list[str] = []
        #: The attempt in flight, or the wait for a slot; cancelled if the client leaves.
        self._attempt: Attempt | Deferred[Backend] | None = None
        self._ttfb: Deadline | None = None
        self._active: Backend | None = None
        #: A backend that answered 500 before another was tried: to blame if another answers.
        self._blamed: Backend | None = None
        self._timed_out = False  # the latest attempt ran out of time (504, not 502)
        self._reported = False
        self.started = gateway.clock.seconds()
        self.waited = 0.0
        self.first_byte: float | None = None
        self.status = 0
        self.outcome = "ok"
        self.keep_tail = bool(gateway.observers) and request_class is not RequestClass.OTHER
        self.tail = b""
        self.captured: bytearray | None = None
        self.logged_body: str | None = None

    @_guarded
    def start(self, backend: Backend) -> None:
        """The first attempt, on ``backend``, which has a free slot."""
        self._watch()
        self.gateway.scheduler.acquire(backend, self.model)
        self._active = backend
        self._send(backend)

    @_guarded
    def queue(self, waiting: Deferred[Backend]) -> None:
        """Wait for a slot; the scheduler hands over a backend whose slot is already ours."""
        self._watch()
        self._attempt = waiting
        waiting.addCallbacks(self._slot_granted, self._not_queued)

    def _watch(self) -> None:
        self.gateway.exchanges.add(self)
        self.request.watch(self._finished, self._client_lost)
        self.request.setHeader(b"X-OllamaFlow-Request", self.request_id.encode())

    @_guarded
    def _slot_granted(self, backend: Backend) -> None:
        self._active = backend  # the scheduler took the slot for us: ours from now on
        self._attempt = None
        self.waited = self.gateway.clock.seconds() - self.started
        self._send(backend)

    @_guarded
    def _not_queued(self, failure: Failure) -> None:
        self._attempt = None
        if not self.answering or failure.check(CancelledError):
            return
        error = failure.value
        if isinstance(error, QueueRefused):
            self.waited = self.gateway.clock.seconds() - self.started
            if self.tried:  # an attempt failed and no other backend freed a slot in time
                self._give_up(f"; {error}")
            else:
                self._answer(429, str(error), retry_after=error.retry_after)
            return
        log.failure("request {rid}: queueing failed", failure, rid=self.request_id)
        self._answer(500, "the request could not be scheduled; see the gateway's log")

    # -- attempts ---------------------------------------------------------------------------

    def may_use(self, backend: Backend) -> Backend | None:
        """Asked by the scheduler when a slot of ``backend`` frees while this request waits:
        the record to use if it is one of the request's candidates now and not tried yet."""
        identifier = backend.identifier
        if identifier in self.tried:
            return None
        for candidate in self._candidates_now():
            if candidate.identifier == identifier:
                return candidate
        return None

    def _candidates_now(self) -> Sequence[Backend]:
        return self.gateway.candidates_now(
            self.frontend, self.request_class, self.label, self.model_name, self.model
        )

    def _untried(self) -> list[Backend]:
        """The candidates left for another attempt: not tried yet, and in rotation."""
        if not self.frontend.allow_retries:
            return []
        tried = self.tried
        states = self.gateway.runtime.states
        left = []
        for backend in self._candidates_now():
            if backend.identifier in tried:
                continue
            state = states.get(backend.identifier)
            if state is None or not state.suspect:
                left.append(backend)
        return left

    def _retry(self, left: list[Backend] | None = None) -> None:
        """Another attempt, on a backend not tried yet: the least loaded with a free slot now,
        else the first to free one, waiting in the queue in this request's old place until its
        old deadline. It gives up only when no candidate is left or the deadline passed."""
        if left is None:
            left = self._untried()
        if not left:
            self._give_up()
            return
        gateway = self.gateway
        scheduler = gateway.scheduler
        model = self.model
        free = [b for b in left if scheduler.has_slot(b, model)]
        if free:
            backend = min(free, key=lambda b: gateway.in_flight(b.identifier) / b.weight)
            scheduler.acquire(backend, model)
            self._active = backend
            self._send(backend)
            return
        log.info(
            "request {rid}: waiting for a slot on a backend not tried yet ({count} left)",
            rid=self.request_id,
            count=len(left),
        )
        waiting = scheduler.wait_again(self.frontend, self.may_use, model, self.started)
        self._attempt = waiting
        waiting.addCallbacks(self._slot_granted, self._not_queued)

    def _send(self, backend: Backend) -> None:
        """One attempt on ``backend``, whose slot this request already holds."""
        self._timed_out = False
        self.tried.append(backend.identifier)
        request = self.request
        if self.logged_body is None and (
            self.frontend.log_request_body or backend.log_request_body
        ):
            # Read now: Twisted drops the body once the response is finished.
            self.logged_body = _body_text(request)
        producer = self._body_for(backend)  # strict JSON and validated pins: encodable
        query = request.uri.partition(b"?")[2]
        if backend.querystring:
            extra = backend.querystring.encode()
            query = query + b"&" + extra if query else extra
        target = request.path + b"?" + query if query else request.path
        try:
            attempt = self.gateway.backends.send(
                backend,
                request.method,
                target,
                hdrs.forwarded(request, backend, self.gateway.withheld),
                producer,
                self._responded,
                self._failed,
            )
        except ValueError as e:  # the request's own fault: not the backend's, no retry
            self.end_attempt()
            self._answer(400, f"the request cannot be forwarded: {e}")
            return
        if attempt.fired:  # the body producer failed at once
            return
        self._attempt = attempt
        ttfb = self.frontend.timeout_ms / 1000
        if ttfb:
            self._ttfb = self.gateway.deadlines.add(ttfb, partial(self._ttfb_expired, attempt))

    def _body_for(self, backend: Backend) -> bytes | IBodyProducer | None:
        """The body to send: bytes when it is in memory (sent with the head in one write)."""
        request = self.request
        document = self.document
        request_class = self.request_class
        if document is not None and request_class is not RequestClass.OTHER:
            # The frontend's pins are in the document already (they may name the model).
            pinned = (
                backend.pinned_embeddings_properties
                if request_class is RequestClass.EMBEDDINGS
                else backend.pinned_completions_properties
            )
            if pinned:
                return jsonlimits.dumps(deep_merge(document, pinned))
            if _frontend_pins(self.frontend, request_class):
                return jsonlimits.dumps(document)
        content = request.content
        if content is None:
            return None
        size = body_size(content)
        if size == 0 and request.method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            return None
        if size <= _IN_MEMORY_BODY:
            return content.read()
        return FileBodyProducer(content)

    @_guarded
    def _ttfb_expired(self, attempt: Attempt) -> None:
        self._ttfb = None
        self._timed_out = True
        attempt.cancel()

    def _stop_ttfb(self) -> None:
        if self._ttfb is not None:
            self._ttfb.cancel()
            self._ttfb = None

    def end_attempt(self) -> None:
        """Give the backend's slot back, exactly once per attempt."""
        backend, self._active = self._active, None
        if backend is not None:
            self.gateway.scheduler.release(backend, self.model)

    @_guarded
    def _failed(self, failure: Failure) -> None:
        backend = self._active
        assert backend is not None, "an attempt fails while its backend slot is held"
        self._attempt = None
        self._stop_ttfb()
        if not self.answering:
            self.end_attempt()
            return
        timed_out = self._timed_out
        if timed_out:
            self.last_error = f"no response within {self.frontend.timeout_ms} ms"
        else:
            self.last_error = _describe(failure)
        log.warn(
            "request {rid}: backend {backend} failed: {error}",
            rid=self.request_id,
            backend=backend.identifier,
            error=self.last_error,
        )
        # Out of rotation before its slot is given back, so no queued request takes it.
        self.backend_failed(backend, self.last_error)
        self.end_attempt()
        self._retry()

    @_guarded
    def _responded(self, response: IResponse) -> None:
        try:
            self._take(response)
        except Exception:
            with contextlib.suppress(RuntimeError):  # unless a reader already has it
                response.deliverBody(_Discard(close=True))
            raise

    def _take(self, response: IResponse) -> None:
        """The response head is here: retry past it, or relay it to the client."""
        backend = self._active
        assert backend is not None, "a response comes while its backend slot is held"
        self._attempt = None
        self._stop_ttfb()
        if not self.answering:
            response.deliverBody(_Discard(close=True))
            self.end_attempt()
            return
        code = response.code
        if code in _GATEWAY_ERRORS or (code == _SERVER_ERROR and self._blamed is None):
            left = self._untried()
            if left:
                self._retry_past(response, backend, left)
                return
        if code < _SERVER_ERROR and self._blamed is not None:
            self._blame(self._blamed, backend)
        if code in _GATEWAY_ERRORS:
            self.backend_failed(backend, f"answered {code}")
        request = self.request
        self.first_byte = self.gateway.clock.seconds()
        self.status = response.code
        if self.frontend.log_response_body or backend.log_response_body:
            self.captured = bytearray()
        request.setResponseCode(response.code, response.phrase)
        hdrs.to_client(response.headers, request)
        if request.method == b"HEAD":
            # The answer to HEAD says how long the GET's body would be (when the backend
            # said); there is none here.
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                request.setHeader(b"Content-Length", length[-1])
        elif response.length is not None and isinstance(response.length, int):
            request.setHeader(b"Content-Length", b"%d" % response.length)
        request.setHeader(b"X-OllamaFlow-Backend", backend.identifier.encode())
        if self.client is not None:
            expiry = self.frontend.sticky_session_expiration_ms / 1000
            self.gateway.pins.pin(
                self.frontend.identifier,
                self.client,
                backend.identifier,
                self.gateway.clock.seconds() + expiry,
            )
        if request.method == b"HEAD":
            response.deliverBody(_Discard())
            self.end_attempt()
            request.finish()
            return
        idle = self.frontend.timeout_ms / 1000
        if request.path in MODEL_TRANSFER_PATHS:
            idle = max(idle, MODEL_TRANSFER_IDLE)
        self.relay = relay = _Relay(self, backend, idle)
        response.deliverBody(relay)
        # A small answer is complete by now; a stream's status and headers go out at once, as
        # the backend sent them, not with its first chunk.
        if not relay.done:
            if not request.started:
                request.write(b"")
            relay.watch()

    def _blame(self, blamed: Backend, answering: Backend) -> None:
        """``blamed`` answered 500 to what ``answering`` answered: it counts against that
        backend for this model only (the request may be what it cannot serve)."""
        self._blamed = None
        model = self.model
        if model is None:
            return
        gateway = self.gateway
        steered = gateway.runtime.model_holds.blamed(
            blamed.identifier, model, gateway.clock.seconds(), blamed.unhealthy_threshold
        )
        if steered:
            log.warn(
                "model {model} steered away from backend {backend} for {hold:g}s: it answered "
                "500 to requests backend {other} answered",
                model=model,
                backend=blamed.identifier,
                hold=MODEL_HOLD,
                other=answering.identifier,
            )

    def _retry_past(self, response: IResponse, backend: Backend, left: list[Backend]) -> None:
        """A gateway error, or a first 500, before anything reached the client: read it away
        and try another backend. A gateway error takes the backend out of rotation at once; a
        500 only counts against it, for this model, once another backend answers the same
        request."""
        code = response.code
        self.last_error = f"backend {backend.identifier!r} answered {code}"
        log.warn("request {rid}: {error}; retrying", rid=self.request_id, error=self.last_error)
        if code == _SERVER_ERROR:
            self._blamed = backend
        else:
            self.backend_failed(backend, self.last_error)
        response.deliverBody(_Discard())
        self.end_attempt()
        self._retry(left)

    def _report(self) -> None:
        """Tell the observers how this request went, once."""
        if self._reported or not self.gateway.observers:
            return
        self._reported = True
        gateway = self.gateway
        now = gateway.clock.seconds()
        count, duration = usage(self.tail) if self.tail else (None, None)
        request = self.request
        backend = self.tried[-1] if self.tried else None
        gateway.report(
            Completed(
                request_id=self.request_id,
                client=request.client_host,
                frontend=self.frontend.identifier,
                backend=backend,
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                model=self.model,
                status=self.status,
                outcome=self.outcome,
                bytes=self.relayed,
                queued=self.waited,
                ttfb=None if self.first_byte is None else self.first_byte - self.started,
                duration=now - self.started,
                retries=max(0, len(self.tried) - 1),
                eval_count=count,
                eval_duration_ns=duration,
                request_body=self.logged_body,
                response_body=(
                    None
                    if self.captured is None
                    else logged_text(bytes(self.captured), self.relayed)
                ),
                request_head=logged_head(
                    request,
                    self.frontend,
                    self.tried,
                    gateway.withheld,
                    gateway.registry.catalog.backends,
                ),
            )
        )

    def backend_failed(
        self, backend: Backend, reason: str, kind: FailureKind = FailureKind.VISIBLE
    ) -> None:
        if self.gateway.on_failure is not None:
            self.gateway.on_failure(backend, reason, kind)

    # -- endings ----------------------------------------------------------------------------

    def _give_up(self, why: str = "") -> None:
        tried = ", ".join(self.tried)
        if self._timed_out:
            self._answer(504, f"{self.last_error} (tried {tried}){why}")
        else:
            self._answer(502, f"no backend could answer (tried {tried}): {self.last_error}{why}")

    def _answer(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        (log.warn if status >= 500 else log.info)(
            "request {rid}: {status} {message}", rid=self.request_id, status=status, message=message
        )
        self.status, self.outcome = status, "refused"
        body = refuse(self.request, status, message, retry_after=retry_after)
        self.request.setHeader(b"Content-Length", b"%d" % len(body))
        self.request.write(body)
        self.request.finish()

    def abort(self) -> None:
        """Give up on this request now (the daemon's drain ran out of time)."""
        self.outcome = "aborted"
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        self.request.abort_connection()

    def _finished(self) -> None:
        self.gateway.exchanges.discard(self)
        self._stop_everything()  # nothing left to stop on every usual path; kept certain
        self._report()

    def _client_lost(self, reason: Failure) -> None:
        self.gateway.exchanges.discard(self)
        if self.outcome == "ok":
            self.outcome = "client_gone"
        self._report()
        self._stop_everything()

    def _stop_everything(self) -> None:
        """Nobody is to be answered the usual way any more: cancel the attempt or the wait for
        a slot, close the backend's stream (Ollama stops generating), give the slot back."""
        self.answering = False
        self._stop_ttfb()
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        if self.relay is not None:
            self.relay.client_left()
        self.end_attempt()

    def crashed(self, failure: Failure) -> None:
        """A bug while handling this request: logged; the client gets a 500 (or, once its
        response has begun, a cut-off connection) and the slot is given back."""
        log.failure("request {rid} failed", failure, rid=self.request_id)
        if not self.answering:
            return
        self.outcome = "error"
        self._stop_everything()
        request = self.request
        if request.finished or request.disconnected:
            return
        if request.started:
            request.abort_connection()
            return
        try:
            self._answer(500, f"internal error; see the gateway's log, request {self.request_id}")
        except Exception:
            log.failure("request {rid}: the 500 could not be sent", rid=self.request_id)
            request.abort_connection()


class _Relay(Protocol):
    """Writes each chunk of the backend's body to the client as it arrives."""

    def __init__(self, exchange: _Exchange, backend: Backend, idle: float) -> None:
        self.exchange = exchange
        self.backend = backend
        self.idle = idle
        self.timer: IDelayedCall | None = None
        self.done = False
        #: Not whole when the head was relayed: the body came over time (a stream).
        self.streamed = False

    @_guarded
    def connectionMade(self) -> None:
        self.exchange.request.registerProducer(_producer(self), True)

    def watch(self) -> None:
        """Cut the stream off if the backend goes quiet for ``idle`` seconds."""
        self.streamed = True
        if self.idle:
            self.timer = self.exchange.gateway.clock.callLater(self.idle, self._idle_expired)

    @_guarded
    def dataReceived(self, data: bytes) -> None:
        if self.timer is not None:
            self.timer.reset(self.idle)
        exchange = self.exchange
        exchange.relayed += len(data)
        if exchange.keep_tail:
            exchange.tail = (exchange.tail + data)[-TAIL_BYTES:]
        captured = exchange.captured
        if captured is not None and len(captured) < LOGGED_BODY_BYTES:
            captured += data[: LOGGED_BODY_BYTES - len(captured)]
        exchange.request.write(data)

    @_guarded
    def _idle_expired(self) -> None:
        self.timer = None
        log.warn(
            "request {rid}: backend {backend} sent nothing for {idle}s; aborting the stream",
            rid=self.exchange.request_id,
            backend=self.backend.identifier,
            idle=self.idle,
        )
        _producer(self).stopProducing()

    def client_left(self) -> None:
        """The client went away: close the backend connection so Ollama stops generating."""
        if not self.done:
            _producer(self).stopProducing()

    @_guarded
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        exchange = self.exchange
        exchange.relay = None  # no cycle left: the exchange is freed as soon as it ends
        complete = isinstance(reason.value, ResponseDone | PotentialDataLoss)
        if complete and exchange.status < 500:
            gateway = exchange.gateway
            # A backend that just answered well is where the next request goes first (power
            # of two choices' memory); one that failed must not be.
            gateway.balancer.finished(exchange.frontend.identifier, self.backend)
            runtime = gateway.runtime
            state = runtime.states.get(self.backend.identifier)
            if state is not None:
                state.answered_whole(self.streamed)
            if runtime.model_holds and exchange.model is not None:
                runtime.model_holds.answered(self.backend.identifier, exchange.model)
            inventory = gateway.inventory
            if (
                inventory is not None
                and exchange.model_name is not None
                and exchange.request_class is not RequestClass.OTHER
                and not inventory.is_loaded(self.backend.identifier, exchange.model_name)
            ):
                inventory.learned(self.backend.identifier, exchange.model_name)
        if complete or not exchange.answering:
            exchange.end_attempt()
            if exchange.answering:
                exchange.request.unregisterProducer()
                exchange.request.finish()
            return
        request = exchange.request
        request.unregisterProducer()
        log.warn(
            "request {rid}: backend {backend} broke off the response: {error}",
            rid=exchange.request_id,
            backend=self.backend.identifier,
            error=_describe(reason),
        )
        exchange.backend_failed(self.backend, "broke off a response", FailureKind.CUT_STREAM)
        exchange.end_attempt()
        exchange.outcome = "aborted"
        # No terminating chunk: the client sees a truncated response, never a complete one.
        request.abort_connection()


def _body_text(request: ClientRequest) -> str | None:
    content = request.content
    if content is None:
        return None
    content.seek(0)
    raw = content.read(LOGGED_BODY_BYTES)
    size = content.seek(0, 2)
    content.seek(0)
    return logged_text(raw, size)


def _producer(protocol: Protocol) -> IPushProducer:
    """A response body protocol's transport: the backend connection, as a push producer."""
    return cast(IPushProducer, protocol.transport)


def _describe(failure: Failure) -> str:
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(_describe(r) for r in reasons)
    text = str(value) or type(value).__name__
    return text.splitlines()[0]
