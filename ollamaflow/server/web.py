"""twisted.web requests (the admin API, ``/metrics``, ``/``) over a lean :class:`HTTPConnection`.

A ``twisted.web.server.Request`` talks to its channel through a small interface (write the head,
write data, the request is done, register a producer, who is the peer); Twisted's own HTTP/2
stream implements it, and so does :class:`WebStream`, one per request. The Klein app and the
other resources run exactly as they would under ``HTTPChannel``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from ollamaflow.server.connection import HTTPConnection
from ollamaflow.twisted_internals import BAD_REQUEST_HOOK


class WebStream:
    """The channel of one twisted.web request on a connection."""

    def __init__(
        self,
        connection: HTTPConnection,
        site: Site,
        method: bytes,
        uri: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        persistent: bool,
        length: int | None,
    ) -> None:
        self.connection = connection
        self.site = site
        #: ``Request.finish`` logs through its channel's factory.
        self.factory = site
        self.transport = connection.transport
        self.persistent = persistent
        self._method, self._uri, self._version = method, uri, version
        request: Request = site.requestFactory(self)
        for name, value in headers:
            request.requestHeaders.addRawHeader(name, value)
        request.gotLength(length)
        self.request = request

    # -- from the connection ----------------------------------------------------------------

    def body(self, data: bytes) -> None:
        self.request.handleContentChunk(data)

    def complete(self) -> None:
        self.request.requestReceived(self._method, self._uri, self._version)

    def connection_lost(self, reason: Failure) -> None:
        if not self.request.finished:
            self.request.connectionLost(reason)

    # -- the channel interface of twisted.web.http.Request ----------------------------------

    def getPeer(self) -> IAddress:
        return self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        return self.transport.getHost()  # type: ignore[union-attr]

    def isSecure(self) -> bool:
        return self.connection.secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        """The status line and fields, with ``Connection`` as this connection will behave."""
        lines = [b"HTTP/1.1 ", code, b" ", reason, b"\r\n"]
        framed = False
        for name, values in headers.getAllRawHeaders():
            lower = name.lower()
            if lower == b"connection":
                continue
            framed = framed or lower in (b"content-length", b"transfer-encoding")
            for value in values:
                lines += (name, b": ", value, b"\r\n")
        if not framed and self._method != b"HEAD" and code not in (b"204", b"304"):
            self.persistent = False  # an HTTP/1.0 body of unknown length ends at close
        if self.connection.closing:
            self.persistent = False
        if not self.persistent:
            lines.append(b"Connection: close\r\n")
        elif self._version != b"HTTP/1.1":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.transport.writeSequence(lines)  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def writeSequence(self, data: list[bytes]) -> None:
        self.transport.writeSequence(data)  # type: ignore[union-attr]

    def requestDone(self, request: Request) -> None:
        self.connection.request_done(self.persistent)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.connection.register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.connection.unregister_producer()

    def loseConnection(self) -> None:
        self.connection.close()

    def bad_request(self) -> None:
        """Answer 400 and close: what twisted.web's Request asks of its channel when it cannot
        parse a query string (through a private hook, :data:`BAD_REQUEST_HOOK`)."""
        self.connection.reject(400, "invalid request")


setattr(WebStream, BAD_REQUEST_HOOK, WebStream.bad_request)
