"""The contracts of the HTTP server, the lowest layer of the request path.

The server parses requests and frames responses; it knows nothing of what serves them. Whoever
does (the front door, :mod:`ollamaflow.frontdoor`) implements :class:`RequestHandler`; the
gateway sees each client request as a :class:`ClientRequest`. Layers above depend on these
Protocols, never on the concrete classes, and nothing here imports a layer above.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any, NamedTuple, Protocol

from twisted.internet.interfaces import IListeningPort, IPushProducer, ITransport
from twisted.internet.protocol import ServerFactory
from twisted.python.failure import Failure

from ollamaflow.server.dates import DateCache


class RequestHead(NamedTuple):
    """A request's head as parsed: what routing and the body limit are decided from.

    ``target`` is the request target (path, then the query as received) with its path
    normalised, and ``path`` that path (:mod:`ollamaflow.server.target`); ``headers`` the
    header fields in order as received, ``fields`` the last value of each by lower-case name;
    ``length`` the Content-Length, None for a chunked body.

    A frozen record, but a NamedTuple rather than an ``attrs.frozen`` class: one is built per
    request on the hot path, and attrs' frozen ``__init__`` costs a microsecond more (5 % of
    a whole request in ``bench/serverpath.py``)."""

    method: bytes
    target: bytes
    path: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    fields: dict[bytes, bytes]
    keep_alive: bool
    length: int | None


class BodyReceiver(Protocol):
    """Takes one request's body, then serves the request: the gateway's request
    (:class:`ollamaflow.server.body.SpooledRequest`), a twisted.web request
    (:class:`ollamaflow.server.web.WebStream`) or an answer decided from the head alone."""

    def body(self, data: bytes) -> None: ...

    def complete(self) -> None:
        """The body is whole and it is this request's turn: serve it."""

    def connection_lost(self, reason: Failure) -> None: ...


class ClientConnection(Protocol):
    """What a request needs of the connection it came on, to write its response."""

    @property
    def transport(self) -> ITransport | None: ...

    @property
    def peer_host(self) -> str: ...

    @property
    def secure(self) -> bool: ...

    @property
    def closing(self) -> bool:
        """The server drains: this response is the connection's last."""

    @property
    def dates(self) -> DateCache:
        """The ``Date`` header's value (shared by the server's connections)."""

    def request_done(self, persistent: bool) -> None:
        """The response is complete; the connection stays open if ``persistent``."""

    def register_producer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregister_producer(self) -> None: ...

    def close(self) -> None: ...

    def reject(self, status: int, message: str) -> None:
        """Answer the request being read with a JSON error and close."""


#: The JSON error body in the dialect of a path: ``(path, status, message) -> body``.
ErrorBody = Callable[[bytes, int, str], bytes]


class RequestHandler(Protocol):
    """What a connection needs from whoever serves its requests; each is asked once a
    request."""

    def body_limit(self, head: RequestHead) -> int:
        """The largest body this request may have, in bytes."""

    def receiver(self, connection: ClientConnection, head: RequestHead) -> BodyReceiver:
        """Where this request's body goes, and who serves the request once it is whole."""

    def error_body(self, path: bytes, status: int, message: str) -> bytes:
        """An error about a request to ``path``, in its dialect (see :data:`ErrorBody`)."""


class ResponseWriter(Protocol):
    """A request whose response is being written: all it takes to answer it or cut it off
    (a :class:`ClientRequest`, or a twisted.web request of
    :class:`ollamaflow.server.web.WebRequest`)."""

    @property
    def started(self) -> bool:
        """The status line has been sent."""

    @property
    def finished(self) -> int:
        """Non-zero once the response is complete (twisted.web's is an int)."""

    @property
    def disconnected(self) -> bool:
        """The client left: nothing can be written."""

    def setResponseCode(self, code: int, phrase: bytes | None = None) -> None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def abort_connection(self) -> None:
        """Drop the client's connection at once: a response cut short must not look whole."""


class ClientRequest(ResponseWriter, Protocol):
    """A client's request as the gateway sees it, and its response being written.

    The response methods keep twisted.web's names and meaning; a request header field is
    read with :meth:`header`, not twisted.web's ``getHeader``."""

    method: bytes
    #: The request target, its path normalised (:mod:`ollamaflow.server.target`).
    uri: bytes
    #: The normalised path.
    path: bytes
    #: The request's HTTP version, e.g. ``b"HTTP/1.1"``.
    clientproto: bytes
    #: The header fields as received, in order: (name, value) with the name as sent.
    headers: list[tuple[bytes, bytes]]
    #: The body, complete; None when there is none.
    content: IO[bytes] | None
    #: Whether the connection stays open after this response.
    persistent: bool
    code: int

    @property
    def client_host(self) -> str:
        """The client's IP address."""

    @property
    def secure(self) -> bool: ...

    def header(self, name: bytes) -> bytes | None:
        """The last value of a request header field, None if it has none (any case of
        ``name``; lower case is the fast path)."""

    def addHeader(self, name: bytes, value: bytes) -> None: ...

    def responseHeader(self, name: bytes) -> bytes | None:
        """The last value of a response header field set so far; ``name`` in lower case."""

    def watch(self, done: Callable[[], object], lost: Callable[[Failure], object]) -> None:
        """``done()`` when the response is complete, ``lost(reason)`` if the client leaves
        first."""

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


class ListenFunction(Protocol):
    """Starts listening for ``factory``'s connections; :func:`ollamaflow.tcp.listen` by
    default, a ``MemoryReactor``'s ``listenTCP`` in tests."""

    def __call__(
        self, reactor: Any, port: int, factory: ServerFactory, *, backlog: int, interface: str
    ) -> IListeningPort: ...
