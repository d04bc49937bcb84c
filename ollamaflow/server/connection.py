"""One client connection of the main listener: HTTP/1.1 requests parsed by a small state machine.

Twisted's ``HTTPChannel`` and ``Request`` cost more than everything else a proxied request does
(a line callback per header field, a ``Headers`` object each way, a dozen attributes and
Deferreds per request): on two cores they cap a do-nothing ``Site`` at a tenth of what nginx
proxies. Here the request head is parsed in one pass, and the request goes to one of two
handlers that the listener chooses from its method and its path, decoded and normalised as
Ollama routes it (:mod:`ollamaflow.server.target`, :meth:`Listener.exchange`): client
traffic to the gateway as a :class:`ClientRequest`, the admin API and the other pages as
ordinary twisted.web requests carried by :class:`WebStream`.

Requests on one connection are served one at a time; bytes of a pipelined next request wait
until the response before them is complete. The response side is the transport's producer, so
a client that reads slowly pauses whatever feeds its response.
"""

from __future__ import annotations

import re
import tempfile
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from ollamaflow.server.request import ClientRequest
from ollamaflow.server.target import PLAIN_TARGET, PathError, normalize_target

if TYPE_CHECKING:
    from ollamaflow.listener import Listener

#: Request line and header fields together; larger is refused with 431.
MAX_HEAD = 64 * 1024
#: Header fields in one request.
MAX_FIELDS = 256
#: One chunk-size line, extensions included.
_MAX_CHUNK_LINE = 4096
#: Bodies up to this size are kept in memory; larger ones go to a temporary file.
IN_MEMORY_BODY = 1 << 20
#: Bytes of pipelined requests buffered while a response is in progress before reading pauses.
_MAX_PENDING = 256 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"/[\x21-\x7e]*\Z")
_ABSOLUTE = re.compile(rb"https?://([^/?#]*)([/?][\x21-\x7e]*)?\Z", re.IGNORECASE)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})
_METHODS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
#: Distinct header field names remembered as valid, with their lower-case form; only names of
#: up to _MAX_NAME_REMEMBERED bytes (longer ones are checked each time), so about 128 KB at most.
_MAX_NAMES = 1000
_MAX_NAME_REMEMBERED = 64

# Phases: reading a head, a body (by length, or chunked), then busy until the response ends.
_HEAD = 0
_LENGTH = 1
_CHUNK_SIZE = 2
_CHUNK_DATA = 3
_CHUNK_END = 4
_TRAILERS = 5
_BUSY = 6
_CLOSED = 7


class BadRequest(Exception):
    """The request cannot be served; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Exchange(Protocol):
    """What receives one request's body and then serves it: the gateway's request or a
    twisted.web request (:class:`ollamaflow.server.web.WebStream`)."""

    def body(self, data: bytes) -> None: ...

    def complete(self) -> None: ...

    def connection_lost(self, reason: Failure) -> None: ...


class GatewayExchange:
    """Collects the body of a request for the gateway, then hands the request over."""

    __slots__ = ("_file", "_parts", "listener", "request", "size")

    def __init__(self, listener: Listener, request: ClientRequest) -> None:
        self.listener = listener
        self.request = request
        self._parts: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0

    def body(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
        elif self.size > IN_MEMORY_BODY:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - the request owns it
            self._file.write(b"".join(self._parts))
            self._file.write(data)
            self._parts = []
        else:
            self._parts.append(data)

    def complete(self) -> None:
        request = self.request
        if self._file is not None:
            self._file.seek(0)
            request.content = self._file
        elif self.size:
            parts = self._parts
            request.content = BytesIO(parts[0] if len(parts) == 1 else b"".join(parts))
        self.listener.serve(request)

    def connection_lost(self, reason: Failure) -> None:
        self.request.connection_lost(reason)
        if self._file is not None:
            self._file.close()


class HTTPConnection(TwistedProtocol):
    """Parses requests, hands each to its exchange, and writes nothing itself but errors."""

    factory: Listener

    def __init__(self) -> None:
        self._buf = b""
        self._phase = _HEAD
        self._left = 0
        self._trailer_size = 0
        self._limit = 0
        self._received = 0
        self._path = b"/"
        self._exchange: Exchange | None = None
        self._producer: IPushProducer | None = None
        self._transport_paused = False
        self._reading_paused = False
        self._advancing = False
        self.peer_host = ""
        self.secure = False
        #: Set when the listener drains: the connection closes after the current response.
        self.closing = False
        #: When the connection last became idle or received bytes (for the idle sweep).
        self.since = 0.0

    # -- connection events ----------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.peer_host = str(getattr(transport.getPeer(), "host", ""))
        self.secure = ISSLTransport.providedBy(transport)
        if hasattr(transport, "setTcpNoDelay"):
            # Every write is a whole response or a whole chunk of a stream: send it now.
            transport.setTcpNoDelay(True)
        transport.registerProducer(self, True)
        self.since = self.factory.clock.seconds()
        self.factory.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._phase >= _BUSY:
            if self._phase == _BUSY:
                self._buf += data
                if len(self._buf) > _MAX_PENDING and not self._reading_paused:
                    self._reading_paused = True
                    self.transport.pauseProducing()  # type: ignore[union-attr]
            return
        self.since = self.factory.clock.seconds()
        self._buf = self._buf + data if self._buf else data
        self._advance()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._phase = _CLOSED
        self.factory.connections.discard(self)
        exchange, self._exchange = self._exchange, None
        producer, self._producer = self._producer, None
        if exchange is not None:
            exchange.connection_lost(reason)
        if producer is not None:
            producer.stopProducing()

    # -- the response side: called by the exchange ----------------------------------------

    def request_done(self, persistent: bool) -> None:
        """The response is complete: read the next request, or close."""
        self._exchange = None
        self._producer = None
        if self._phase == _CLOSED:
            return
        if not persistent or self.closing:
            self._phase = _CLOSED
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._phase = _HEAD
        self.since = self.factory.clock.seconds()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        if self._buf and not self._advancing:
            self._advance()

    def register_producer(self, producer: IPushProducer, streaming: bool) -> None:
        if not streaming:
            raise TypeError("only push producers can feed a response")
        if self._producer is not None:
            raise RuntimeError("a producer is already registered")
        self._producer = producer
        if self._transport_paused:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        self._producer = None

    def idle(self) -> bool:
        """Whether the connection waits for a request and has none of one yet."""
        return self._phase == _HEAD and not self._buf

    def receiving(self) -> bool:
        """Whether part of a request (its head or body) has come and the rest has not."""
        return self._phase < _BUSY and not self.idle()

    # -- IPushProducer, for the transport: the client reads slowly, or catches up -----------

    def pauseProducing(self) -> None:
        self._transport_paused = True
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport_paused = False
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()

    # -- parsing ----------------------------------------------------------------------------

    def _advance(self) -> None:
        """Parse what is buffered: heads, bodies, and requests pipelined behind them."""
        self._advancing = True
        try:
            while self._buf and self._phase < _BUSY:
                if not (self._head() if self._phase == _HEAD else self._body()):
                    return
        except BadRequest as e:
            self.reject(e.status, str(e))
        finally:
            self._advancing = False

    def _head(self) -> bool:
        """Parse a request head if it is all here; False when more bytes are needed."""
        buf = self._buf
        if buf[:1] in (b"\r", b"\n"):
            buf = self._buf = buf.lstrip(b"\r\n")  # empty lines before a request are allowed
            if not buf:
                return False
        self._path = b"/"  # for the dialect of an error, until the request line is read
        crlf = buf.find(b"\n\r\n")
        lf = buf.find(b"\n\n")
        if crlf < 0 and lf < 0:
            if len(buf) > MAX_HEAD:
                raise BadRequest(431, f"the request head is larger than {MAX_HEAD} bytes")
            return False
        # The head ends at the first empty line, with or without its CR.
        if lf >= 0 and (crlf < 0 or lf < crlf):
            block, rest = buf[:lf], buf[lf + 2 :]
        else:
            block, rest = buf[:crlf].removesuffix(b"\r"), buf[crlf + 3 :]
        if len(block) > MAX_HEAD:
            raise BadRequest(431, f"the request head is larger than {MAX_HEAD} bytes")
        block = block.replace(b"\r\n", b"\n")
        if b"\r" in block or b"\x00" in block:
            raise BadRequest(400, "bare CR or NUL in the request head")
        self._buf = rest
        self._start(block.split(b"\n"))
        return True

    def _start(self, lines: list[bytes]) -> None:
        """Check the request line and header fields, choose the body's framing and the handler."""
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise BadRequest(400, "invalid request line")
        method, target, version = parts
        if version not in _VERSIONS:
            if version.startswith(b"HTTP/") and version[5:6].isdigit():
                raise BadRequest(505, "only HTTP/1.1 and HTTP/1.0 are supported")
            raise BadRequest(400, "invalid request line")
        if method not in _METHODS and not _TOKEN.match(method):
            raise BadRequest(400, "invalid request method")
        authority = None
        if PLAIN_TARGET.match(target):
            path = target.partition(b"?")[0]  # nothing to decode or normalise
        else:
            if not _TARGET.match(target):
                absolute = _ABSOLUTE.match(target)
                if absolute is None:
                    raise BadRequest(400, "invalid request target")
                authority, target = absolute.group(1), absolute.group(2) or b"/"
                if target.startswith(b"?"):
                    target = b"/" + target  # an empty path is "/" (RFC 9112 3.2.2)
            try:
                target, path = normalize_target(target)
            except PathError as e:
                # The error's dialect from the raw path ("//v1.0/..." is the admin API's).
                self._path = b"/" + target.partition(b"?")[0].lstrip(b"/")
                raise BadRequest(400, str(e)) from None
        self._path = path
        if len(lines) > MAX_FIELDS + 1:
            raise BadRequest(431, f"more than {MAX_FIELDS} header fields")
        names = self.factory.header_names
        headers: list[tuple[bytes, bytes]] = []
        fields: dict[bytes, bytes] = {}
        lengths: list[bytes] = []
        connection = b""
        codings: list[bytes] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadRequest(400, "invalid header field")
            lower = names.get(name)
            if lower is None:
                if not _TOKEN.match(name):
                    raise BadRequest(400, "invalid header field")
                lower = name.lower()
                if len(names) < _MAX_NAMES and len(name) <= _MAX_NAME_REMEMBERED:
                    names[name] = lower
            value = value.strip(b" \t")
            if lower == b"content-length":
                lengths.append(value)
            elif lower == b"transfer-encoding":
                codings += (c.strip() for c in value.lower().split(b","))
            elif lower == b"connection":
                connection += b"," + value.lower()
            elif lower == b"host" and lower in fields:
                raise BadRequest(400, "more than one Host header field")
            headers.append((name, value))
            fields[lower] = value
        if authority is not None:
            fields[b"host"] = authority
        elif version == b"HTTP/1.1" and b"host" not in fields:
            raise BadRequest(400, "an HTTP/1.1 request needs a Host header field")
        chunked = bool(codings)
        if chunked and codings != [b"chunked"]:
            raise BadRequest(501, "only the chunked transfer coding is supported")
        if connection:
            fields[b"connection"] = connection[1:]  # every Connection field, lower-cased
        tokens = {t.strip() for t in connection.split(b",")} if connection else set()
        keep = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
        length = 0
        if chunked:
            if lengths:
                raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
                raise BadRequest(400, "invalid Content-Length")
            length = int(lengths[0])
        limit = self.factory.body_limit(path, fields.get(b"host"))
        if length > limit:
            raise BadRequest(413, f"the request body is larger than {limit} bytes")
        self._limit = limit
        self._received = 0
        self._exchange = self.factory.exchange(
            self, method, target, path, version, headers, fields, keep, None if chunked else length
        )
        if (
            (chunked or length)
            and version == b"HTTP/1.1"
            and fields.get(b"expect", b"").lower() == b"100-continue"
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
        if chunked:
            self._phase = _CHUNK_SIZE
        elif length:
            self._phase = _LENGTH
            self._left = length
        else:
            self._dispatch()

    def _body(self) -> bool:
        """Consume body bytes in the current body phase; False when more bytes are needed."""
        phase = self._phase
        buf = self._buf
        exchange = self._exchange
        assert exchange is not None
        if phase == _LENGTH:
            left = self._left
            if len(buf) < left:
                self._buf = b""
                self._left = left - len(buf)
                exchange.body(buf)
                return False
            self._buf = buf[left:]
            self._left = 0
            exchange.body(buf[:left] if len(buf) > left else buf)
            self._dispatch()
        elif phase == _CHUNK_SIZE:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > _MAX_CHUNK_LINE:
                    raise BadRequest(400, "chunk-size line too long")
                return False
            size = buf[:end].rstrip(b"\r").split(b";", 1)[0].strip(b" \t")
            self._buf = buf[end + 1 :]
            if not _HEX.match(size):
                raise BadRequest(400, "invalid chunk size")
            left = int(size, 16)
            if left:
                self._received += left
                if self._received > self._limit:
                    raise BadRequest(413, f"the request body is larger than {self._limit} bytes")
                self._left = left
                self._phase = _CHUNK_DATA
            else:
                self._phase = _TRAILERS
                self._trailer_size = 0
        elif phase == _CHUNK_DATA:
            left = self._left
            piece = buf[:left]
            self._buf = buf[left:]
            self._left = left - len(piece)
            exchange.body(piece)
            if not self._left:
                self._phase = _CHUNK_END
        elif phase == _CHUNK_END:
            if buf.startswith(b"\r\n"):
                self._buf = buf[2:]
            elif buf.startswith(b"\n"):
                self._buf = buf[1:]
            elif buf == b"\r":
                return False
            else:
                raise BadRequest(400, "chunk data not followed by CRLF")
            self._phase = _CHUNK_SIZE
        elif phase == _TRAILERS:
            end = buf.find(b"\n")
            if end < 0:
                if self._trailer_size + len(buf) > MAX_HEAD:
                    raise BadRequest(431, "trailer section too long")
                return False
            self._trailer_size += end + 1
            if self._trailer_size > MAX_HEAD:
                raise BadRequest(431, "trailer section too long")
            line = buf[:end].rstrip(b"\r")
            self._buf = buf[end + 1 :]
            if not line:
                self._dispatch()
        return True

    def _dispatch(self) -> None:
        """The whole request is here: serve it."""
        self._phase = _BUSY
        exchange = self._exchange
        assert exchange is not None
        exchange.complete()

    # -- errors -----------------------------------------------------------------------------

    def reject(self, status: int, message: str) -> None:
        """Answer a request that cannot be read with a JSON error, and close: the rest of
        what the client sends is never read."""
        self._phase = _CLOSED
        body = self.factory.error_body(self._path, status, message)
        phrase = RESPONSES.get(status, b"Bad Request")
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, phrase, len(body), body)
        )
        transport.loseConnection()
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.connection_lost(Failure(BadRequest(status, message)))
