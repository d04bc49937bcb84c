"""HTTP/1.1 requests from clients, parsed by llhttp (``httptools``) with none of its leniencies.

:class:`RequestParser` is fed the bytes of one connection as they arrive and reports each request
to a :class:`RequestConsumer`: its head once it is whole and acceptable, its body as it comes,
then its end. It needs no reactor. llhttp judges the syntax (CRLF line endings, tokens, field
values, chunk framing, Content-Length against Transfer-Encoding); this object adds the rules
of :mod:`ollamaflow.http1.rules` (the head's bounds, the target's form, ``Host``, the versions
we speak, the one transfer coding we decode) and keeps the cost linear in the bytes received,
however they are split:

- ``httptools`` hands over a header field once its line is complete, joining the pieces of an
  unfinished one by copying it: so once a head is under way, and while a chunked body is in a
  chunk-size line or trailer, bytes after the last line end are held back until the line ends
  or :data:`_HOLD` of them wait. Body data is never held.
- A head may take :data:`~ollamaflow.http1.rules.MAX_HEAD` bytes on the wire and
  :data:`~ollamaflow.http1.rules.MAX_FIELDS` fields (431 beyond); trailers as much again.
- In a chunked body, bytes that give llhttp no progress (a chunk-size line, a trailer field)
  may not exceed :data:`_MAX_LINE` (400 beyond).

What llhttp still allows, and we keep: empty lines before a request line (RFC 9112 §2.2), more
than one space between its parts (§3), and ``RTSP/1.0`` or ``ICE/1.0`` read as ``HTTP/1.0``
(httptools does not tell them apart; the framing rules are the same). A request asking to
upgrade the protocol is served as any other (we never upgrade: RFC 9110 §7.8).

llhttp cannot be paused from Python: everything a piece holds is parsed, so a consumer may hear
of several requests in one :meth:`RequestParser.feed`.
"""

from __future__ import annotations

import enum
from typing import Protocol

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from ollamaflow.http1.rules import MAX_FIELDS, MAX_HEAD, BadMessage, absolute_target, valid_host

#: Bytes after the last line end held back before they are parsed anyway.
_HOLD = 4096
#: A chunk-size line (extensions included) or one trailer field, without its end.
_MAX_LINE = 4096
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
#: Header field names remembered with their lower-case form (saves a ``lower()`` per field:
#: 0.25 us of a 9 us request in bench/serverpath.py): how many, how long at most.
_MAX_NAMES = 1000
_MAX_NAME = 64
#: ``Host`` values found valid, remembered (most clients send one or a few): how many, how
#: long at most.
_MAX_HOSTS = 1024
_MAX_HOST = 300
_HOSTS: set[bytes] = set()
#: llhttp's reasons that are a 505, not a 400.
_VERSION_ERRORS = frozenset(
    {
        "Invalid HTTP version",
        "Expected dot",
        "Pause on PRI/Upgrade",
        "Expected HTTP/2 Connection Preface",
    }
)


class RequestConsumer(Protocol):
    """What a :class:`RequestParser` reports each request to, in order. Each method may raise
    :class:`BadMessage` (a 413, say) to refuse the request; nothing more is parsed then."""

    def request_head(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        fields: dict[bytes, bytes],
        keep_alive: bool,
        length: int | None,
    ) -> None:
        """The head is whole and acceptable. ``target``: origin-form (an absolute-form target's
        path and query, its authority then being ``fields[b"host"]``); ``version``
        ``b"HTTP/1.1"`` or ``b"HTTP/1.0"``; ``headers``: the fields as received, in order,
        values without surrounding whitespace; ``fields``: lower-cased name to last value, with
        ``connection`` every Connection value, lower-cased and joined; ``keep_alive``: whether
        the connection goes on after this request; ``length``: the Content-Length (0 without
        a body), or None for a chunked body."""

    def request_body(self, data: bytes) -> None:
        """The next bytes of the body (never empty)."""

    def request_complete(self) -> None:
        """The request is whole: its body has all arrived."""


class State(enum.Enum):
    """Where a :class:`RequestParser` is in the stream of requests."""

    #: Between requests, until the next one's target begins (bytes before it are counted).
    IDLE = "idle"
    #: A head has its target, and is not whole yet.
    HEAD = "head"
    #: The head has been reported; the body (of known length, or chunked) is arriving.
    BODY = "body"
    #: The last request ends the connection: whatever follows is ignored.
    CLOSED = "closed"
    #: A request was refused: nothing more is parsed.
    FAILED = "failed"


_IDLE = State.IDLE
_HEAD = State.HEAD
_BODY = State.BODY
_CLOSED = State.CLOSED
_FAILED = State.FAILED


class _Gone:
    """The consumer of a parser that was closed: it hears nothing."""

    def request_head(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        fields: dict[bytes, bytes],
        keep_alive: bool,
        length: int | None,
    ) -> None:
        pass

    def request_body(self, data: bytes) -> None:
        pass

    def request_complete(self) -> None:
        pass


_GONE = _Gone()


def refusal(error: HttpParserError) -> BadMessage:
    """The answer to a request llhttp refused: 505 for a version it knows but we do not speak,
    400 for everything else (a transfer coding other than chunked is refused, 501, before
    llhttp judges it: see ``on_headers_complete``)."""
    if isinstance(error, HttpParserInvalidMethodError):
        return BadMessage(400, "invalid request method")
    if isinstance(error, HttpParserInvalidURLError):
        return BadMessage(400, "invalid request target")
    reason = str(error)
    if reason in _VERSION_ERRORS:
        return BadMessage(505, "only HTTP/1.1 and HTTP/1.0 are supported")
    return BadMessage(400, f"malformed request: {reason}")


class RequestParser:
    """The requests of one connection, parsed as their bytes arrive (see the module)."""

    __slots__ = (
        "_body",
        "_chunked",
        "_consumer",
        "_head_fed",
        "_head_size",
        "_headers",
        "_heads",
        "_hold",
        "_keep_alive",
        "_length",
        "_llhttp",
        "_marks",
        "_names",
        "_resync",
        "_stall",
        "_trailer_size",
        "_trailers",
        "state",
        "target",
    )

    def __init__(self, consumer: RequestConsumer, names: dict[bytes, bytes] | None = None) -> None:
        """``names``: header field names seen, with their lower-case form, shared by parsers;
        only names of up to 64 bytes are added, and no more than 1,000."""
        self._consumer = consumer
        self._names: dict[bytes, bytes] = {} if names is None else names
        self._llhttp = HttpRequestParser(self)
        self.state = _IDLE
        #: The target of the request being parsed, as received so far (for an error's dialect).
        self.target = b""
        self._hold = bytearray()
        #: Bytes of the current head given to llhttp; heads completed so far.
        self._head_fed = 0
        self._heads = 0
        #: Chunked body data parsed but not yet reported (reported once per piece).
        self._body: list[bytes] = []
        #: Bytes of a chunked body that gave llhttp no progress: it is in a chunk-size line or a
        #: trailer field, whose end is then waited for as in a head.
        self._stall = 0
        #: Chunk headers and trailer fields parsed (progress that is not data).
        self._marks = 0
        self._trailers = 0
        self._resync = False
        self._chunked = False
        self._keep_alive = True
        self._length = 0
        self._headers: list[tuple[bytes, bytes]] = []
        #: The size of the head being parsed, as llhttp reports its parts: exact, however the
        #: bytes were read (the counts on the wire bound what is not reported yet).
        self._head_size = 0
        self._trailer_size = 0

    # -- the public side -------------------------------------------------------------------

    def idle(self) -> bool:
        """Whether nothing of a next request has arrived (empty lines aside)."""
        return self.state is _IDLE and not self._head_fed and not self._hold

    def reading_head(self) -> bool:
        """Whether part of a head has arrived and the rest has not."""
        state = self.state
        return state is _HEAD or (state is _IDLE and bool(self._head_fed or self._hold))

    def feed(self, data: bytes) -> None:
        """Parse the next bytes of the connection, reporting to the consumer as requests
        progress. Raises :class:`BadMessage` for a request refused; then, or after a request
        that ends the connection, further bytes are ignored."""
        state = self.state
        hold = self._hold
        if hold:
            hold += data
            if len(hold) < _HOLD and b"\n" not in data:
                self._check_hold()
                return
            data = bytes(hold)
            hold.clear()
        elif state is _BODY:
            if not self._chunked or not self._stall:
                self._execute(data)  # body data (of known length, or in a chunk): never held
                return
        elif state is _IDLE:
            if len(data) < _HOLD:
                # The start of a request: a line it leaves unfinished is joined once at most,
                # and the next bytes are held (the head is under way).
                self._execute(data)
                return
        elif state is not _HEAD:
            return
        size = len(data)
        cut = data.rfind(b"\n") + 1
        if cut == size or (state is _IDLE and size - cut < _HOLD):
            self._execute(data)
        elif size - cut >= _HOLD:
            # A long line without its end yet: parsed now, apart, so that a chunk-size line or
            # trailer that makes no progress is measured.
            if cut:
                self._execute(data[:cut])
            self._execute(data[cut:])
        else:
            if cut:
                self._execute(data[:cut])
            state = self.state
            if state is _BODY and (not self._chunked or not self._stall):
                self._execute(data[cut:])  # body data
            elif state is not _CLOSED and state is not _FAILED:
                hold += memoryview(data)[cut:]
                self._check_hold()

    def _check_hold(self) -> None:
        """A head whose held bytes already pass the limit cannot end within it (431)."""
        if self.state is not _BODY and self._head_fed + len(self._hold) > MAX_HEAD:
            self.state = _FAILED
            raise BadMessage(431, f"the request head is larger than {MAX_HEAD} bytes")

    def close(self) -> None:
        """Parse nothing more and forget the consumer (no reference cycle outlives the
        connection)."""
        self.state = _FAILED
        self._consumer = _GONE
        del self._llhttp
        self._hold.clear()
        self._body.clear()

    # -- feeding llhttp --------------------------------------------------------------------

    def _execute(self, data: bytes) -> None:  # noqa: C901 - the hot path, kept in one frame
        """One call into llhttp (its errors turned into :class:`BadMessage`), then the
        accounting: the head's bytes on the wire, a chunked body's bytes that made no progress,
        the chunked body data to report."""
        state = self.state
        if state is _IDLE or state is _HEAD:
            if len(data) > MAX_HEAD - self._head_fed:
                self._overflow(data)
                return
        elif state is not _BODY:
            return
        heads = self._heads
        marks = self._marks
        try:
            self._llhttp.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._upgraded(data, upgrade.args[0])
            return
        except HttpParserCallbackError as error:
            self.state = _FAILED
            cause = error.__context__
            if cause is None:
                raise
            raise cause from None  # a BadMessage of ours, or a bug in the consumer
        except HttpParserError as error:
            if self.state is _CLOSED:
                return  # bytes after a request that ends the connection
            self.state = _FAILED
            raise refusal(error) from None
        if self._heads != heads:  # a head completed: its counters started afresh
            if self._body:
                self._deliver()
        elif state is not _BODY:
            if state is _HEAD or self.state is _HEAD or data.strip(b"\r\n"):
                self._head_fed += len(data)  # (empty lines before a request are not counted)
        elif self._body:
            self._stall = 0
            self._deliver()
        elif self._chunked and self.state is _BODY:
            if self._marks != marks:
                self._stall = 0
            else:
                self._stall += len(data)
                if self._stall > _MAX_LINE:
                    self.state = _FAILED
                    raise BadMessage(
                        400, f"a chunk-size line or trailer field longer than {_MAX_LINE} bytes"
                    )

    def _overflow(self, data: bytes) -> None:
        """More bytes than the head may still take: the head must end within them (431)."""
        room = MAX_HEAD - self._head_fed
        heads = self._heads
        self._execute(data[:room])
        if self._heads == heads:
            self.state = _FAILED
            raise BadMessage(431, f"the request head is larger than {MAX_HEAD} bytes")
        self._execute(data[room:])

    def _upgraded(self, data: bytes, offset: int) -> None:
        """llhttp stopped after a request asking to upgrade the protocol. We never upgrade
        (RFC 9110 7.8 lets a server ignore the request): parsing goes on after it. llhttp also
        skipped such a request's body; a new parser is then set on that body's framing by a
        head of our own, so that the body is read and the next request found where it is."""
        if self._resync:
            self._llhttp = llhttp = HttpRequestParser(self)
            framing = b"Transfer-Encoding: chunked" if self._chunked else b"Content-Length: %d"
            if not self._chunked:
                framing %= self._length
            llhttp.feed_data(b"PUT / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
            self._resync = False
        if offset < len(data) and self.state is not _CLOSED:
            self._execute(data[offset:])

    def _deliver(self) -> None:
        """Report the chunked body data parsed so far, in one piece."""
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        try:
            self._consumer.request_body(data)
        except BaseException:
            self.state = _FAILED
            raise

    # -- llhttp's callbacks ----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        state = self.state
        if state is _IDLE:
            self.state = _HEAD
            self.target = url
            self._head_size = len(url) + 14  # the method, version, spaces and CRLF, about
        elif state is _HEAD:
            self.target += url
            self._head_size += len(url)
        # in a body, the head of a resynchronised parser (see _upgraded): ours, ignored

    def on_header(self, name: bytes, value: bytes) -> None:
        state = self.state
        if state is _HEAD:
            self._head_size += len(name) + len(value) + 4
            if self._head_size > MAX_HEAD:
                raise BadMessage(431, f"the request head is larger than {MAX_HEAD} bytes")
            # llhttp strips only the leading whitespace; the rest is read once the head is whole
            self._headers.append((name, value.rstrip(b" \t")))
        elif state is _BODY and not self._resync:
            self._trailer(name, value)

    def _trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field: bounded like the head, then dropped (nothing downstream reads
        trailers)."""
        self._trailers += 1
        self._marks += 1
        self._trailer_size += len(name) + len(value) + 4
        if self._trailers > MAX_FIELDS or self._trailer_size > MAX_HEAD:
            raise BadMessage(431, "the trailer section is too large")

    def on_headers_complete(self) -> None:  # noqa: C901 - one branch per rule of the head
        """Read the head llhttp found well-formed: the rules of :mod:`.rules`, the framing."""
        if self.state is not _HEAD:
            return  # the head of a resynchronised parser
        llhttp = self._llhttp
        spoken = llhttp.get_http_version()
        version = _VERSIONS.get(spoken)
        if version is None:
            if spoken == "0.9":  # llhttp's reading of a request line without a version
                raise BadMessage(400, "invalid request line")
            raise BadMessage(505, "only HTTP/1.1 and HTTP/1.0 are supported")
        headers = self._headers
        self._headers = []
        target = self.target
        if len(headers) > MAX_FIELDS:
            raise BadMessage(431, f"more than {MAX_FIELDS} header fields")
        names = self._names
        fields: dict[bytes, bytes] = {}
        for name, value in headers:
            lower = names.get(name)
            if lower is None:
                lower = self._lower(name)
            fields[lower] = value
        if len(fields) == len(headers):
            host = fields.get(b"host")
            codings = fields.get(b"transfer-encoding")
            connection = fields.get(b"connection")
            if connection is not None:
                fields[b"connection"] = connection.lower()
        else:
            host, codings = self._repeated(headers, fields)
        if host is not None and host not in _HOSTS:
            if not valid_host(host):
                raise BadMessage(400, "invalid Host header field")
            if len(_HOSTS) < _MAX_HOSTS and len(host) <= _MAX_HOST:
                _HOSTS.add(host)
        if target[:1] != b"/":  # origin-form is the rule; llhttp let only visible ASCII in
            target, fields[b"host"] = absolute_target(target)  # its authority wins: RFC 9112 3.2.2
        elif host is None and version == b"HTTP/1.1":
            raise BadMessage(400, "an HTTP/1.1 request needs a Host header field")
        length: int | None = 0
        if codings is not None:
            codings = codings.lower()
            if codings != b"chunked" and [c.strip(b" \t") for c in codings.split(b",")] != [
                b"chunked"
            ]:
                raise BadMessage(501, "only the chunked transfer coding is supported")
            length = None
            self._chunked = True
            self._stall = self._trailers = self._trailer_size = 0
        else:
            self._chunked = False
            declared = fields.get(b"content-length")
            if declared is not None:
                length = int(declared)  # digits only: llhttp checked
        keep_alive = self._keep_alive = llhttp.should_keep_alive()
        if length != 0:
            self._length = length or 0
            self._resync = llhttp.should_upgrade()
        self.state = _BODY
        self._heads += 1
        self._head_fed = 0
        self._consumer.request_head(
            llhttp.get_method(), target, version, headers, fields, keep_alive, length
        )

    def _repeated(
        self, headers: list[tuple[bytes, bytes]], fields: dict[bytes, bytes]
    ) -> tuple[bytes | None, bytes | None]:
        """The Host and Transfer-Encoding of a head where a field name comes more than once:
        one Host at most; every Transfer-Encoding and every Connection value, joined."""
        names = self._names
        host: bytes | None = None
        codings: bytes | None = None
        connection = b""
        for name, value in headers:
            lower = names.get(name) or name.lower()
            if lower == b"host":
                if host is not None:
                    raise BadMessage(400, "more than one Host header field")
                host = value
            elif lower == b"transfer-encoding":
                codings = value if codings is None else codings + b"," + value
            elif lower == b"connection":
                connection += b"," + value.lower()
        if connection:
            fields[b"connection"] = connection[1:]
        return host, codings

    def _lower(self, name: bytes) -> bytes:
        """A field name in lower case, remembered if there is room."""
        lower = name.lower()
        names = self._names
        if len(names) < _MAX_NAMES and len(name) <= _MAX_NAME:
            names[name] = lower
        return lower

    def on_body(self, data: bytes) -> None:
        if self._chunked:
            self._body.append(data)  # reported once per piece: chunks may be one byte each
        else:
            self._consumer.request_body(data)

    def on_chunk_header(self) -> None:
        self._marks += 1

    def on_message_complete(self) -> None:
        if self.state is not _BODY or self._resync:
            # After a request that ends the connection, or the body of an upgrade request
            # that llhttp skipped (see _upgraded).
            return
        if self._body:
            self._deliver()
        self.state = _IDLE if self._keep_alive else _CLOSED
        self.target = b""
        self._consumer.request_complete()
