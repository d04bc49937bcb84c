"""Responses from backends, parsed by llhttp (through ``httptools``): strictly, in linear time,
with the head bounded.

A :class:`ResponseReader` has no reactor: a connection feeds it the bytes it reads and it tells
a :class:`ResponseConsumer` of the final response's head, its body data and its end. What llhttp
accepts but a proxy must not, and what httptools cannot express, is decided here:

- interim (1xx) responses are skipped (at most :data:`MAX_INTERIM`); 101 is refused, as nothing
  here asks to upgrade;
- a response to HEAD has no body, but llhttp cannot be told so through httptools (its
  ``on_headers_complete`` cannot answer "skip the body"): the reader is told with
  :meth:`ResponseReader.expect`, ends the message at its head and starts a fresh llhttp parser
  for the next response;
- every message starts at the start of a read, or right after a head-only message whose end
  the reader finds: there it checks the status line is ``HTTP/1.1`` or ``HTTP/1.0`` (llhttp
  also takes ``RTSP/``, ``ICE/``, ``HTTP/0.9`` and ``HTTP/2.0``) and skips empty lines, as
  llhttp does between messages;
- status codes of 100 and up, no control characters in the reason phrase, and
  ``Transfer-Encoding`` as a plain list of codings with ``chunked`` at most once, so that this
  module and llhttp agree on the framing of every response they accept;
- the head is bounded (:data:`~ollamaflow.http1.rules.MAX_HEAD` bytes,
  :data:`~ollamaflow.http1.rules.MAX_FIELDS` fields), and so are the trailers; chunk extensions
  are skipped by llhttp, never kept.

A body delimited by the connection closing has no end llhttp can see (httptools does not
expose ``llhttp_finish``): :meth:`ResponseReader.connection_lost` says whether the close ended
it. Everything refused raises :class:`~ollamaflow.http1.rules.BadMessage` (status 502).
"""

from __future__ import annotations

import enum
import re
from typing import Protocol

from httptools import HttpResponseParser
from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from ollamaflow.http1.rules import MAX_FIELDS, MAX_HEAD, TOKEN, BadMessage, connection_tokens

#: Interim (1xx) responses skipped before the final one.
MAX_INTERIM = 16
#: The status a refused response is reported with.
BAD_GATEWAY = 502

Fields = list[tuple[bytes, bytes]]

#: reason-phrase = *( HTAB / SP / VCHAR / obs-text ) (RFC 9112 §4).
_PHRASE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
#: Per field, the bytes of ``: `` and CRLF that callbacks do not show; per status line,
#: ``HTTP/1.1 200 `` and CRLF.
_FIELD_FRAMING = 4
_STATUS_FRAMING = 15
_NO_TOKENS: frozenset[bytes] = frozenset()
#: The lengths of ``Content-Length``, ``Transfer-Encoding`` and ``Connection``.
_FRAMING_NAME_SIZES = frozenset({14, 17, 10})


class Framing(enum.Enum):
    """How the body of a final response is delimited."""

    NONE = "no body"  # an answer to HEAD, 204, 304
    LENGTH = "Content-Length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until the connection closes"


class Head:
    """A final response's head: ``fields`` in order as received (names as sent, values
    without surrounding whitespace), ``length`` the Content-Length if one was sent,
    ``connection`` the tokens of its Connection fields."""

    __slots__ = (
        "code",
        "connection",
        "fields",
        "framing",
        "keep_alive",
        "length",
        "minor",
        "phrase",
    )

    def __init__(
        self,
        minor: int,
        code: int,
        phrase: bytes,
        fields: Fields,
        framing: Framing,
        length: int | None,
        keep_alive: bool,
        connection: frozenset[bytes],
    ) -> None:
        self.minor = minor
        self.code = code
        self.phrase = phrase
        self.fields = fields
        self.framing = framing
        self.length = length
        self.keep_alive = keep_alive
        self.connection = connection

    def __repr__(self) -> str:
        return (
            f"Head(HTTP/1.{self.minor} {self.code} {self.phrase!r}, {self.fields!r}, "
            f"{self.framing.name}, length={self.length}, keep_alive={self.keep_alive})"
        )


class ResponseConsumer(Protocol):
    """Told of one response at a time, in this order: its head, its body data (as it comes),
    its end. Any of them may raise; :meth:`ResponseReader.feed` then raises the same."""

    def response_head(self, head: Head) -> None:
        """The final response's head is here (interim ones are skipped)."""

    def response_data(self, data: bytes) -> None:
        """Some body bytes, decoded from the chunked coding if need be."""

    def response_complete(self, reusable: bool) -> None:
        """The response is complete; ``reusable``: the connection may carry another request
        (keep-alive, and nothing came after the response)."""


class _State(enum.Enum):
    IDLE = "no response expected"
    START = "expecting the first bytes of a message"
    HEAD = "reading a message head"
    INTERIM = "an interim response's head is read; its end follows at once"
    BODY = "reading the final response's body"
    DONE = "the final response is complete; bytes after it are extra"
    HALTED = "abandoned, refused or closed: nothing more is parsed"


_IDLE = _State.IDLE
_START = _State.START
_HEAD = _State.HEAD
_INTERIM = _State.INTERIM
_BODY = _State.BODY
_DONE = _State.DONE
_HALTED = _State.HALTED
_NONE = Framing.NONE
_LENGTH = Framing.LENGTH
_CHUNKED = Framing.CHUNKED
_UNTIL_CLOSE = Framing.UNTIL_CLOSE


class _Halt(Exception):
    """Raised in a callback to stop llhttp where it is: the rest of the read is not wanted."""


class _HeadEnd(Exception):
    """Raised in a callback when a head is a whole message (an interim response's, or one
    answering HEAD): the next message starts after it."""


class ResponseReader:
    """Parses the responses of one connection, one at a time: :meth:`expect` before each."""

    __slots__ = (
        "_after_size",
        "_codings",
        "_connection",
        "_consumer",
        "_count",
        "_delivered",
        "_dirty",
        "_extra",
        "_fields",
        "_framing",
        "_head_request",
        "_held",
        "_interim",
        "_keep",
        "_length",
        "_minor",
        "_overhead",
        "_parser",
        "_phrase",
        "_raw",
        "_size",
        "_state",
        "_tail",
    )

    def __init__(self, consumer: ResponseConsumer) -> None:
        self._consumer = consumer
        self._parser = HttpResponseParser(self)
        self._dirty = False
        self._minor = 1
        self._framing = _NONE
        self._keep = False
        self.expect(False)
        self._state = _IDLE  # no request sent yet: between responses

    def _new_message(self) -> None:
        """Forget the head read so far: a message (the response, or one after an interim
        response) starts with the next byte."""
        self._fields: Fields = []
        self._phrase = b""
        self._codings: list[bytes] | None = None
        self._connection: list[bytes] | None = None
        self._length: int | None = None
        self._size = _STATUS_FRAMING
        self._count = 0
        self._raw = 0
        self._held: list[bytes] | None = None
        self._tail = b""

    # -- the connection's side ------------------------------------------------------------

    def expect(self, head_request: bool) -> None:
        """A request was sent: read its response (``head_request``: it answers HEAD, so it
        has no body whatever its fields say)."""
        if self._dirty:
            self._parser = HttpResponseParser(self)
            self._dirty = False
        self._state = _START
        self._head_request = head_request
        self._interim = 0
        self._extra = False
        self._overhead = 0
        #: Between a chunk-size line and that chunk's data (or, after the last, its trailers).
        self._after_size = False
        #: Body bytes delivered for the current response.
        self._delivered = 0
        self._new_message()

    def feed(self, data: bytes) -> None:
        """Parse bytes read from the connection; raises :class:`BadMessage` if the response
        is refused (then nothing more is parsed), or what a consumer's method raised."""
        state = self._state
        try:
            if state is _BODY:
                if self._framing is _CHUNKED:
                    self._feed_chunked(data)
                else:
                    self._execute(data)
            elif state is _START or state is _HEAD:
                self._feed_head(data)
            elif state is _IDLE:
                if data.strip(b"\r\n"):  # empty lines between responses are skipped
                    raise BadMessage(
                        BAD_GATEWAY, "bytes from the backend while no response was due"
                    )
                return
            else:
                return
        except BaseException:
            self._state = _HALTED
            self._dirty = True
            raise
        if self._state is _DONE:
            self._state = _IDLE
            self._consumer.response_complete(self._keep and not self._extra)

    def abandon(self) -> None:
        """Parse nothing more of this response (the connection is being closed)."""
        self._state = _HALTED
        self._dirty = True

    def connection_lost(self) -> bool:
        """The connection closed: whether that completed the response (a body delimited by
        the connection closing). Nothing more is parsed, and the reader lets go of its parser
        and consumer (each holds it: cycles the garbage collector would have to find)."""
        until_close = self._state is _BODY and self._framing is _UNTIL_CLOSE
        self.abandon()
        self._parser = _SPENT
        self._consumer = _NOBODY
        return until_close

    # -- feeding llhttp ---------------------------------------------------------------------

    def _feed_head(self, data: bytes) -> None:
        """Feed bytes of a message head. A read without a line feed is held and fed with the
        next that has one: llhttp hands each field over in one piece per feed and httptools
        joins the pieces by copying, so a head fed a byte at a time would cost quadratic time."""
        self._raw += len(data)
        if b"\n" not in data:
            self._check_raw()
            self._hold(data)
            return
        if self._held is not None:
            self._held.append(data)
            data = b"".join(self._held)
            self._held = None
        while True:
            if self._state is _START:
                # Empty lines before a message are skipped, as llhttp does between messages
                # (RFC 9112 §2.2): so wherever reads split, they mean the same.
                data = data.lstrip(b"\r\n")
                if b"\n" not in data:
                    if data:
                        self._hold(data)
                    return
                # llhttp also takes RTSP/, ICE/, HTTP/0.9 and HTTP/2.0 status lines.
                version = data[:9]
                if version == b"HTTP/1.1 ":
                    self._minor = 1
                elif version == b"HTTP/1.0 ":
                    self._minor = 0
                else:
                    raise BadMessage(BAD_GATEWAY, f"not an HTTP/1.x response: {data[:40]!r}")
                self._state = _HEAD
            try:
                self._execute(data)
                break
            except _HeadEnd:
                # A head that is a whole message (an interim response, an answer to HEAD) ends
                # at its first empty line, since llhttp took it (no bare CR or LF anywhere).
                seen = self._tail + data
                data = data[seen.find(b"\r\n\r\n") + 4 - len(self._tail) :]
                if self._state is not _INTERIM:
                    if self._state is _DONE:  # answering HEAD: only empty lines may follow
                        self._dirty = True
                        self._extra = bool(data.strip(b"\r\n"))
                    return
                self._parser = HttpResponseParser(self)
                self._state = _START
                self._new_message()
                self._raw = len(data)
                self._check_raw()
        if self._state is _HEAD:
            self._check_raw()
            self._tail = (self._tail + data)[-3:]

    def _hold(self, data: bytes) -> None:
        if self._held is None:
            self._held = [data]
        else:
            self._held.append(data)

    def _check_raw(self) -> None:
        if self._raw > MAX_HEAD:
            raise BadMessage(BAD_GATEWAY, f"response head larger than {MAX_HEAD} bytes")

    def _feed_chunked(self, data: bytes) -> None:
        """Feed a chunked body. httptools builds each trailer field in memory before llhttp
        can judge it, so the bytes read after a chunk-size line without bringing data (the
        trailer section, after the last one) may only add up to MAX_HEAD; complete trailer
        fields are bounded like head fields. Chunk extensions are skipped, never kept."""
        counted = self._after_size
        before = self._delivered
        self._execute(data)
        if self._delivered != before:
            self._overhead = 0
        elif counted:
            self._overhead += len(data)
            if self._overhead > MAX_HEAD and self._state is _BODY:
                raise BadMessage(BAD_GATEWAY, f"trailer section larger than {MAX_HEAD} bytes")

    def _execute(self, data: bytes) -> None:
        """Run llhttp over ``data``, its errors and the callbacks' raised as what they mean."""
        try:
            self._parser.feed_data(data)
        except HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Halt):
                return
            if cause is not None:  # BadMessage, _HeadEnd, or what a consumer raised
                raise cause from None
            raise BadMessage(BAD_GATEWAY, f"invalid response: {e}") from None
        except HttpParserUpgrade:  # a 101 is refused in on_headers_complete, before this
            raise BadMessage(BAD_GATEWAY, "unexpected protocol upgrade") from None
        except HttpParserError as e:
            if self._state is _DONE:
                self._extra = True  # bytes after the complete response that are not one
                return
            raise BadMessage(BAD_GATEWAY, f"invalid response: {e}") from None

    # -- llhttp's callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state is _DONE:
            self._extra = True
            raise _Halt

    def on_status(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size > MAX_HEAD:
            raise BadMessage(BAD_GATEWAY, f"response head larger than {MAX_HEAD} bytes")
        self._phrase += piece  # in one or two pieces: a head is fed a line at a time at most

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + _FIELD_FRAMING
        if self._size > MAX_HEAD:
            raise BadMessage(BAD_GATEWAY, f"response head larger than {MAX_HEAD} bytes")
        fields = self._fields
        if self._state is not _HEAD:
            # A trailer field: bounded, then dropped (or nothing is wanted any more).
            self._count += 1
            if self._count > MAX_FIELDS:
                raise BadMessage(BAD_GATEWAY, f"more than {MAX_FIELDS} trailer fields")
            return
        if len(fields) == MAX_FIELDS:
            raise BadMessage(BAD_GATEWAY, f"more than {MAX_FIELDS} header fields")
        stripped = value.rstrip(b" \t")  # llhttp strips the whitespace before a value only
        if len(name) in _FRAMING_NAME_SIZES:
            lower = name.lower()
            if lower == b"content-length":
                self._length = int(stripped)  # llhttp took it: digits only, not repeated
            elif lower == b"transfer-encoding":
                if self._codings is None:
                    self._codings = []
                self._codings.append(value)  # as llhttp read it: see _codings_framing
            elif lower == b"connection":
                if self._connection is None:
                    self._connection = []
                self._connection.append(stripped)
        fields.append((name, stripped))

    def on_headers_complete(self) -> None:
        if self._state is not _HEAD:
            raise _Halt
        parser = self._parser
        minor = self._minor
        code = parser.get_status_code()
        if code < 100:
            raise BadMessage(BAD_GATEWAY, f"invalid status code {code}")
        phrase = self._phrase
        if phrase != b"OK" and not _PHRASE.match(phrase):
            raise BadMessage(BAD_GATEWAY, f"invalid reason phrase {phrase[:40]!r}")
        if code < 200:
            if code == 101:
                raise BadMessage(BAD_GATEWAY, "101 Switching Protocols was not asked for")
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise BadMessage(BAD_GATEWAY, f"more than {MAX_INTERIM} interim responses")
            self._state = _INTERIM
            return
        connection = connection_tokens(b",".join(self._connection)) if self._connection else None
        if self._head_request:
            framing = _NONE
            keep = _keep_alive(minor, connection) and not (minor == 0 and self._codings)
            self._state = _DONE
        else:
            keep = parser.should_keep_alive()  # only meaningful before the message ends
            if code == 204 or code == 304:
                framing = _NONE
            elif self._codings:
                framing = _codings_framing(self._codings)
            elif self._length is not None:
                framing = _LENGTH
            else:
                framing = _UNTIL_CLOSE
            self._state = _BODY
        self._framing = framing
        self._keep = keep
        # Trailer fields get a budget of their own.
        self._size = 0
        self._count = 0
        self._consumer.response_head(
            Head(
                minor,
                code,
                phrase,
                self._fields,
                framing,
                self._length,
                keep,
                connection or _NO_TOKENS,
            )
        )
        if self._state is _DONE:
            # Answering HEAD: llhttp would read a body the fields announce. The head is the
            # whole message: stop, and parse the next response with a fresh parser.
            raise _HeadEnd

    def on_chunk_header(self) -> None:
        self._after_size = True

    def on_chunk_complete(self) -> None:
        self._after_size = False

    def on_body(self, data: bytes) -> None:
        if self._state is not _BODY:
            self._extra = True  # a body after an answer to HEAD
            raise _Halt
        self._after_size = False
        self._delivered += len(data)
        self._consumer.response_data(data)

    def on_message_complete(self) -> None:
        state = self._state
        if state is _BODY:
            self._state = _DONE
        elif state is _INTERIM:
            raise _HeadEnd
        else:
            raise _Halt


class _Nobody:
    """The consumer of a reader whose connection is gone."""

    def response_head(self, head: Head) -> None:
        pass

    def response_data(self, data: bytes) -> None:
        pass

    def response_complete(self, reusable: bool) -> None:
        pass


_NOBODY = _Nobody()
#: The parser of a reader whose connection is gone: never fed.
_SPENT = HttpResponseParser(_NOBODY)


def _keep_alive(minor: int, connection: frozenset[bytes] | None) -> bool:
    """Whether the connection stays open after a response, from its version and Connection."""
    if minor == 1:
        return connection is None or b"close" not in connection
    return connection is not None and b"keep-alive" in connection and b"close" not in connection


def _codings_framing(values: list[bytes]) -> Framing:
    """The framing ``Transfer-Encoding`` gives a response: chunked if that is the last coding,
    else the body ends when the connection closes (RFC 9112 §6.3). Refused: anything but a
    list of plain codings, chunked twice (§6.1), and tabs (llhttp reads ``chunked`` followed
    by a tab as another coding): where llhttp and we might frame the body differently."""
    if len(values) == 1 and values[0].lower() == b"chunked":
        return _CHUNKED
    codings = [c.strip(b" ").lower() for value in values for c in value.split(b",")]
    for coding in codings:
        if not TOKEN.match(coding):
            raise BadMessage(BAD_GATEWAY, f"invalid Transfer-Encoding {b', '.join(values)!r}")
    if codings.count(b"chunked") > 1:
        raise BadMessage(BAD_GATEWAY, "chunked applied more than once")
    return _CHUNKED if codings[-1] == b"chunked" else _UNTIL_CLOSE
