"""twisted.web requests (the admin API, ``/metrics``, ``/``) over a lean :class:`HTTPConnection`.

A ``twisted.web.server.Request`` talks to its channel through a small interface (write the head,
write data, the request is done, register a producer, who is the peer); Twisted's own HTTP/2
stream implements it, and so does :class:`WebStream`, one per request. The Klein app and the
other resources run exactly as they would under ``HTTPChannel``, in a :class:`WebSite` whose
requests answer a bug with a JSON 500 (:func:`ollamaflow.server.failures.fail`).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IAddress, IPushProducer, ITransport
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from ollamaflow.server.failures import fail
from ollamaflow.server.interfaces import ClientConnection, RequestHead
from ollamaflow.twisted_internals import BAD_REQUEST_HOOK, request_disconnected

#: The JSON 500 body for a bug below a request to a path (it logs the bug): ``(path, bug)``.
InternalError = Callable[[bytes, Failure], bytes]


class WebRequest(server.Request):
    """A twisted.web request that answers a bug below it with a JSON 500, never an HTML page;
    it is a :class:`~ollamaflow.server.interfaces.ResponseWriter`."""

    site: WebSite

    @property
    def started(self) -> bool:
        return bool(self.startedWriting)

    @property
    def disconnected(self) -> bool:
        return request_disconnected(self)

    def abort_connection(self) -> None:
        transport: ITransport | None = self.channel.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def processingFailed(self, reason: Failure) -> None:
        fail(self, self.site.internal_error(self.path, reason))


class WebSite(server.Site):
    """The site of the twisted.web side; it never logs a line per request (the gateway's
    access log covers client traffic). ``internal_error``: the body of the 500 a bug below a
    request becomes."""

    requestFactory = WebRequest
    noisy = False
    displayTracebacks = False

    def __init__(self, root: Resource, internal_error: InternalError) -> None:
        # Neither the admin API nor the pages read form submissions; parsing them would also
        # parse the Content-Type of every POST with the email package.
        super().__init__(root, parsePOSTFormSubmission=False)
        self.internal_error = internal_error

    def log(self, request: http.Request) -> None:
        pass


class WebStream:
    """The channel of one twisted.web request on a connection."""

    def __init__(self, connection: ClientConnection, site: server.Site, head: RequestHead) -> None:
        self.connection = connection
        self.site = site
        #: ``Request.finish`` logs through its channel's factory.
        self.factory = site
        self.transport = connection.transport
        self.persistent = head.keep_alive
        self._method, self._uri, self._version = head.method, head.target, head.version
        request: server.Request = site.requestFactory(self)
        for name, value in head.headers:
            request.requestHeaders.addRawHeader(name, value)
        request.gotLength(head.length)
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

    def requestDone(self, request: server.Request) -> None:
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
