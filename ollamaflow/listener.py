"""The main listener: one HTTP site serving the admin API under ``/v1.0/`` and client traffic.

The root is a leaf resource that dispatches on the path prefix, so a proxied request costs one
``startswith`` before it reaches the gateway.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from ollamaflow.admin.errors import error_body
from ollamaflow.gateway.dialect import error_body as gateway_error_body

ADMIN_PREFIX = b"/v1.0/"
#: The admin API's records are small; anything larger is a mistake or an attack.
ADMIN_MAX_BODY = 1 << 20
OLLAMA_IS_RUNNING = b"Ollama is running"

log = Logger()
METRICS_PATH = b"/metrics"


class Renderer(Protocol):
    def render(self, request: server.Request) -> Any: ...


class Root(Resource):
    """Dispatch: ``/v1.0/`` to the admin API, ``GET|HEAD /`` answered here, ``GET /metrics`` to
    ``metrics`` (if given), the rest proxied."""

    isLeaf = True

    def __init__(
        self, admin: Renderer, gateway: Renderer, *, metrics: Renderer | None = None
    ) -> None:
        super().__init__()
        self.admin = admin
        self.gateway = gateway
        self.metrics = metrics

    def render(self, request: server.Request) -> Any:
        path = request.path
        if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX[:-1]:
            return self.admin.render(request)
        if path == b"/" and request.method in (b"GET", b"HEAD"):
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return OLLAMA_IS_RUNNING
        if (
            path == METRICS_PATH
            and self.metrics is not None
            and request.method in (b"GET", b"HEAD")
        ):
            return self.metrics.render(request)
        return self.gateway.render(request)


#: The body size limit for a request, from its path and Host header.
BodyLimit = Callable[[bytes, bytes | None], int]


class LimitedRequest(server.Request):
    """A request that refuses an oversized body with 413 as soon as it is known to be too big,
    without reading the rest: by ``Content-Length`` before the body, or while a chunked body
    arrives.
    """

    _limit: int = 0
    _received: int = 0
    _refused: bool = False

    def gotLength(self, length: int | None) -> None:
        site: OllamaFlowSite = self.channel.site  # type: ignore[attr-defined]
        target: bytes = getattr(self.channel, "_path", b"/")
        self._target = target.split(b"?", 1)[0]
        host = self.requestHeaders.getRawHeaders(b"host", [None])[0]
        self._limit = site.body_limit(self._target, host)
        if length is not None and length > self._limit:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def processingFailed(self, reason: Failure) -> None:
        """A bug below us: log it with a reference, answer a JSON 500, never an HTML page."""
        reference = uuid.uuid4().hex
        log.failure("request failed ({reference})", reason, reference=reference)
        if self.finished or self._disconnected:
            return
        description = f"internal error; see the log, reference {reference}"
        if self.path.startswith(ADMIN_PREFIX):
            body = error_body(500, description)
        else:
            body = gateway_error_body(self.path, 500, description)
        if self.startedWriting:
            # Too late for a status: cut the response off so it cannot look complete.
            cast(ITCPTransport, self.channel.transport).abortConnection()
            return
        self.setResponseCode(500)
        self.setHeader(b"Content-Type", b"application/json")
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()

    def _refuse(self) -> None:
        """Answer 413 on the raw transport and close: the rest of the body is never read."""
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")
        description = f"the request body is larger than {self._limit} bytes"
        if self._target.startswith(ADMIN_PREFIX):
            body = error_body(413, description)
        else:
            body = gateway_error_body(self._target, 413, description)
        transport = cast(ITCPTransport, self.channel.transport)
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()


class OllamaFlowSite(server.Site):
    """The site for the main listener; ``body_limit`` chooses the size limit for a request."""

    requestFactory = LimitedRequest
    noisy = False
    displayTracebacks = False

    def __init__(self, root: Resource, body_limit: BodyLimit) -> None:
        # Neither the admin API nor the gateway reads form submissions; parsing them would
        # also parse the Content-Type of every POST with the email package.
        super().__init__(root, parsePOSTFormSubmission=False)
        self.body_limit = body_limit

    def log(self, request: http.Request) -> None:
        """No combined-log line per request: the access log comes from the gateway."""
