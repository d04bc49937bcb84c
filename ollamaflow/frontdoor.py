"""Where each request goes: the admin API, a page of ours, or the gateway.

Requests are routed on their normalised path (:mod:`ollamaflow.server.target`). Every path that
starts with ``/v1.0`` is the admin API's, even ``/v1.0x``, so that a mistyped admin URL is
refused by it instead of carrying its token to a backend. ``GET /metrics`` and ``GET /`` are ours
too, and so is the dashboard under ``/dashboard/``; those are twisted.web resources under
:class:`Root`. Everything else is client traffic for
the gateway, served on the lean path of :mod:`ollamaflow.server`, over the same connections.

Every ``OPTIONS`` is answered here, and so is a request from an origin browsers may not let
call (:mod:`ollamaflow.cors`): neither reaches the gateway, the admin API or a backend.

:class:`FrontDoor` is the :class:`~ollamaflow.server.interfaces.RequestHandler` of the server's
connections; the daemon hands it to an :class:`~ollamaflow.server.acceptor.Acceptor`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from ollamaflow import cors
from ollamaflow.admin.errors import error_body as admin_error_body
from ollamaflow.dashboard.pages import DashboardPages, is_dashboard
from ollamaflow.gateway.clienterrors import error_body as gateway_error_body
from ollamaflow.server.answers import deliver
from ollamaflow.server.body import SpooledRequest
from ollamaflow.server.failures import fail
from ollamaflow.server.interfaces import (
    BodyReceiver,
    ClientConnection,
    ClientRequest,
    RequestHead,
)
from ollamaflow.server.request import ConnectionRequest
from ollamaflow.server.web import WebSite, WebStream

#: Every path that starts with this is the admin API's (its routes are under ``/v1.0/``).
ADMIN_PREFIX = b"/v1.0"
#: The admin API's records are small; anything larger is a mistake or an attack.
ADMIN_MAX_BODY = 1 << 20
OLLAMA_IS_RUNNING = b"Ollama is running"
METRICS_PATH = b"/metrics"

log = Logger()


class Renderer(Protocol):
    def render(self, request: server.Request) -> Any: ...


class Gateway(Protocol):
    """What the front door needs of the gateway: serve a whole client request (bytes to
    answer with, or ``NOT_DONE_YET`` when it answers later)."""

    def render(self, request: ClientRequest) -> bytes | int: ...


#: The largest body of a client request, from its ``Host`` field (the frontend's limit).
ClientBodyLimit = Callable[[bytes | None], int]


def is_web(method: bytes, path: bytes, metrics: bool) -> bool:
    """Whether a request is for the admin API or a page of ours, not for the gateway;
    ``path`` is normalised."""
    if path.startswith(ADMIN_PREFIX):
        return True
    if method not in (b"GET", b"HEAD"):
        return False
    return path == b"/" or (metrics and path == METRICS_PATH) or is_dashboard(path)


def error_body(path: bytes, status: int, message: str) -> bytes:
    """An error in the dialect of the path: the admin API's, OpenAI's or Ollama's (a path that
    could not be normalised is given raw: its prefix still tells)."""
    if path.startswith(ADMIN_PREFIX):
        return admin_error_body(status, message)
    return gateway_error_body(path, status, message)


def internal_error(path: bytes, reason: Failure) -> bytes:
    """Log a bug below the front door with a reference; the JSON 500 body that names it."""
    reference = uuid.uuid4().hex
    log.failure("request failed ({reference})", reason, reference=reference)
    return error_body(path, 500, f"internal error; see the log, reference {reference}")


class Root(Resource):
    """The twisted.web side: anything under ``/v1.0`` to the admin API, ``/metrics``, the
    dashboard's files, and ``/`` answered here."""

    isLeaf = True

    def __init__(
        self,
        admin: Renderer,
        *,
        metrics: Renderer | None = None,
        dashboard: Renderer | None = None,
    ) -> None:
        super().__init__()
        self.admin = admin
        self.metrics = metrics
        self.dashboard = DashboardPages() if dashboard is None else dashboard

    def render(self, request: server.Request) -> Any:
        path = request.path
        if path.startswith(ADMIN_PREFIX):
            return self.admin.render(request)
        if path == METRICS_PATH and self.metrics is not None:
            return self.metrics.render(request)
        if is_dashboard(path):
            return self.dashboard.render(request)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return OLLAMA_IS_RUNNING


class Answer:
    """A request the front door answers itself once it is whole (an ``OPTIONS``, a refused
    origin): ``status``, ``fields`` and ``body``; whatever body the request has is dropped."""

    __slots__ = ("body_bytes", "fields", "request", "status")

    def __init__(
        self, request: ConnectionRequest, status: int, fields: cors.Fields, body: bytes = b""
    ) -> None:
        self.request = request
        self.status = status
        self.fields = fields
        self.body_bytes = body

    def body(self, data: bytes) -> None:
        """Dropped: the answer does not depend on it."""

    def complete(self) -> None:
        request = self.request
        request.setResponseCode(self.status)
        for name, value in self.fields:
            request.setHeader(name, value)
        body = self.body_bytes
        if body:
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
        request.finish()

    def connection_lost(self, reason: Failure) -> None:
        self.request.connection_lost(reason)


class FrontDoor:
    """Routes each request of the server's connections, from its head: to the ``gateway``,
    to twisted.web under ``root``, or answered here; ``client_body_limit`` bounds the bodies
    of client traffic; ``cors_policy``: the origins browsers may call from (``Cors``)."""

    def __init__(
        self,
        gateway: Gateway,
        root: Root,
        client_body_limit: ClientBodyLimit,
        *,
        cors_policy: cors.Policy = cors.DEFAULT_POLICY,
    ) -> None:
        self.gateway = gateway
        self.site = WebSite(root, internal_error)
        self.metrics = root.metrics is not None
        self.client_body_limit = client_body_limit
        self.cors = cors_policy

    # -- the RequestHandler of the server ---------------------------------------------------

    def body_limit(self, head: RequestHead) -> int:
        if head.path.startswith(ADMIN_PREFIX):
            return ADMIN_MAX_BODY
        return self.client_body_limit(head.fields.get(b"host"))

    def receiver(self, connection: ClientConnection, head: RequestHead) -> BodyReceiver:
        """The gateway's or twisted.web's, or an answer from here (:meth:`cross_origin`)."""
        method = head.method
        if b"origin" in head.fields or method == b"OPTIONS":
            return self.cross_origin(connection, head)
        path = head.path
        # is_web, inlined: this is every request's path.
        if path.startswith(ADMIN_PREFIX) or (
            method in (b"GET", b"HEAD")
            and (path == b"/" or (self.metrics and path == METRICS_PATH) or is_dashboard(path))
        ):
            return WebStream(connection, self.site, head)
        return SpooledRequest(ConnectionRequest(connection, head), self.serve)

    def error_body(self, path: bytes, status: int, message: str) -> bytes:
        return error_body(path, status, message)

    # -- routing ----------------------------------------------------------------------------

    def cross_origin(self, connection: ClientConnection, head: RequestHead) -> BodyReceiver:
        """A request with an ``Origin``, or an ``OPTIONS``: answered here (every ``OPTIONS``,
        and an origin not allowed), or served with the CORS fields on its response. The
        admin API and ``/metrics`` allow the admin origins, everything else the clients'."""
        method, path, fields = head.method, head.path, head.fields
        origin = fields.get(b"origin")
        ours = path.startswith(ADMIN_PREFIX) or (self.metrics and path == METRICS_PATH)
        origins = self.cors.admin if ours else self.cors.client
        decision = cors.decide(origins, method, origin, fields, connection.secure)
        if decision.status is not None:
            error = decision.error
            body = error_body(path, decision.status, error) if error else b""
            answered = ConnectionRequest(connection, head)
            return Answer(answered, decision.status, decision.fields, body)
        if is_web(method, path, self.metrics):
            stream = WebStream(connection, self.site, head)
            for name, value in decision.fields:
                stream.request.setHeader(name, value)
            return stream
        if origin is not None:
            # The decision is ours: a backend (Ollama) must not refuse an origin allowed here,
            # nor name it a second time.
            headers = [(name, value) for name, value in head.headers if name.lower() != b"origin"]
            head = head._replace(headers=headers)
        request = ConnectionRequest(connection, head)
        for name, value in decision.fields:
            request.setHeader(name, value)
        return SpooledRequest(request, self.serve)

    def serve(self, request: ConnectionRequest) -> None:
        """Hand a complete client request to the gateway; a bug there is a JSON 500."""
        try:
            answer = self.gateway.render(request)
        except Exception:
            fail(request, internal_error(request.path, Failure()))
            return
        deliver(request, answer)
