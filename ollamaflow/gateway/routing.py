"""Where a client request goes: the routing decision, made with no I/O.

:meth:`Router.decide` reads the configuration, the runtime state and the model inventory, and
says what to do with one request: refuse it (with its status), answer it for the whole
frontend (the model catalog, a fleet-wide model operation, an unload), or forward it to its
candidates in the order to try them. The gateway carries the decision out; nothing here writes
to a client, takes a slot or waits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import IO, Any, Protocol
from urllib.parse import unquote

import attrs

from ollamaflow import jsonlimits, modelnames
from ollamaflow.apikeys import model_allowed
from ollamaflow.catalog import Catalog
from ollamaflow.credentials import NO_TOKENS, Tokens
from ollamaflow.gateway import modelcatalog
from ollamaflow.gateway.balancer import Balancer, NoCandidate, StickyPins, candidates, stick
from ollamaflow.gateway.callers import (
    ANONYMOUS_CALLER,
    NO_KEYS,
    Caller,
    Denied,
    KeyRing,
    identify,
    may_manage,
    may_use,
    named_models,
)
from ollamaflow.gateway.classify import RequestClass, allowed_methods, classify, manages_models
from ollamaflow.gateway.clienterrors import quoted
from ollamaflow.gateway.modelcatalog import Inventory
from ollamaflow.gateway.modelops import operation_for, unloads
from ollamaflow.gateway.pinning import deep_merge
from ollamaflow.gateway.placement import Conversation, Placement, conversation_of
from ollamaflow.gateway.requestdoc import ModelNameTooLong, json_object, model_of
from ollamaflow.records import ADMIN, Backend, Frontend, LoadBalancing
from ollamaflow.runtime import Runtime

#: At most this many remembered candidate lists (labels come from clients: keep it bounded).
REMEMBERED = 1024
#: Client strings longer than these are never remembered: no label or Host of ours is longer.
REMEMBERED_LABEL = 256
REMEMBERED_HOST = 300
#: Non-completion requests that name a model which must exist on the chosen backend.
_NAMES_A_MODEL = frozenset({b"/api/show", b"/api/copy", b"/api/push"})
#: The model catalog, answered for the whole frontend from the inventory.
_CATALOG_ROUTES = {
    b"/api/tags": modelcatalog.tags,
    b"/api/ps": modelcatalog.ps,
    b"/v1/models": modelcatalog.openai_models,
}
_MODEL_ROUTE = b"/v1/models/"
_PUSH = b"/api/push"


class CatalogSource(Protocol):
    """Where the current configuration is read (the registry)."""

    @property
    def catalog(self) -> Catalog: ...


class RoutedRequest(Protocol):
    """What routing reads of a client request."""

    @property
    def method(self) -> bytes: ...

    @property
    def path(self) -> bytes: ...

    @property
    def content(self) -> IO[bytes] | None: ...

    @property
    def client_host(self) -> str: ...

    def header(self, name: bytes) -> bytes | None: ...


# -- decisions --------------------------------------------------------------------------------


@attrs.frozen
class Refusal:
    """Answer the request with an error and forward nothing."""

    frontend: Frontend | None
    status: int
    message: str
    retry_after: int | None = None
    #: The model the request names, once known (for the access log).
    model: str | None = None
    #: The ``Allow`` header of a 405.
    allow: bytes | None = None
    caller: Caller = ANONYMOUS_CALLER


@attrs.frozen
class FleetOperation:
    """A model operation done on every candidate (:mod:`ollamaflow.gateway.modelops`)."""

    name: str
    frontend: Frontend
    candidates: list[Backend]
    caller: Caller = ANONYMOUS_CALLER


@attrs.frozen
class CatalogAnswer:
    """The model catalog of the frontend's backends, read from their inventories."""

    frontend: Frontend
    body: bytes
    model: str | None
    backends: list[Backend]
    caller: Caller = ANONYMOUS_CALLER


@attrs.frozen
class Unload:
    """``ollama stop``: unload the model on every backend where it is loaded."""

    frontend: Frontend
    loaded: list[Backend]
    document: dict[str, Any]
    model: str
    caller: Caller = ANONYMOUS_CALLER


@attrs.frozen
class Forward:
    """Send the request to a backend: ``ordered`` is the order to try them in."""

    frontend: Frontend
    ordered: Sequence[Backend]
    request_class: RequestClass
    #: The JSON body, with the frontend's pins merged, when the gateway read it.
    document: dict[str, Any] | None
    #: The model as the client named it (what inventories are asked) and as slots count it.
    model: str | None
    model_key: str | None
    label: str | None
    #: The sticky-session client, when the frontend pins clients to backends.
    client: bytes | None
    caller: Caller = ANONYMOUS_CALLER
    #: A chat's messages as prefix digests (``ModelAware``: its turns stay together).
    conversation: Conversation | None = None
    #: Sent as the request's ``keep_alive`` (``ModelAware``: a model in demand stays loaded).
    keep_alive: str | None = None


Decision = Refusal | FleetOperation | CatalogAnswer | Unload | Forward


def frontend_pins(frontend: Frontend, request_class: RequestClass) -> Mapping[str, Any]:
    """The properties a frontend pins on requests of ``request_class`` (empty for others)."""
    if request_class is RequestClass.EMBEDDINGS:
        return frontend.pinned_embeddings_properties
    if request_class is RequestClass.COMPLETIONS:
        return frontend.pinned_completions_properties
    return {}


def model_key(model: str | None) -> str | None:
    """How in-flight requests per model are counted and reported: the name as Ollama displays
    it; None for no name, or one that is not Ollama's (a client's string is not a model)."""
    if model is None:
        return None
    try:
        return modelnames.display(model)
    except modelnames.InvalidModelName:
        return None


def warm_first(ordered: Sequence[Backend], loaded: frozenset[str]) -> Sequence[Backend]:
    """Backends with the model already loaded first (no cold load), order otherwise kept."""
    warm: list[Backend] = []
    cold: list[Backend] = []
    for backend in ordered:
        (warm if backend.identifier in loaded else cold).append(backend)
    return [*warm, *cold] if warm and cold else ordered


class Router:
    """Makes routing decisions; remembers what it can between requests (frontends per
    ``Host``, candidate lists, which candidates have a model) until what they depend on
    changes, so a frontend of a hundred backends is not walked on every request."""

    def __init__(
        self,
        *,
        registry: CatalogSource,
        runtime: Runtime,
        seconds: Callable[[], float],
        inventory: Inventory | None = None,
        balancer: Balancer | None = None,
        pins: StickyPins | None = None,
        sticky_headers: tuple[str, ...] = (),
        admin_tokens: Tokens = NO_TOKENS,
        pulls: bool = True,
        placement: Placement | None = None,
        has_slot: Callable[[Backend, str | None], bool] = lambda backend, model: True,
        hot_keep_alive: str = "30m",
    ) -> None:
        """``admin_tokens`` may manage models where a frontend does not let clients;
        ``pulls``: whether pulls are fleet-wide (model synchronization runs)."""
        self.registry = registry
        self.runtime = runtime
        self.seconds = seconds
        self.inventory = inventory
        self.balancer = balancer or Balancer()
        self.pins = pins or StickyPins()
        self.sticky_headers = tuple(h.lower().encode() for h in sticky_headers)
        self.admin_tokens = admin_tokens
        self.pulls = pulls
        #: ``ModelAware`` frontends' placement; whether a backend has a free slot now, and the
        #: ``keep_alive`` a model in demand is sent with.
        self.placement = placement
        self.has_slot = has_slot
        self.hot_keep_alive = hot_keep_alive
        self._frontends: tuple[Catalog | None, dict[bytes | None, Frontend | None]] = (None, {})
        self._key_ring: tuple[Catalog | None, KeyRing] = (None, NO_KEYS)
        self._candidates: dict[
            tuple[str, RequestClass, str | None],
            tuple[Catalog, int, list[Backend] | NoCandidate],
        ] = {}
        self._inventory_version = 0
        self._with_model: dict[
            tuple[int, str], tuple[list[Backend], int, list[Backend], frozenset[str]]
        ] = {}

    def configuration_changed(self, catalog: Catalog) -> None:
        self.pins.prune(catalog)
        self.balancer.forget(catalog)

    def inventory_changed(self, backend_id: str) -> None:
        """An inventory listener: which candidates have a model is worked out again."""
        self._inventory_version += 1

    # -- the decision ---------------------------------------------------------------------------

    def decide(self, request: RoutedRequest) -> Decision:
        """What to do with ``request``, whose body is complete."""
        host = request.header(b"host")
        frontend = self.frontend_for(host)
        if frontend is None:
            name = host.decode("latin-1") if host else ""
            return Refusal(None, 404, f"no frontend for host {quoted(name)}")
        method, path = request.method, request.path
        allowed = allowed_methods(path)
        if allowed is not None and method not in allowed:
            return Refusal(frontend, 405, "405 method not allowed", allow=b", ".join(allowed))
        request_class = classify(path)
        caller = self._caller(request, frontend, request_class)
        if isinstance(caller, Refusal):
            return caller
        read = self._document(request, frontend, request_class, caller)
        if isinstance(read, Refusal):
            return read
        document, model = read
        label_value = request.header(b"x-ollamaflow-label")
        label = label_value.decode("latin-1") if label_value else None
        found = self.candidates(self.registry.catalog, frontend, request_class, label)
        if isinstance(found, NoCandidate):
            return Refusal(frontend, 503, found.message, retry_after=1, model=model, caller=caller)
        operation = operation_for(method, path, pulls=self.pulls)
        if operation is not None:
            return FleetOperation(operation, frontend, found, caller)
        warm: frozenset[str] = frozenset()
        inventory = self.inventory
        if inventory is not None:
            answered = self._catalog_answer(method, path, frontend, inventory, found, caller)
            if answered is not None:
                return answered
            if (
                document is not None
                and model is not None
                and request_class is RequestClass.COMPLETIONS
                and unloads(document, path)
            ):
                loaded = [b for b in found if inventory.is_loaded(b.identifier, model)]
                if loaded:
                    return Unload(frontend, loaded, document, model, caller)
            if model is not None:
                found, warm = self.having(inventory, found, model)
                if not found:
                    return Refusal(
                        frontend,
                        404,
                        f"model {quoted(model)} not found",
                        model=model,
                        caller=caller,
                    )
                if path == _PUSH:
                    # A push must start where the model is: a box whose models are not read
                    # yet goes only if no box is known to have it.
                    found = [b for b in found if inventory.has(b.identifier, model)] or found
        key = model_key(model)
        holds = self.runtime.model_holds
        if holds and key is not None:
            found = holds.steer(found, key, self.seconds())
        client = self._client_id(request) if frontend.use_sticky_sessions else None
        ordered = self._order(frontend, found, key, warm, client)
        return self._forward(
            frontend, ordered, request_class, document, model, label, client, caller
        )

    def _caller(
        self, request: RoutedRequest, frontend: Frontend, request_class: RequestClass
    ) -> Caller | Refusal:
        """Who asks (:func:`identify`), if the frontend and their key allow this request."""
        caller = identify(
            request.header(b"authorization"),
            frontend,
            self.key_ring(),
            self.admin_tokens,
            self.seconds(),
        )
        if isinstance(caller, Denied):
            return Refusal(frontend, caller.status, caller.message, caller=caller.caller)
        return self._permitted(request, frontend, request_class, caller) or caller

    def _permitted(
        self,
        request: RoutedRequest,
        frontend: Frontend,
        request_class: RequestClass,
        caller: Caller,
    ) -> Refusal | None:
        """A refusal if the frontend, or the caller's key, does not allow this kind of
        request."""
        method, path = request.method, request.path
        if manages_models(method, path):
            if not frontend.allow_model_management and caller.account != ADMIN:
                return Refusal(
                    frontend,
                    403,
                    f"frontend {frontend.identifier!r} does not allow model management (pull, "
                    "delete, copy, create, push, blob uploads) without an admin token",
                    caller=caller,
                )
            denied = may_manage(caller)
            if denied is not None:
                return Refusal(frontend, 403, denied.message, caller=caller)
        if (request_class is RequestClass.EMBEDDINGS and not frontend.allow_embeddings) or (
            request_class is RequestClass.COMPLETIONS and not frontend.allow_completions
        ):
            return Refusal(
                frontend,
                403,
                f"frontend {frontend.identifier!r} does not allow {request_class.value} requests",
                caller=caller,
            )
        return None

    def _models_denied(
        self,
        request: RoutedRequest,
        caller: Caller,
        document: dict[str, Any] | None,
        model: str | None,
    ) -> Denied | None:
        """A 403 if the request names a model the caller's key may not use: the model it is
        routed by, or those a model operation names (a copy's source and destination)."""
        if not manages_models(request.method, request.path):
            return None if model is None else may_use(caller, (model,))
        if document is None:
            try:
                document = json_object(request.content)
            except ValueError:
                return None  # the operation refuses a body that is not JSON itself
        return may_use(caller, named_models(document))

    def _document(
        self,
        request: RoutedRequest,
        frontend: Frontend,
        request_class: RequestClass,
        caller: Caller,
    ) -> tuple[dict[str, Any] | None, str | None] | Refusal:
        """The JSON body routing needs (the frontend's pins merged in) and the model it names;
        a refusal for a body a model request cannot have, or a model the caller may not use."""
        document: dict[str, Any] | None = None
        if request_class is not RequestClass.OTHER:
            try:
                document = json_object(request.content)
            except ValueError as e:
                return Refusal(frontend, 400, str(e), caller=caller)
            pins = frontend_pins(frontend, request_class)
            if pins:
                # Before routing: a pinned "model" is the model the request is routed by.
                document = deep_merge(document, pins)
        elif request.path in _NAMES_A_MODEL and request.method == b"POST":
            try:
                document = json_object(request.content)
            except jsonlimits.TooDeep as e:
                return Refusal(frontend, 400, str(e), caller=caller)
            except ValueError:
                document = None  # the backend will say what is wrong with it
        try:
            model = model_of(document, request.path) if document is not None else None
        except ModelNameTooLong as e:
            return Refusal(frontend, 400, str(e), caller=caller)
        if caller.key is not None and caller.key.models:
            denied = self._models_denied(request, caller, document, model)
            if denied is not None:
                return Refusal(frontend, 403, denied.message, model=model, caller=caller)
        return document, model

    def _forward(
        self,
        frontend: Frontend,
        ordered: Sequence[Backend],
        request_class: RequestClass,
        document: dict[str, Any] | None,
        model: str | None,
        label: str | None,
        client: bytes | None,
        caller: Caller,
    ) -> Forward:
        """Forward in the order given; for a ``ModelAware`` frontend, warm copies first (the
        conversation's backend ahead), a load only where placement allows one, and
        ``keep_alive`` for a model in demand."""
        placement = self.placement
        key = model_key(model)
        if (
            placement is None
            or model is None
            or frontend.load_balancing is not LoadBalancing.MODEL_AWARE
        ):
            return Forward(
                frontend, ordered, request_class, document, model, key, label, client, caller
            )
        conversation = None
        keep_alive = None
        if document is not None and request_class is not RequestClass.OTHER:
            if request_class is RequestClass.COMPLETIONS:
                conversation = conversation_of(document)
            if "keep_alive" not in document and placement.is_hot(model):
                keep_alive = self.hot_keep_alive
        has_slot = self.has_slot
        placed = placement.order(ordered, model, conversation, lambda b: has_slot(b, key))
        return Forward(
            frontend,
            placed,
            request_class,
            document,
            model,
            key,
            label,
            client,
            caller,
            conversation,
            keep_alive,
        )

    def _catalog_answer(
        self,
        method: bytes,
        path: bytes,
        frontend: Frontend,
        inventory: Inventory,
        found: list[Backend],
        caller: Caller,
    ) -> CatalogAnswer | Refusal | None:
        """The model catalog routes, answered from the inventories read so far; a key limited
        to some models sees only those."""
        if method not in (b"GET", b"HEAD") or not (
            path in _CATALOG_ROUTES or path.startswith(_MODEL_ROUTE)
        ):
            return None
        readable = [b for b in found if inventory.known(b.identifier)]
        key = caller.key
        # A backend would list every model: a key limited to some is answered from what is
        # read (nothing, at first).
        shown = partial(model_allowed, key.models) if key is not None and key.models else None
        if path in _CATALOG_ROUTES:
            if not readable and shown is None:
                return None  # nothing read yet: let a backend answer
            listed = _CATALOG_ROUTES[path](inventory, readable, shown)
            return CatalogAnswer(frontend, listed, None, readable, caller)
        name = unquote(path[len(_MODEL_ROUTE) :].decode("utf-8", "replace"))
        if len(name) > modelnames.MAX_LENGTH:
            return Refusal(frontend, 400, "the model name is too long", caller=caller)
        denied = may_use(caller, (name,))
        if denied is not None:
            return Refusal(frontend, 403, denied.message, model=name, caller=caller)
        if not readable:
            return None
        body = modelcatalog.openai_model(inventory, readable, name)
        if body is None:
            return Refusal(
                frontend, 404, f"model {quoted(name)} not found", model=name, caller=caller
            )
        return CatalogAnswer(frontend, body, name, readable, caller)

    def _order(
        self,
        frontend: Frontend,
        found: list[Backend],
        key: str | None,
        warm: frozenset[str],
        client: bytes | None,
    ) -> Sequence[Backend]:
        """The candidates in the order to try them: the client's pinned backend, else the
        balancer's order with backends that have the model loaded first."""
        if client is not None:
            pinned = self.pins.lookup(frontend.identifier, client, self.seconds())
            if pinned is not None and any(b.identifier == pinned for b in found):
                return stick(found, pinned)
        load = self.in_flight if key is None else partial(self._model_load, key)
        ordered = self.balancer.order(frontend, found, load)
        if warm and len(warm) < len(ordered):  # all warm (or all cold): nothing to move
            ordered = warm_first(ordered, warm)
        return ordered

    # -- what it remembers ----------------------------------------------------------------------

    def key_ring(self) -> KeyRing:
        """The API keys of the current configuration, ready for the hot path."""
        catalog = self.registry.catalog
        if self._key_ring[0] is not catalog:
            keys = catalog.api_keys.values()
            self._key_ring = (catalog, KeyRing(keys) if keys else NO_KEYS)
        return self._key_ring[1]

    def frontend_for(self, host: bytes | None) -> Frontend | None:
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
        if len(known) < REMEMBERED and (host is None or len(host) <= REMEMBERED_HOST):
            known[host] = frontend
        return frontend

    def candidates(
        self,
        catalog: Catalog,
        frontend: Frontend,
        request_class: RequestClass,
        label: str | None,
    ) -> list[Backend] | NoCandidate:
        """The candidates, remembered until the configuration or some backend's health
        changes. Never mutate."""
        key = (frontend.identifier, request_class, label)
        epoch = self.runtime.epoch.value
        remembered = self._candidates.get(key)
        if remembered is not None and remembered[0] is catalog and remembered[1] == epoch:
            return remembered[2]
        found = candidates(catalog, self.runtime, frontend, request_class, label)
        if label is not None and len(label) > REMEMBERED_LABEL:
            return found
        if len(self._candidates) >= REMEMBERED:
            self._candidates.clear()
        self._candidates[key] = (catalog, epoch, found)
        return found

    def having(
        self, inventory: Inventory, found: list[Backend], model: str
    ) -> tuple[list[Backend], frozenset[str]]:
        """The candidates that have the model (or whose inventory is not read yet), and which
        of them have it loaded; remembered until the candidates or any inventory change."""
        key = (id(found), model)
        remembered = self._with_model.get(key)
        if (
            remembered is not None
            and remembered[0] is found
            and remembered[1] == self._inventory_version
        ):
            return remembered[2], remembered[3]
        having = [b for b in found if inventory.has(b.identifier, model) is not False]
        warm = frozenset(b.identifier for b in having if inventory.is_loaded(b.identifier, model))
        if len(self._with_model) >= REMEMBERED:
            self._with_model.clear()
        self._with_model[key] = (found, self._inventory_version, having, warm)
        return having, warm

    def candidates_now(self, forward: Forward) -> Sequence[Backend]:
        """A forwarded request's candidates as they are now: health, configuration,
        inventories and models steered away change while it waits for a slot or after an
        attempt failed. Never mutate."""
        catalog = self.registry.catalog
        current = catalog.frontends.get(forward.frontend.identifier)
        if current is None:
            return ()
        found = self.candidates(catalog, current, forward.request_class, forward.label)
        if isinstance(found, NoCandidate):
            return ()
        if self.inventory is not None and forward.model is not None:
            found, _ = self.having(self.inventory, found, forward.model)
        holds = self.runtime.model_holds
        if holds and forward.model_key is not None:
            found = holds.steer(found, forward.model_key, self.seconds())
        placement = self.placement
        if (
            placement is not None
            and forward.model is not None
            and current.load_balancing is LoadBalancing.MODEL_AWARE
        ):
            found = placement.admissible(found, forward.model)
        return found

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

    def _client_id(self, request: RoutedRequest) -> bytes:
        for name in self.sticky_headers:
            value = request.header(name)
            if value:
                return value
        return request.client_host.encode()
