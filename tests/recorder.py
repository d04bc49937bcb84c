"""A backend that records what it is sent and answers as told: for asserting what the gateway
forwards (headers, bodies, queries) and for scripted status codes."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site


@attrs.frozen
class Seen:
    method: bytes
    uri: bytes
    headers: Headers
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v.decode() for v in self.headers.getRawHeaders(name.encode(), [])]


@attrs.define
class Recorder(Resource):
    """Records every request; answers ``status`` with ``body`` (JSON by default)."""

    seen: list[Seen] = attrs.field(factory=list)
    status: int = 200
    body: bytes = b'{"ok": true}'
    port: IListeningPort | None = None
    isLeaf = True

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: IRequest) -> bytes:
        content = request.content.read() if request.content is not None else b""
        self.seen.append(Seen(request.method, request.uri, request.requestHeaders, content))
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None
        host = self.port.getHost()
        assert isinstance(host, IPv4Address), host
        return host.host, host.port


def start_recorder(reactor: Any, **kw: Any) -> Recorder:
    recorder = Recorder(**kw)
    site = Site(recorder)
    site.noisy = False
    recorder.port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return recorder
