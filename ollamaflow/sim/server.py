"""The HTTP front of a simulator: one leaf resource dispatching on path, faults, Host checks."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet import tcp
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ollamaflow.sim.control import ControlAPI
from ollamaflow.sim.ollama_api import OllamaAPI
from ollamaflow.sim.openai_api import OpenAIAPI
from ollamaflow.sim.responses import (
    JSON,
    HTTPError,
    dumps,
    native_error,
    openai_error,
)
from ollamaflow.sim.state import SimState

Handler = Callable[[Request, Any], bytes | int]
_log = Logger()
_MODELS_PREFIX = b"/v1/models/"
_BLOBS_PREFIX = b"/api/blobs/"
RESET_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: appl"
"""What the `reset_head` fault sends before the reset: a head cut off mid-field."""


@attrs.frozen
class Route:
    """A known path: its handlers by method, whether it takes a JSON body, its error shape."""

    name: str
    methods: Mapping[bytes, Handler]
    json_body: bool = False
    openai: bool = False


def build_routes(ollama: OllamaAPI, openai: OpenAIAPI) -> dict[bytes, Route]:
    """Every route the simulator serves, keyed by exact path."""
    o = ollama
    routes = [
        Route("/", {b"GET": o.root}),
        Route("/api/version", {b"GET": o.version}),
        Route("/api/tags", {b"GET": o.tags}),
        Route("/api/ps", {b"GET": o.ps}),
        Route("/api/show", {b"POST": o.show}, json_body=True),
        Route("/api/generate", {b"POST": o.generate}, json_body=True),
        Route("/api/chat", {b"POST": o.chat}, json_body=True),
        Route("/api/embed", {b"POST": o.embed}, json_body=True),
        Route("/api/embeddings", {b"POST": o.embeddings}, json_body=True),
        Route("/api/pull", {b"POST": o.pull}, json_body=True),
        Route("/api/delete", {b"DELETE": o.delete}, json_body=True),
        Route("/api/copy", {b"POST": o.copy}, json_body=True),
        Route("/api/push", {b"POST": o.push}, json_body=True),
        Route("/api/create", {b"POST": o.create}, json_body=True),
        Route("/v1/models", {b"GET": openai.models}, openai=True),
        Route("/v1/chat/completions", {b"POST": openai.chat_completions}, True, True),
        Route("/v1/completions", {b"POST": openai.completions}, True, True),
        Route("/v1/embeddings", {b"POST": openai.embeddings}, True, True),
    ]
    return {route.name.encode(): route for route in routes}


def host_allowed(host_header: str) -> bool:
    """Ollama's rule on loopback: only local names and private or loopback addresses."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return True
    if host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified


class SimResource(Resource):
    """The whole simulator as one leaf resource: a dict lookup per request, no traversal."""

    isLeaf = True

    def __init__(self, state: SimState, control: ControlAPI, *, loopback: bool) -> None:
        super().__init__()
        self.state = state
        self.control = control
        self.loopback = loopback
        self.openai = OpenAIAPI(state)
        self.ollama = OllamaAPI(state)
        self.routes = build_routes(self.ollama, self.openai)
        self._hosts: dict[bytes, bool] = {}

    def render(self, request: Request) -> bytes | int:
        path = request.path
        route = self.routes.get(path)
        if route is None and path.startswith(b"/_sim/"):
            return self.control.render(request)
        state = self.state
        counters = state.counters
        counters.started(route.name if route is not None else _other_name(path))
        config = state.config
        if config.reset_head:
            self._reset_mid_head(request)
            return NOT_DONE_YET
        if config.hang:
            request.notifyFinish().addErrback(self._hung_up)
            return NOT_DONE_YET
        openai = route.openai if route is not None else path.startswith(b"/v1/")
        try:
            if config.check_host and self.loopback and not self._host_ok(request):
                request.setResponseCode(403)
                request.defaultContentType = None
                result: bytes | int = b""
            elif config.error500:
                raise HTTPError(500, "simulated server error")
            else:
                result = self._dispatch(request, path, route)
        except HTTPError as e:
            result = self._error(request, e.status, e.message, openai)
        except Exception:
            _log.failure("simulator route failed")
            result = self._error(request, 500, "internal simulator error", openai)
        if result is NOT_DONE_YET:
            return NOT_DONE_YET
        assert isinstance(result, bytes)
        counters.finished(request.code)
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(result))
            request.write(b"")
            request.finish()
            return NOT_DONE_YET
        return result

    def _dispatch(self, request: Request, path: bytes, route: Route | None) -> bytes | int:
        method = request.method
        if route is None:
            if path.startswith(_MODELS_PREFIX) and len(path) > len(_MODELS_PREFIX):
                if method not in (b"GET", b"HEAD"):
                    raise HTTPError(405, "405 method not allowed")
                return self.openai.model(request, path[len(_MODELS_PREFIX) :].decode())
            digest = _blob_digest(path)
            if digest is not None:
                if method == b"HEAD":
                    return self.ollama.blob_head(request, digest)
                if method == b"POST":
                    return self.ollama.blob_upload(request, digest)
                raise HTTPError(405, "405 method not allowed")
            raise HTTPError(404, "404 page not found")
        handler = route.methods.get(method)
        if handler is None and method == b"HEAD":
            handler = route.methods.get(b"GET")
        if handler is None:
            raise HTTPError(405, "405 method not allowed")
        body = _read_json(request) if route.json_body else None
        return handler(request, body)

    def _host_ok(self, request: Request) -> bool:
        header = request.getHeader(b"host") or b""
        allowed = self._hosts.get(header)
        if allowed is None:
            allowed = host_allowed(header.decode("latin-1"))
            if len(self._hosts) < 1024:
                self._hosts[header] = allowed
        return allowed

    @staticmethod
    def _error(request: Request, status: int, message: str, openai: bool) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", JSON)
        return dumps(openai_error(status, message) if openai else native_error(message))

    def _reset_mid_head(self, request: Request) -> None:
        """The `reset_head` fault: the start of a response head, then a TCP reset (RST, not
        FIN), as a server that crashes while answering looks to its client."""
        counters = self.state.counters
        counters.reset_heads += 1
        counters.finished(None)
        transport = request.channel.transport
        if not isinstance(transport, tcp.Connection):  # not a TCP socket: just cut it
            if transport is not None:
                transport.loseConnection()
            return
        transport.write(RESET_HEAD)
        # Twisted sends queued writes on the reactor's next turn, but an abort drops them:
        # flush now (IWriteDescriptor.doWrite), so the bytes reach the kernel first. The abort
        # closes with SO_LINGER 0: an RST, not a FIN.
        transport.doWrite()
        transport.abortConnection()

    def _hung_up(self, _reason: Failure) -> None:
        self.state.counters.client_disconnects += 1
        self.state.counters.finished(None)


def _other_name(path: bytes) -> str:
    if path.startswith(_MODELS_PREFIX):
        return "/v1/models/{model}"
    return "/api/blobs/{digest}" if _blob_digest(path) is not None else "other"


def _blob_digest(path: bytes) -> str | None:
    """The `:digest` of `/api/blobs/:digest` (one non-empty segment, percent-decoded)."""
    if not path.startswith(_BLOBS_PREFIX):
        return None
    segment = path[len(_BLOBS_PREFIX) :]
    if not segment or b"/" in segment:
        return None
    return unquote_to_bytes(segment).decode("utf-8", "replace")


def _read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body; 400 like Ollama for an empty or malformed one."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        raise HTTPError(400, "missing request body")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise HTTPError(400, f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return body


class SimChannel(HTTPChannel):
    """An HTTP/1.1 channel that registers itself with its site while connected."""

    site: SimSite

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.site.channels.discard(self)
        super().connectionLost(reason)


class SimSite(Site):
    """A Site without access logging that knows its open connections (to drop them on stop)."""

    protocol = SimChannel  # type: ignore[assignment]
    noisy = False

    def __init__(self, resource: Resource, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.channels: set[SimChannel] = set()

    def buildProtocol(self, addr: IAddress) -> SimChannel:  # type: ignore[override]
        channel = super().buildProtocol(addr)
        assert isinstance(channel, SimChannel)
        return channel

    def log(self, request: http.Request) -> None:
        """No per-request logging: the request path stays lean."""

    def startFactory(self) -> None:
        """No log file and no log-timestamp timer."""

    def stopFactory(self) -> None:
        """Nothing to close."""

    def drop_connections(self, *, abort: bool) -> None:
        """Close every open connection: abruptly (`abort`) or after flushing what is written."""
        for channel in list(self.channels):
            transport = channel.transport
            if transport is None:
                continue
            if abort:
                transport.abortConnection()  # type: ignore[attr-defined]
            else:
                transport.loseConnection()
