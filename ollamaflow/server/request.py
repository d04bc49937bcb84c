"""One client request on a connection of ours, and its response
(:class:`ollamaflow.server.interfaces.ClientRequest` is what the gateway sees of it).

The methods the gateway calls keep twisted.web's names and meaning (``setResponseCode``,
``setHeader``, ``write``, ``finish``, ``registerProducer``), but there is no
``Headers`` object per direction and no per-request machinery the proxy does not use: the
request's fields are the raw pairs the connection parsed, the response's are written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from ollamaflow.server.interfaces import ClientConnection, RequestHead

#: Status codes whose responses never have a body.
_NO_BODY = frozenset({204, 304})


class ConnectionRequest:
    """A parsed request (method, target, header fields, body) and the response being written."""

    __slots__ = (
        "_chunked",
        "_connection",
        "_fields",
        "_headers",
        "_no_body",
        "_watchers",
        "clientproto",
        "code",
        "content",
        "disconnected",
        "finished",
        "headers",
        "method",
        "path",
        "persistent",
        "phrase",
        "started",
        "uri",
    )

    def __init__(self, connection: ClientConnection, head: RequestHead) -> None:
        self._connection = connection
        #: ``uri``: the request target (the path, then the query as received) and ``path``
        #: its path, percent-decoded and normalised (:mod:`ollamaflow.server.target`);
        #: ``headers``: the header fields as received, in order, with names as sent;
        #: ``persistent``: whether the connection stays open after this response. (One
        #: unpacking, not eight attribute reads: this is on every request's path.)
        (
            self.method,
            self.uri,
            self.path,
            self.clientproto,
            self.headers,
            self._fields,
            self.persistent,
            _,
        ) = head
        #: The body, complete, once the gateway sees the request; None when there is none.
        self.content: IO[bytes] | None = None
        self.code = 200
        self.phrase: bytes | None = None
        self._headers: dict[bytes, tuple[bytes, list[bytes]]] = {}
        self.started = False
        self.finished = False
        self.disconnected = False
        self._chunked = False
        self._no_body = False
        self._watchers: list[tuple[Callable[[], object], Callable[[Failure], object]]] = []

    # -- the request ------------------------------------------------------------------------

    def header(self, name: bytes) -> bytes | None:
        """The last value of a request header field, None if it has none; ``name`` in any
        case (the fields are kept by lower-case name, so lower case is the fast path)."""
        found = self._fields.get(name)
        if found is None and not name.islower():
            return self._fields.get(name.lower())
        return found

    @property
    def client_host(self) -> str:
        """The client's IP address."""
        return self._connection.peer_host

    @property
    def secure(self) -> bool:
        return self._connection.secure

    # -- the response -----------------------------------------------------------------------

    def setResponseCode(self, code: int, phrase: bytes | None = None) -> None:
        self.code = code
        self.phrase = phrase

    def setHeader(self, name: bytes, value: bytes) -> None:
        """Set a response header field, replacing any value it had."""
        self._headers[name.lower()] = (name, [value])

    def addHeader(self, name: bytes, value: bytes) -> None:
        """Add a value to a response header field (``Set-Cookie`` may come several times)."""
        lower = name.lower()
        found = self._headers.get(lower)
        if found is None:
            self._headers[lower] = (name, [value])
        else:
            found[1].append(value)

    def responseHeader(self, name: bytes) -> bytes | None:
        """The last value of a response header field set so far; ``name`` in lower case."""
        found = self._headers.get(name)
        return found[1][-1] if found else None

    def write(self, data: bytes) -> None:
        """Send part of the body (the status and header fields go first, once)."""
        if self.finished:
            raise RuntimeError("write() after finish()")
        if self.disconnected:
            return
        transport: Any = self._connection.transport
        head = b"" if self.started else self._head(final=False)
        if not data or self._no_body:
            if head:
                transport.write(head)
        elif self._chunked:
            transport.writeSequence((head, b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(head + data if head else data)

    def finish(self) -> None:
        """The response is complete. After the client left this does nothing: the gateway
        learns of that from :meth:`watch`."""
        if self.finished or self.disconnected:
            return
        if not self.started:
            self._connection.transport.write(self._head(final=True))  # type: ignore[union-attr]
        elif self._chunked:
            self._connection.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        self.finished = True
        watchers, self._watchers = self._watchers, []
        for done, _ in watchers:
            done()
        self._connection.request_done(self.persistent)

    def watch(self, done: Callable[[], object], lost: Callable[[Failure], object]) -> None:
        """``done()`` when the response is complete, or ``lost(reason)`` if the client leaves
        first (no Deferred on the hot path)."""
        self._watchers.append((done, lost))

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """The client's connection paces ``producer``: paused while the client reads slowly."""
        self._connection.register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._connection.unregister_producer()

    def abort_connection(self) -> None:
        """Drop the client's connection at once: a response cut short must not look whole."""
        transport = self._connection.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def _head(self, final: bool) -> bytes:
        """The status line and header fields, once, choosing the framing of the body (sent
        with the first bytes of the body in one write).

        ``final``: nothing more will be written, so a body of unknown length is empty."""
        self.started = True
        code = self.code
        headers = self._headers
        if self.method == b"HEAD" or code in _NO_BODY or code < 200:
            self._no_body = True
        elif b"content-length" not in headers:
            if final:
                headers[b"content-length"] = (b"Content-Length", [b"0"])
            elif self.clientproto == b"HTTP/1.1":
                headers[b"transfer-encoding"] = (b"Transfer-Encoding", [b"chunked"])
                self._chunked = True
            else:
                self.persistent = False  # an HTTP/1.0 body of unknown length ends at close
        connection = self._connection
        if connection.closing:
            self.persistent = False
        if not self.persistent:
            headers[b"connection"] = (b"Connection", [b"close"])
        elif self.clientproto != b"HTTP/1.1":
            headers[b"connection"] = (b"Connection", [b"keep-alive"])
        if b"date" not in headers:
            headers[b"date"] = (b"Date", [connection.dates.value()])
        phrase = self.phrase or RESPONSES.get(code, b"Unknown")
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, phrase)]
        for name, values in headers.values():
            for value in values:
                lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # -- from the connection ----------------------------------------------------------------

    def connection_lost(self, reason: Failure) -> None:
        """The client went away before the response was complete."""
        self.disconnected = True
        watchers, self._watchers = self._watchers, []
        for _, lost in watchers:
            lost(reason)
