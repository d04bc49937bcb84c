"""The admin routes: frontends, backends, and health, read from the live catalog; the API
keys' routes are in :mod:`ollamaflow.admin.apikeys`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ollamaflow import __version__
from ollamaflow.activity import Activity
from ollamaflow.admin.apikeys import ApiKeyRoutes, UsageSource
from ollamaflow.admin.errors import ApiError, write_error
from ollamaflow.admin.events import EventFeed, StreamRequest, TooManyListeners
from ollamaflow.admin.routing import answer, parsed, query_values, read_json, routes
from ollamaflow.admin.sections import FleetSections
from ollamaflow.catalog import Registry
from ollamaflow.credentials import Tokens
from ollamaflow.gateway.placement import PlacementStats
from ollamaflow.jsonfields import to_wire
from ollamaflow.records import Backend, Frontend
from ollamaflow.runtime import Runtime
from ollamaflow.store import (
    BackendInUse,
    DuplicateIdentifier,
    InvalidRecord,
    InvalidStoredRecord,
    StoreError,
    StoreUnavailable,
)
from ollamaflow.store import (
    NotFound as RecordNotFound,
)
from ollamaflow.utctime import format_timespan

R = TypeVar("R", Frontend, Backend)

_STORE_ERRORS: dict[type[StoreError], int] = {
    RecordNotFound: 404,
    DuplicateIdentifier: 409,
    BackendInUse: 409,
    InvalidRecord: 400,
    # A stored row that does not load (rotating a key left out): replace it first.
    InvalidStoredRecord: 409,
    StoreUnavailable: 503,
}


def _parse(cls: type[R], request: IRequest, identifier: str | None = None) -> R:
    return parsed(cls, read_json(request), identifier)


def _flag(request: IRequest, name: bytes) -> bool:
    values = query_values(request, name)
    if not values:
        return False
    value = values[-1].lower()
    if value in (b"true", b"1", b"yes"):
        return True
    if value in (b"false", b"0", b"no", b""):
        return False
    raise ApiError(400, f"query parameter {name.decode()}: expected true or false")


@attrs.define
class AdminApi(ApiKeyRoutes):
    """The ``/v1.0/`` routes; ``render`` checks the bearer token before any route runs."""

    registry: Registry
    runtime: Runtime
    tokens: Tokens
    now: Callable[[], datetime]
    started: datetime
    #: A key's usage from an hour on, unflushed counts included (the daemon's usage ledger).
    usage_of: UsageSource
    #: The models view of one backend (present, loaded, required, pulling, failed).
    models: Callable[[str], list[dict[str, Any]]] = lambda _: []
    #: Each frontend's request queue (depth, waits, refusals).
    queues: Callable[[], list[dict[str, object]]] = list
    #: Which worker process this is, when the daemon runs several (0 = the main one).
    worker: int = 0
    #: What placement did (``ModelAware`` frontends): loads, evictions, preloads, affinity.
    placement: Mapping[str, PlacementStats] = attrs.field(factory=dict)
    #: What the fleet did lately (the live feed's request lines and charts).
    activity: Activity = attrs.field(kw_only=True)
    #: The clock the live feed samples by.
    clock: IReactorTime = attrs.field(kw_only=True)
    #: ``GET /v1.0/events``.
    feed: EventFeed = attrs.field(init=False)
    _log: Logger = attrs.field(factory=Logger)

    def __attrs_post_init__(self) -> None:
        self.feed = EventFeed(self.clock, FleetSections(self, self.activity))

    app = routes

    def resource(self) -> _Authenticated:
        return _Authenticated(self, self.app.resource())

    def authorized(self, request: IRequest) -> bool:
        return self.tokens.match(request.getHeader(b"Authorization"))

    # -- frontends ------------------------------------------------------------------------

    @app.route("/v1.0/frontends", methods=["GET"])
    def list_frontends(self, request: IRequest) -> bytes:
        frontends = self.registry.catalog.frontends.values()
        return answer(request, [self.frontend_record(fe) for fe in frontends])

    @app.route("/v1.0/frontends/<string:identifier>", methods=["GET"])
    def get_frontend(self, request: IRequest, identifier: str) -> bytes:
        return answer(request, self.frontend_record(self._frontend(identifier)))

    @app.route("/v1.0/frontends", methods=["PUT", "POST"])
    async def create_frontend(self, request: IRequest) -> bytes:
        stored = await self.registry.create_frontend(_parse(Frontend, request))
        return answer(request, self.frontend_record(stored), 201)

    @app.route("/v1.0/frontends/<string:identifier>", methods=["PUT"])
    async def replace_frontend(self, request: IRequest, identifier: str) -> bytes:
        stored = await self.registry.replace_frontend(_parse(Frontend, request, identifier))
        return answer(request, self.frontend_record(stored))

    @app.route("/v1.0/frontends/<string:identifier>", methods=["DELETE"])
    async def delete_frontend(self, request: IRequest, identifier: str) -> bytes:
        await self.registry.delete_frontend(identifier)
        request.setResponseCode(204)
        return b""

    # -- backends -------------------------------------------------------------------------

    @app.route("/v1.0/backends", methods=["GET"])
    def list_backends(self, request: IRequest) -> bytes:
        return answer(request, [to_wire(be) for be in self.registry.catalog.backends.values()])

    @app.route("/v1.0/backends/health", methods=["GET"])
    def all_health(self, request: IRequest) -> bytes:
        return answer(
            request, [self.health_record(be) for be in self.registry.catalog.backends.values()]
        )

    @app.route("/v1.0/backends/<string:identifier>", methods=["GET"])
    def get_backend(self, request: IRequest, identifier: str) -> bytes:
        return answer(request, to_wire(self._backend(identifier)))

    @app.route("/v1.0/backends/<string:identifier>/health", methods=["GET"])
    def backend_health(self, request: IRequest, identifier: str) -> bytes:
        return answer(request, self.health_record(self._backend(identifier)))

    @app.route("/v1.0/backends/<string:identifier>/models", methods=["GET"])
    def backend_models(self, request: IRequest, identifier: str) -> bytes:
        return answer(request, self.models(self._backend(identifier).identifier))

    @app.route("/v1.0/backends/<string:identifier>/drain", methods=["POST", "PUT"])
    async def drain_backend(self, request: IRequest, identifier: str) -> bytes:
        """Stop sending the backend new requests, on every instance, and let the running ones
        finish: it is deactivated in the configuration. Poll its health until ActiveRequests
        is 0, then delete it."""
        backend = self._backend(identifier)
        if backend.active:
            backend = await self.registry.replace_backend(attrs.evolve(backend, active=False))
        state = self.runtime.state(identifier)
        return answer(
            request,
            {
                "Identifier": identifier,
                "Active": backend.active,
                "ActiveRequests": state.active_requests,
                "Drained": state.active_requests == 0,
            },
        )

    @app.route("/v1.0/backends", methods=["PUT", "POST"])
    async def create_backend(self, request: IRequest) -> bytes:
        stored = await self.registry.create_backend(_parse(Backend, request))
        return answer(request, to_wire(stored), 201)

    @app.route("/v1.0/backends/<string:identifier>", methods=["PUT"])
    async def replace_backend(self, request: IRequest, identifier: str) -> bytes:
        stored = await self.registry.replace_backend(_parse(Backend, request, identifier))
        return answer(request, to_wire(stored))

    @app.route("/v1.0/backends/<string:identifier>", methods=["DELETE"])
    async def delete_backend(self, request: IRequest, identifier: str) -> bytes:
        await self.registry.delete_backend(identifier, force=_flag(request, b"force"))
        request.setResponseCode(204)
        return b""

    # -- the daemon -----------------------------------------------------------------------

    @app.route("/v1.0/health", methods=["GET"])
    def daemon_health(self, request: IRequest) -> bytes:
        return answer(request, self.daemon_status())

    def daemon_status(self) -> dict[str, Any]:
        """The daemon's health: counts, requests in flight, and each frontend's queue."""
        catalog = self.registry.catalog
        healthy = sum(
            1 for be in catalog.backends.values() if self.runtime.state(be.identifier).healthy
        )
        now = self.now()
        return {
            "Status": "Running",
            "Version": __version__,
            "Pid": os.getpid(),
            "Worker": self.worker,
            "StartedUtc": self.started.isoformat().replace("+00:00", "Z"),
            "Uptime": format_timespan(now - self.started),
            "Frontends": len(catalog.frontends),
            "Backends": len(catalog.backends),
            "HealthyBackends": healthy,
            "UnhealthyBackends": len(catalog.backends) - healthy,
            "ActiveRequests": sum(s.active_requests for s in self.runtime.states.values()),
            "Placement": PlacementStats.total(self.placement.values()).to_wire(),
            "Queues": [
                {**queue, "MissingBackends": self._missing(queue["Identifier"])}
                for queue in self.queues()
            ],
        }

    @app.route("/v1.0/events", methods=["GET"])
    def events(self, request: IRequest) -> Deferred[bytes] | bytes:
        """The dashboard's live feed (:mod:`ollamaflow.dashboard` says what it sends)."""
        if request.method == b"HEAD":  # a body would never be sent: no stream to hold open
            request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
            return b""
        try:
            return self.feed.listen(cast(StreamRequest, request))
        except TooManyListeners as e:
            raise ApiError(503, str(e)) from None

    # -- errors ---------------------------------------------------------------------------

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = cast(ApiError, failure.value)
        return write_error(request, error.status, error.description)

    @app.handle_errors(StoreError)
    def store_error(self, request: IRequest, failure: Failure) -> bytes:
        status = _STORE_ERRORS.get(cast(type[StoreError], type(failure.value)), 500)
        return write_error(request, status, str(failure.value))

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return write_error(request, 404, f"no route {request.path.decode(errors='replace')}")

    @app.handle_errors(MethodNotAllowed)
    def wrong_method(self, request: IRequest, failure: Failure) -> bytes:
        allowed: list[str] = getattr(failure.value, "valid_methods", None) or []
        if allowed:
            request.setHeader(b"Allow", ", ".join(allowed).encode())
        method = request.method.decode(errors="replace")
        return write_error(request, 405, f"{method} is not allowed on {request.path.decode()}")

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        reference = uuid.uuid4().hex
        self._log.failure("admin request failed ({reference})", failure, reference=reference)
        return write_error(request, 500, f"see the daemon's log, reference {reference}")

    # -- helpers --------------------------------------------------------------------------

    def _frontend(self, identifier: str) -> Frontend:
        found = self.registry.catalog.frontends.get(identifier)
        if found is None:
            raise ApiError(404, f"frontend {identifier!r} does not exist")
        return found

    def _backend(self, identifier: str) -> Backend:
        found = self.registry.catalog.backends.get(identifier)
        if found is None:
            raise ApiError(404, f"backend {identifier!r} does not exist")
        return found

    def frontend_record(self, frontend: Frontend) -> dict[str, Any]:
        """The record, and the backends it names that do not exist (only when there are)."""
        out = to_wire(frontend)
        missing = self.registry.catalog.missing_backends(frontend)
        if missing:
            out["MissingBackends"] = list(missing)
        return out

    def _missing(self, identifier: object) -> list[str]:
        frontend = self.registry.catalog.frontends.get(str(identifier))
        return list(self.registry.catalog.missing_backends(frontend)) if frontend else []

    def health_record(self, backend: Backend) -> dict[str, Any]:
        out = to_wire(backend)
        now = self.now()
        out.update(self.runtime.state(backend.identifier).to_wire(now))
        out["SteeredModels"] = self.runtime.model_holds.steered(backend.identifier, now.timestamp())
        out["Frontends"] = list(self.registry.catalog.frontends_listing(backend.identifier))
        out["Placement"] = (self.placement.get(backend.identifier) or PlacementStats()).to_wire()
        return out


@attrs.frozen
class _Authenticated:
    """Answers 401 before routing unless the request carries an admin bearer token."""

    api: AdminApi
    routes: IResource

    def render(self, request: IRequest) -> Any:
        if not self.api.authorized(request):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="ollamaflow"')
            return write_error(request, 401, "a valid 'Authorization: Bearer <token>' is required")
        return self.routes.render(request)
