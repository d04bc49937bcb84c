"""Backend responses on llhttp (issue #15), as the gateway's caller gets them.

- a conformance corpus (leniencies a strict peer refuses, smuggling-shaped framing, limits,
  interim and bodiless responses), each answer fed to the real backend client's connection in
  memory and asserted on the ``IResponse`` (code, headers, length, body, how it ended) or the
  failure, and on whether the connection went back to the pool;
- every corpus answer in random splits (and a byte at a time) gives what it gives whole;
- the reader on its own: responses in turn on one connection, a consumer that raises or
  abandons, and the llhttp behaviours it relies on or works around;
- a differential test against h11's client: the same verdict for generated responses, well
  formed and mutated, but for the deliberate differences listed in :data:`WE_REFUSE` and
  :data:`H11_REFUSES`;
- linear work for a head fed a byte at a time (counted), and the CPU time of a 1 MB body in
  one-byte reads (reported, not asserted);
- end to end: header fields a backend's ``Connection`` names never reach the gateway's client.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import h11
import httptools
import pytest
import pytest_twisted
import treq
from differential import TCHAR, Difference, Verdict, explained, search, values
from harness import Http, start_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.internet.defer import maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from ollamaflow.daemon import Daemon
from ollamaflow.http1 import response as response_module
from ollamaflow.http1.response import Head, ResponseReader
from ollamaflow.http1.rules import MAX_FIELDS, MAX_HEAD, BadMessage
from ollamaflow.upstream import BackendClient
from ollamaflow.upstream.connection import Connection

# -- what the caller gets ---------------------------------------------------------------------

Headers = tuple[tuple[bytes, tuple[bytes, ...]], ...]


@attrs.frozen
class Seen:
    """One answer as the gateway's caller gets it. ``end``: "done", "data loss" (ended by the
    connection closing), "broken" (the body was refused midway), "cut" (the connection closed
    midway), "open" (not over yet); with no response at all: "refused" (the head was) or
    "lost" (the connection closed before a complete head)."""

    end: str
    code: int | None = None
    phrase: bytes = b""
    headers: Headers = ()
    length: int | str | None = None
    body: bytes = b""
    reused: bool = False


REFUSED = Seen("refused")


def ok(
    code: int = 200,
    headers: dict[bytes, list[bytes]] | None = None,
    length: int | str = 0,
    body: bytes = b"",
    *,
    end: str = "done",
    reused: bool = True,
    phrase: bytes = b"OK",
) -> Seen:
    return Seen(end, code, phrase, _normal(headers or {}), length, body, reused)


def broken(body: bytes = b"", headers: dict[bytes, list[bytes]] | None = None) -> Seen:
    """A chunked 200 whose head was fine and whose body was refused."""
    return ok(headers=headers, length=UNKNOWN_LENGTH, body=body, end="broken", reused=False)


def _normal(headers: Any) -> Headers:
    return tuple(sorted((name, tuple(values)) for name, values in dict(headers).items()))


class Collect(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason


class Where:
    hostname, port, ssl = "10.0.0.1", 80, False


WHERE = (Where.hostname, Where.port, Where.ssl)


def deliver(pieces: list[bytes], method: bytes = b"GET", close: bool = False) -> Seen:
    """Send one request on a pooled in-memory connection of a real :class:`BackendClient`,
    feed it ``pieces`` as separate reads (then a clean close if ``close``), and say what the
    caller got."""
    client = BackendClient(task.Clock(), 5.0)
    client.pool.dialled(WHERE)
    connection = Connection(client.pool, WHERE)
    transport = StringTransport()
    connection.makeConnection(transport)
    client.pool.release(connection)
    got: dict[str, Any] = {}
    collect = Collect()

    def responded(response: IResponse) -> None:
        got["response"] = response
        response.deliverBody(collect)

    client.send(
        Where,
        method,
        b"/",
        [(b"Host", b"backend")],
        None,
        responded,
        lambda failure: got.setdefault("failure", failure),
    )
    for piece in pieces:
        connection.dataReceived(piece)
    reused = client.pool.idle(WHERE) == [connection] and not transport.disconnecting
    if close or transport.disconnecting:
        connection.connectionLost(Failure(ConnectionDone()))
    response = got.get("response")
    if response is None:
        failure = got["failure"]
        assert failure.check(ResponseFailed), failure
        inner = failure.value.reasons[0]
        return Seen("refused" if inner.check(BadMessage) else "lost")
    reason = collect.reason
    if reason is None:
        end = "open"
    elif reason.check(ResponseDone):
        end = "done"
    elif reason.check(PotentialDataLoss):
        end = "data loss"
    else:
        assert isinstance(reason.value, ResponseFailed), reason
        end = "broken" if reason.value.reasons[0].check(BadMessage) else "cut"
    return Seen(
        end,
        response.code,
        response.phrase,
        _normal(response.headers.getAllRawHeaders()),
        response.length,
        b"".join(collect.chunks),
        reused,
    )


# -- the corpus ---------------------------------------------------------------------------------


@attrs.frozen
class Case:
    name: str
    answer: bytes
    expected: Seen
    method: bytes = b"GET"
    close: bool = False


OK = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK + b"Transfer-Encoding: chunked\r\n\r\n"
EMPTY = b"Content-Length: 0\r\n\r\n"
U = UNKNOWN_LENGTH


def _many_fields(count: int) -> bytes:
    return OK + b"".join(b"X-Field-%d: %d\r\n" % (i, i) for i in range(count - 1)) + EMPTY


CORPUS = [
    # Plain answers, for reference.
    Case("content-length", OK + b"X-A: 1\r\nContent-Length: 5\r\n\r\nhello",
         ok(headers={b"X-A": [b"1"]}, length=5, body=b"hello")),
    Case("chunked", CHUNKED + b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n", ok(length=U, body=b"hello!")),
    Case("chunk extensions and trailers, dropped",
         CHUNKED + b'5;a=b;c="d e"\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n',
         ok(length=U, body=b"hello")),
    Case("a body until the connection closes", OK + b"X-A: 1\r\n\r\nuntil the end",
         ok(headers={b"X-A": [b"1"]}, length=U, body=b"until the end", end="data loss",
            reused=False), close=True),
    Case("HTTP/1.0 until close", b"HTTP/1.0 200 OK\r\n\r\nold",
         ok(length=U, body=b"old", end="data loss", reused=False), close=True),
    Case("HTTP/1.0 keep-alive", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
         b"Content-Length: 2\r\n\r\nhi", ok(length=2, body=b"hi")),
    Case("HTTP/1.0 without keep-alive", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
         ok(length=2, body=b"hi", reused=False)),
    Case("Connection: close", OK + b"Connection: close\r\nContent-Length: 2\r\n\r\nhi",
         ok(length=2, body=b"hi", reused=False)),
    Case("no reason phrase", b"HTTP/1.1 200\r\n" + EMPTY, ok(phrase=b"")),
    Case("an empty reason phrase", b"HTTP/1.1 200 \r\n" + EMPTY, ok(phrase=b"")),
    Case("status 599", b"HTTP/1.1 599 Odd\r\n" + EMPTY, ok(599, phrase=b"Odd")),
    Case("obs-text in a value and the phrase", b"HTTP/1.1 200 \xc3\xa7a va\r\n"
         b"X-A: caf\xc3\xa9\r\n" + EMPTY, ok(headers={b"X-A": [b"caf\xc3\xa9"]},
                                            phrase=b"\xc3\xa7a va")),
    Case("whitespace around values", OK + b"X-A: \t 1 \t\r\nX-B:\r\nX-C:   \r\n" + EMPTY,
         ok(headers={b"X-A": [b"1"], b"X-B": [b""], b"X-C": [b""]})),
    Case("repeated fields keep their order", OK + b"Set-Cookie: a\r\nSet-Cookie: b\r\n" + EMPTY,
         ok(headers={b"Set-Cookie": [b"a", b"b"]})),
    Case("leading zeros in Content-Length", OK + b"Content-Length: 005\r\n\r\nhello",
         ok(length=5, body=b"hello")),
    # Hop-by-hop: Connection, the fields it names, and the rest are not the caller's.
    Case("fields named by Connection are dropped",
         OK + b"Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
         b"X-Kept: 2\r\nConnection: x-other\r\nX-Other: 3\r\n" + EMPTY,
         ok(headers={b"X-Kept": [b"2"]})),
    Case("Connection: close naming a field", OK + b"Connection: close, X-Secret\r\n"
         b"X-Secret: 1\r\n" + EMPTY, ok(reused=False)),
    Case("hop-by-hop fields", OK + b"Upgrade: h2c\r\nProxy-Connection: keep-alive\r\n"
         b"TE: trailers\r\nX-Kept: 1\r\n" + EMPTY, ok(headers={b"X-Kept": [b"1"]})),
    # Leniencies a strict peer refuses.
    Case("bare LF after the status line", b"HTTP/1.1 200 OK\n" + EMPTY, REFUSED),
    Case("bare LF after a field", OK + b"Content-Length: 0\n\r\n", REFUSED),
    Case("bare LF everywhere", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", REFUSED),
    Case("bare LF ending the head", OK + b"Content-Length: 0\r\n\n", REFUSED),
    Case("bare LF after a chunk size", CHUNKED + b"5\nhello\r\n0\r\n\r\n", broken()),
    Case("bare LF after chunk data", CHUNKED + b"5\r\nhello\n0\r\n\r\n", broken(b"hello")),
    Case("bare LF ending the trailers", CHUNKED + b"0\r\n\n", broken()),
    Case("leading whitespace in a chunk size", CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", broken()),
    Case("trailing whitespace in a chunk size", CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", broken()),
    Case("whitespace before a chunk extension", CHUNKED + b"5 ;a\r\nhello\r\n0\r\n\r\n",
         broken()),
    Case("obs-fold", OK + b"X-A: a\r\n b\r\n" + EMPTY, REFUSED),
    Case("obs-fold with a tab", OK + b"X-A: a\r\n\tb\r\n" + EMPTY, REFUSED),
    Case("obs-fold in the trailers", CHUNKED + b"0\r\nX-T: a\r\n b\r\n\r\n", broken()),
    Case("whitespace before the first field", OK + b" X-A: 1\r\n" + EMPTY, REFUSED),
    Case("whitespace before a colon", OK + b"X-A : 1\r\n" + EMPTY, REFUSED),
    Case("an empty field name", OK + b": 1\r\n" + EMPTY, REFUSED),
    Case("a field without a colon", OK + b"X-A\r\n" + EMPTY, REFUSED),
    Case("empty lines before the status line (skipped)", b"\r\n\n\r\n" + OK + EMPTY, ok()),
    Case("bare CR in a value", OK + b"X-A: a\rb\r\n" + EMPTY, REFUSED),
    Case("bare CR ending the status line", b"HTTP/1.1 200 OK\r" + EMPTY, REFUSED),
    Case("NUL in a value", OK + b"X-A: a\x00b\r\n" + EMPTY, REFUSED),
    Case("DEL in a value", OK + b"X-A: a\x7fb\r\n" + EMPTY, REFUSED),
    Case("a C0 control in a value", OK + b"X-A: a\x01b\r\n" + EMPTY, REFUSED),
    Case("unit separator in a value", OK + b"X-A: a\x1fb\r\n" + EMPTY, REFUSED),
    Case("a control character in a trailer", CHUNKED + b"0\r\nX-T: a\x01\r\n\r\n", broken()),
    Case("CR CR LF ending a field", OK + b"X-A: 1\r\r\n" + EMPTY, REFUSED),
    Case("CR CR LF ending the status line", b"HTTP/1.1 200 OK\r\r\n" + EMPTY, REFUSED),
    Case("CR CR LF after a chunk size", CHUNKED + b"5\r\r\nhello\r\n0\r\n\r\n", broken()),
    Case("bare CR in a chunk extension", CHUNKED + b"5;a\rb\r\nhello\r\n0\r\n\r\n",
         broken()),
    Case("a control character in a chunk extension",
         CHUNKED + b"5;a=\x01\r\nhello\r\n0\r\n\r\n", broken()),
    Case("VT before chunked", OK + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
         REFUSED),
    Case("FF after chunked", OK + b"Transfer-Encoding: chunked\x0c\r\n\r\n0\r\n\r\n",
         REFUSED),
    Case("a control character in the reason phrase", b"HTTP/1.1 200 O\x01K\r\n" + EMPTY,
         REFUSED),
    Case("a lower-case protocol name", b"http/1.1 200 OK\r\n" + EMPTY, REFUSED),
    Case("two spaces before the status", b"HTTP/1.1  200 OK\r\n" + EMPTY, REFUSED),
    # Versions and status codes.
    Case("HTTP/2.0", b"HTTP/2.0 200 OK\r\n" + EMPTY, REFUSED),
    Case("HTTP/2", b"HTTP/2 200 OK\r\n" + EMPTY, REFUSED),
    Case("HTTP/1.2", b"HTTP/1.2 200 OK\r\n" + EMPTY, REFUSED),
    Case("HTTP/0.9", b"HTTP/0.9 200 OK\r\n" + EMPTY, REFUSED),
    Case("RTSP", b"RTSP/1.1 200 OK\r\n" + EMPTY, REFUSED),
    Case("ICE", b"ICE/1.0 200 OK\r\n" + EMPTY, REFUSED),
    Case("garbage", b"garbage\r\n\r\n", REFUSED),
    Case("status 099", b"HTTP/1.1 099 Low\r\n" + EMPTY, REFUSED),
    Case("a four-digit status", b"HTTP/1.1 2000 OK\r\n" + EMPTY, REFUSED),
    # Smuggling-shaped framing.
    Case("Content-Length and Transfer-Encoding",
         OK + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", REFUSED),
    Case("Transfer-Encoding and Content-Length",
         OK + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", REFUSED),
    Case("identity coding with Content-Length",
         OK + b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello", REFUSED),
    Case("Content-Length twice, the same", OK + b"Content-Length: 5\r\nContent-Length: 5\r\n"
         b"\r\nhello", REFUSED),
    Case("Content-Length twice, differing", OK + b"Content-Length: 5\r\nContent-Length: 6\r\n"
         b"\r\nhello!", REFUSED),
    Case("Content-Length as a list", OK + b"Content-Length: 5, 5\r\n\r\nhello", REFUSED),
    Case("Content-Length with a sign", OK + b"Content-Length: +5\r\n\r\nhello", REFUSED),
    Case("negative Content-Length", OK + b"Content-Length: -1\r\n\r\n", REFUSED),
    Case("Content-Length over 64 bits", OK + b"Content-Length: 99999999999999999999\r\n\r\n",
         REFUSED),
    Case("empty Content-Length", OK + b"Content-Length: \r\n\r\n", REFUSED),
    Case("Content-Length with a space inside", OK + b"Content-Length: 1 2\r\n\r\n", REFUSED),
    Case("hex Content-Length", OK + b"Content-Length: 0x5\r\n\r\nhello", REFUSED),
    Case("chunked twice in one field", OK + b"Transfer-Encoding: chunked, chunked\r\n\r\n"
         b"0\r\n\r\n", REFUSED),
    Case("chunked in two fields", OK + b"Transfer-Encoding: chunked\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", REFUSED),
    Case("an empty coding before chunked", OK + b"Transfer-Encoding: , chunked\r\n\r\n"
         b"0\r\n\r\n", REFUSED),
    Case("an empty coding after chunked", OK + b"Transfer-Encoding: chunked,\r\n\r\n"
         b"0\r\n\r\n", REFUSED),
    Case("a coding with a parameter", OK + b"Transfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n",
         REFUSED),
    Case("a coding with a space inside", OK + b"Transfer-Encoding: chun ked\r\n\r\n0\r\n\r\n",
         REFUSED),
    Case("chunked then a tab (llhttp: not chunked)", OK + b"Transfer-Encoding: chunked\t\r\n"
         b"\r\n0\r\n\r\n", REFUSED),
    Case("whitespace around codings", OK + b"Transfer-Encoding:  gzip ,  chunked  \r\n\r\n"
         b"5\r\nhello\r\n0\r\n\r\n", ok(length=U, body=b"hello")),
    Case("whitespace around Content-Length", OK + b"Content-Length: \t5 \t\r\n\r\nhello",
         ok(length=5, body=b"hello")),
    Case("CHUNKED in capitals", OK + b"Transfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n"
         b"\r\n", ok(length=U, body=b"hello")),
    Case("gzip then chunked: chunked framing, the coding left to the client",
         OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\n\x1f\x8b\x08\r\n0\r\n\r\n",
         ok(length=U, body=b"\x1f\x8b\x08")),
    Case("chunked then gzip: until close", OK + b"Transfer-Encoding: chunked, gzip\r\n\r\n"
         b"3\r\nabc\r\n0\r\n\r\n", ok(length=U, body=b"3\r\nabc\r\n0\r\n\r\n",
                                      end="data loss", reused=False), close=True),
    Case("an unknown coding: until close", OK + b"Transfer-Encoding: xchunked\r\n\r\nraw",
         ok(length=U, body=b"raw", end="data loss", reused=False), close=True),
    Case("chunked in HTTP/1.0", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"5\r\nhello\r\n0\r\n\r\n", ok(length=U, body=b"hello", reused=False)),
    Case("a chunk size over 64 bits", CHUNKED + b"10000000000000000\r\nx\r\n0\r\n\r\n",
         broken()),
    Case("a hex prefix in a chunk size", CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", broken()),
    Case("a negative chunk size", CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", broken()),
    Case("chunk data longer than its size", CHUNKED + b"5\r\nhelloXX\r\n0\r\n\r\n",
         broken(b"hello")),
    Case("Content-Length in the trailers", CHUNKED + b"0\r\nContent-Length: 5\r\n\r\n",
         broken()),
    Case("a second response in the same read", OK + b"Content-Length: 5\r\n\r\nhello" + OK
         + EMPTY, ok(length=5, body=b"hello", reused=False)),
    Case("garbage after the response", OK + b"Content-Length: 5\r\n\r\nhellogarbage",
         ok(length=5, body=b"hello", reused=False)),
    Case("bytes after a Connection: close response", OK + b"Connection: close\r\n"
         b"Content-Length: 5\r\n\r\nhello" + OK, ok(length=5, body=b"hello", reused=False)),
    Case("empty lines after the response (skipped)", OK + b"Content-Length: 5\r\n\r\n"
         b"hello\r\n\r\n", ok(length=5, body=b"hello")),
    Case("empty lines after an answer to HEAD (skipped)", OK + b"Content-Length: 5\r\n\r\n"
         b"\r\n", ok(headers={b"Content-Length": [b"5"]}), method=b"HEAD"),
    # Limits.
    Case("a field over 64 KiB", OK + b"X-Big: " + b"a" * MAX_HEAD + b"\r\n" + EMPTY, REFUSED),
    Case("a head over 64 KiB in 250 fields",
         OK + b"".join(b"X-Field-%03d: %s\r\n" % (i, b"v" * 300) for i in range(250)) + EMPTY,
         REFUSED),
    Case("a head over 64 KiB that never ends", OK + b"X-Big: " + b"a" * MAX_HEAD, REFUSED),
    Case("a reason phrase over 64 KiB", b"HTTP/1.1 200 " + b"a" * MAX_HEAD + b"\r\n" + EMPTY,
         REFUSED),
    Case(f"{MAX_FIELDS} fields", _many_fields(MAX_FIELDS),
         ok(headers={b"X-Field-%d" % i: [b"%d" % i] for i in range(MAX_FIELDS - 1)})),
    Case(f"{MAX_FIELDS + 1} fields", _many_fields(MAX_FIELDS + 1), REFUSED),
    Case("a trailer over 64 KiB", CHUNKED + b"0\r\nX-T: " + b"t" * MAX_HEAD + b"\r\n\r\n",
         broken()),
    Case(f"{MAX_FIELDS + 1} trailer fields",
         CHUNKED + b"0\r\n" + b"".join(b"X-T%d: t\r\n" % i for i in range(MAX_FIELDS + 1))
         + b"\r\n", broken()),
    Case("a chunk extension over 64 KiB (skipped, never kept)",
         CHUNKED + b"5;e=" + b"x" * MAX_HEAD + b"\r\nhello\r\n0\r\n\r\n",
         ok(length=U, body=b"hello")),
    # Interim responses.
    Case("100 Continue, then the response", b"HTTP/1.1 100 Continue\r\n\r\n" + OK
         + b"Content-Length: 5\r\n\r\nhello", ok(length=5, body=b"hello")),
    Case("103 with fields, then the response", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n"
         b"\r\nHTTP/1.1 102 Processing\r\n\r\n" + OK + b"X-A: 1\r\n" + EMPTY,
         ok(headers={b"X-A": [b"1"]})),
    Case("an interim response with a Content-Length", b"HTTP/1.1 100 Continue\r\n"
         b"Content-Length: 5\r\n\r\n" + OK + EMPTY, ok()),
    Case("an HTTP/1.0 interim response", b"HTTP/1.0 100 Continue\r\n\r\n" + OK + EMPTY, ok()),
    Case("16 interim responses", b"HTTP/1.1 100 Continue\r\n\r\n" * 16 + OK + EMPTY, ok()),
    Case("17 interim responses", b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + OK + EMPTY, REFUSED),
    Case("101 Switching Protocols", b"HTTP/1.1 101 Switching Protocols\r\n\r\nxyz", REFUSED),
    Case("101 with Upgrade", b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
         b"Upgrade: h2c\r\n\r\nxyz", REFUSED),
    Case("RTSP after an interim response", b"HTTP/1.1 100 Continue\r\n\r\nRTSP/1.1 200 OK\r\n"
         + EMPTY, REFUSED),
    Case("bare LF after an interim response", b"HTTP/1.1 100 Continue\r\n\n" + OK + EMPTY,
         REFUSED),
    # Responses without a body.
    Case("204 with a Content-Length", b"HTTP/1.1 204 No Content\r\nContent-Length: 42\r\n\r\n",
         ok(204, phrase=b"No Content")),
    Case("304 with a Content-Length", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n"
         b"\r\n", ok(304, phrase=b"Not Modified")),
    Case("204 with Transfer-Encoding", b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: "
         b"chunked\r\n\r\n", ok(204, phrase=b"No Content")),
    Case("304 followed by bytes", b"HTTP/1.1 304 Not Modified\r\n\r\nhello",
         ok(304, phrase=b"Not Modified", reused=False)),
    Case("HEAD with a Content-Length", OK + b"Content-Length: 42\r\n\r\n",
         ok(headers={b"Content-Length": [b"42"]}), method=b"HEAD"),
    Case("HEAD with Transfer-Encoding", OK + b"Transfer-Encoding: chunked\r\n\r\n", ok(),
         method=b"HEAD"),
    Case("HEAD without a length", OK + b"X-A: 1\r\n\r\n", ok(headers={b"X-A": [b"1"]}),
         method=b"HEAD"),
    Case("HEAD answered with a body", OK + b"Content-Length: 5\r\n\r\nhello",
         ok(headers={b"Content-Length": [b"5"]}, reused=False), method=b"HEAD"),
    Case("HEAD answered with a chunked body", CHUNKED + b"5\r\nhello\r\n0\r\n\r\n",
         ok(reused=False), method=b"HEAD"),
    Case("HEAD in HTTP/1.0", b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
         ok(headers={b"Content-Length": [b"5"]}, reused=False), method=b"HEAD"),
    Case("HEAD in HTTP/1.0 with keep-alive", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
         b"Content-Length: 5\r\n\r\n", ok(headers={b"Content-Length": [b"5"]}), method=b"HEAD"),
    Case("HEAD with Connection: close", OK + b"Connection: close\r\nContent-Length: 5\r\n\r\n",
         ok(headers={b"Content-Length": [b"5"]}, reused=False), method=b"HEAD"),
    Case("HEAD after an interim response", b"HTTP/1.1 100 Continue\r\n\r\n" + OK
         + b"Content-Length: 5\r\n\r\n", ok(headers={b"Content-Length": [b"5"]}),
         method=b"HEAD"),
    # The connection closing midway.
    Case("a head cut short", OK + b"Content-Len", Seen("lost"), close=True),
    Case("a body shorter than its Content-Length", OK + b"Content-Length: 10\r\n\r\nhello",
         ok(length=10, body=b"hello", end="cut", reused=False), close=True),
    Case("a chunked body cut short", CHUNKED + b"5\r\nhel",
         ok(length=U, body=b"hel", end="cut", reused=False), close=True),
    Case("a chunked body cut before its trailers end", CHUNKED + b"0\r\nX-T: 1\r\n",
         ok(length=U, end="cut", reused=False), close=True),
]  # fmt: skip


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_the_corpus_as_the_caller_gets_it(case: Case) -> None:
    assert deliver([case.answer], case.method, case.close) == case.expected


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_a_byte_at_a_time_or_all_after_a_first_byte_gives_the_same(case: Case) -> None:
    """A byte at a time; and one byte (held: no line feed yet), then everything else."""
    answer = case.answer
    pieces = [answer[i : i + 1] for i in range(len(answer))]
    assert deliver(pieces, case.method, case.close) == case.expected
    assert deliver([answer[:1], answer[1:]], case.method, case.close) == case.expected


# One test over the whole corpus: pytest-twisted cannot run a parametrized hypothesis test.
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_split_gives_the_same(data: st.DataObject) -> None:
    for case in CORPUS:
        answer = case.answer
        cuts = data.draw(
            st.lists(st.integers(1, len(answer) - 1), unique=True, max_size=40).map(sorted),
            label=case.name,
        )
        pieces = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)], strict=True)]
        assert deliver(pieces, case.method, case.close) == case.expected, case.name


def test_the_corpus_covers_what_the_issue_lists() -> None:
    names = " | ".join(case.name for case in CORPUS)
    for topic in ["bare LF", "chunk size", "obs-fold", "Content-Length and Transfer-Encoding",
                  "Content-Length twice", "coding", "NUL", "over 64 bits", "over 64 KiB",
                  f"{MAX_FIELDS + 1} fields", "interim", "101", "204", "304",
                  "HEAD with a Content-Length", "until the connection closes", "C0 control",
                  "in a trailer", "CR CR LF", "in a chunk extension", "VT", "FF"]:  # fmt: skip
        assert topic in names, topic


def test_a_head_refused_for_size_is_refused_before_it_ends() -> None:
    """Bytes of a head that never ends are not kept beyond MAX_HEAD."""
    client = BackendClient(task.Clock(), 5.0)
    client.pool.dialled(WHERE)
    connection = Connection(client.pool, WHERE)
    transport = StringTransport()
    connection.makeConnection(transport)
    client.pool.release(connection)
    failures: list[Failure] = []
    client.send(Where, b"GET", b"/", [(b"Host", b"h")], None, print, failures.append)
    start = OK + b"X-Big: "
    connection.dataReceived(start)
    left = MAX_HEAD - len(start)
    while left:
        connection.dataReceived(b"a" * min(left, 1000))
        left -= min(left, 1000)
    assert not failures and not transport.disconnecting
    connection.dataReceived(b"a")
    assert failures and isinstance(failures[0].value, ResponseFailed)
    assert failures[0].value.reasons[0].check(BadMessage)
    assert transport.disconnecting


# -- the reader on its own ---------------------------------------------------------------------


class Events:
    """A :class:`ResponseConsumer` that lists what it is told, in order."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def response_head(self, head: Head) -> None:
        self.seen.append((head.code, head.framing.name, head.length, head.keep_alive))

    def response_data(self, data: bytes) -> None:
        self.seen.append(data)

    def response_complete(self, reusable: bool) -> None:
        self.seen.append(("complete", reusable))


def test_one_reader_reads_the_responses_of_a_connection_in_turn() -> None:
    """A HEAD answer leaves llhttp expecting a body: the next response gets a fresh parser."""
    events = Events()
    reader = ResponseReader(events)
    exchanges = [
        (False, OK + b"Content-Length: 2\r\n\r\nhi"),
        (True, OK + b"Content-Length: 42\r\n\r\n"),
        (False, CHUNKED + b"2\r\nhi\r\n0\r\n\r\n"),
        (True, b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"Transfer-Encoding: chunked\r\n\r\n"),
        (False, b"HTTP/1.1 204 No Content\r\n\r\n"),
        (False, OK + b"Connection: close\r\nContent-Length: 2\r\n\r\nhi"),
    ]
    for head_request, answer in exchanges:
        reader.expect(head_request)
        reader.feed(answer)
    assert events.seen == [
        (200, "LENGTH", 2, True), b"hi", ("complete", True),
        (200, "NONE", 42, True), ("complete", True),
        (200, "CHUNKED", None, True), b"hi", ("complete", True),
        (200, "NONE", None, True), ("complete", True),
        (204, "NONE", None, True), ("complete", True),
        (200, "LENGTH", 2, False), b"hi", ("complete", False),
    ]  # fmt: skip
    with pytest.raises(BadMessage):
        reader.feed(b"HTTP/1.1 200 OK\r\n")  # nothing was asked


def test_what_a_consumer_raises_comes_out_of_feed_and_parsing_stops() -> None:
    class Raising(Events):
        def response_data(self, data: bytes) -> None:
            super().response_data(data)
            raise ValueError("the reader broke")

    events = Raising()
    reader = ResponseReader(events)
    reader.expect(False)
    with pytest.raises(ValueError, match="the reader broke"):
        reader.feed(CHUNKED + b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n")
    reader.feed(b"more")
    assert events.seen == [(200, "CHUNKED", None, True), b"a"]


def test_abandon_stops_delivery_within_a_read() -> None:
    class Abandoning(Events):
        def response_data(self, data: bytes) -> None:
            super().response_data(data)
            reader.abandon()

    events = Abandoning()
    reader = ResponseReader(events)
    reader.expect(False)
    reader.feed(CHUNKED + b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n")
    assert events.seen == [(200, "CHUNKED", None, True), b"a"]
    assert not reader.connection_lost()


def test_llhttp_behaves_as_the_reader_assumes() -> None:
    """What the reader relies on (or works around) in llhttp 9 through httptools: if an
    upgrade changes one, this says which."""

    class Seen:
        def __init__(self) -> None:
            self.events: list[Any] = []
            self.parser = httptools.HttpResponseParser(self)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.events.append(value)

        def on_headers_complete(self) -> None:
            self.events.append(("keep-alive", self.parser.should_keep_alive()))

        def on_chunk_header(self) -> None:
            self.events.append("chunk")

        def on_body(self, data: bytes) -> None:
            self.events.append(data)

        def on_message_complete(self) -> None:
            self.events.append("complete")

    def parse(data: bytes) -> Seen:
        seen = Seen()
        seen.parser.feed_data(data)
        return seen

    for refused in [
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",  # bare LF
        OK + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",  # CL and TE
        OK + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\n",  # repeated, equal
        OK + b"X: a\r\n b\r\n\r\n",  # obs-fold
    ]:
        with pytest.raises(httptools.HttpParserError):
            parse(refused)
    # Bodiless: 1xx, 204 and 304 whatever their fields say; not an answer to HEAD.
    assert parse(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n").events[-1] == (
        "complete"
    )
    assert "complete" not in parse(OK + b"Content-Length: 5\r\n\r\n").events
    # Keep-alive is known in on_headers_complete only: after the message it is reset.
    seen = parse(OK + EMPTY)
    assert ("keep-alive", True) in seen.events and not seen.parser.should_keep_alive()
    # Trailing whitespace stays in a value; a tab after chunked makes it another coding.
    assert parse(OK + b"X: a \r\n" + EMPTY).events[0] == b"a "
    assert "chunk" not in parse(OK + b"Transfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n").events
    # Status lines a proxy must not take; empty lines before a message skipped.
    for taken in [b"RTSP/1.0 200 OK\r\n" + EMPTY, b"HTTP/2.0 200 OK\r\n" + EMPTY,
                  b"HTTP/1.1 200 O\x01K\r\n" + EMPTY, b"\r\n\r\n" + OK + EMPTY]:  # fmt: skip
        assert parse(taken).events[-1] == "complete", taken


# -- differential: h11 ------------------------------------------------------------------------


_LINE_END_RULES = ("Missing expected CR", "Missing expected LF", "Expected LF after",
                   "Expected CRLF", "Invalid header field char", "Invalid response status",
                   "Invalid character in chunk size", "Invalid header token",
                   "Invalid header value char")  # fmt: skip
_VERSION_RULES = ("not an HTTP/1.x response", "Invalid HTTP version", "Invalid major version",
                  "Invalid minor version")  # fmt: skip
#: Where we refuse what h11 accepts, on purpose.
WE_REFUSE = [
    Difference(
        "bare LF (or CR) line ends: RFC 9112 §2.2 lets a recipient accept them; a proxy that "
        "does reads a framing its peers may not (response splitting)",
        _LINE_END_RULES,
        search(rb"\r(?!\n)|(?<!\r)\n"),
    ),
    Difference(
        "obs-fold: h11 unfolds it; RFC 9112 §5.2 lets a proxy refuse it instead",
        (
            "Unexpected whitespace after header value",
            "Unexpected space after start line",
            "Invalid header value char",
        ),
        search(rb"\n[ \t]"),
    ),
    Difference(
        "Content-Length with Transfer-Encoding: h11 ignores the length; together they are a "
        "smuggling attempt or a broken server (RFC 9112 §6.3)",
        ("Content-Length can't be present", "Transfer-Encoding can't be present"),
    ),
    Difference(
        "Content-Length repeated or as a list, even of equal values (h11 merges equal ones)",
        ("Duplicate Content-Length", "Invalid character in Content-Length"),
        search(rb"(?is)content-length:[^\n]*,|content-length:.*content-length:"),
    ),
    Difference(
        "whitespace after a chunk size (h11 skips it)",
        ("Invalid character in chunk size",),
        search(rb"\n[0-9a-fA-F]+[ \t]"),
    ),
    Difference(
        "control characters (DEL among them) in field values or the reason phrase, which the "
        "gateway copies into its own status line (h11 accepts them)",
        ("Invalid header value char", "invalid reason phrase"),
        search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"),
    ),
    Difference(
        "HTTP versions but 1.0 and 1.1 in a status line (h11 accepts any digit.digit)",
        _VERSION_RULES,
        search(rb"HTTP/(?!1\.[01] )"),
    ),
    Difference(
        "a tab after a coding: llhttp reads `chunked` and a tab as another coding (so until "
        "the connection closes), RFC 9112 as chunked; we refuse what the two would frame "
        "differently",
        ("invalid Transfer-Encoding",),
        search(rb"(?i)transfer-encoding:[^\n]*\t"),
    ),
    Difference(
        "chunk extensions: llhttp checks their syntax (tokens, quoted strings), h11 skips "
        "anything up to the line end",
        ("chunk extension",),
        search(rb"\n[0-9a-fA-F]+;"),
    ),
    Difference(
        "a Content-Length over 2**64 - 1 (h11 takes any size)",
        ("Content-Length overflow",),
        search(rb"(?i)content-length:[ \t]*[0-9]{20}"),
    ),
    Difference(
        "limits h11 does not have, or has larger: fields, interim responses, head size",
        ("more than", "larger than"),
    ),
]
#: Where h11 refuses what we accept, on purpose.
H11_REFUSES = [
    Difference(
        "codings besides chunked: RFC 9112 §6.3 frames them (chunked last: chunked; else until "
        "the connection closes), as the previous client did",
        ("Only Transfer-Encoding: chunked is supported", "multiple Transfer-Encoding headers"),
    ),
    Difference(
        "empty lines (or a lone CR) before a status line: llhttp skips them between messages "
        "(RFC 9112 §2.2), and so do we before the first, so that where reads split does not "
        "change what a response means",
        ("no response line received", "illegal status line: bytearray(b'\\r"),
        search(rb"(?:^|\r\n\r\n)[\r\n]"),
    ),
]


class Record:
    """A :class:`ResponseConsumer` that writes down what it is told."""

    def __init__(self) -> None:
        self.head: Head | None = None
        self.body = bytearray()
        self.complete = False

    def response_head(self, head: Head) -> None:
        self.head = head

    def response_data(self, data: bytes) -> None:
        self.body += data

    def response_complete(self, reusable: bool) -> None:
        self.complete = True


def ours(method: bytes, wire: bytes) -> tuple[Verdict, str]:
    """Our reader's verdict on ``wire`` followed by a clean close, and its reason if refused."""
    record = Record()
    reader = ResponseReader(record)
    reader.expect(method == b"HEAD")
    why = ""
    try:
        reader.feed(wire)
        if not record.complete and reader.connection_lost():
            record.complete = True
    except BadMessage as e:
        why = str(e)
    head = record.head
    if head is None:
        return ("refused",), why
    fields = _lower_codings(head.fields)
    if not record.complete:
        return ("failed", head.minor, head.code, head.phrase, fields), why
    return ("complete", head.minor, head.code, head.phrase, fields, bytes(record.body)), why


def theirs(method: bytes, wire: bytes) -> tuple[Verdict, str]:
    """h11's client verdict on ``wire`` (after the request it answers) and a clean close."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"backend")]))
    conn.send(h11.EndOfMessage())
    head: h11.Response | None = None
    body = bytearray()
    try:
        conn.receive_data(wire)
        conn.receive_data(b"")
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif not isinstance(event, h11.InformationalResponse):
                raise AssertionError(f"h11 said {event!r} before the end of the response")
    except h11.RemoteProtocolError as e:
        if head is None:
            return ("refused",), str(e)
        return ("failed", *_h11_head(head)), str(e)
    assert head is not None
    return ("complete", *_h11_head(head), bytes(body)), ""


def _h11_head(head: h11.Response) -> tuple[Any, ...]:
    fields = _lower_codings([(bytes(n), bytes(v)) for n, v in head.headers.raw_items()])
    return int(head.http_version[2:]), head.status_code, bytes(head.reason), fields


def _lower_codings(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """h11 lower-cases Transfer-Encoding values (codings are case-insensitive); we keep them
    as sent: compare them lower-cased."""
    return [(n, v.lower() if n.lower() == b"transfer-encoding" else v) for n, v in fields]


# Strategies: responses as a well-behaved server writes them, then mutated.
_names = (
    st.text(TCHAR, min_size=1, max_size=10)
    .map(str.encode)
    .filter(lambda n: n.lower() not in (b"content-length", b"transfer-encoding", b"connection"))
)
_INTERESTING = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b",", b";", b"\x00", b"\x7f", b"\x80",
                b"\x01", b"\x0b", b"\x0c",
                b"0", b"5", b"a", b"-", b"H", b"\r\n ", b"\r\n\r\n"]  # fmt: skip
_LINES = [b"Content-Length: 0", b"Content-Length: 5", b"Transfer-Encoding: chunked",
          b"Transfer-Encoding: gzip", b"Connection: close", b"Connection: keep-alive",
          b" folded", b"X-Dup: 1", b"HTTP/1.1 100 Continue"]  # fmt: skip


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes]:
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD"]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    out = bytearray()
    for status in draw(st.lists(st.sampled_from([b"100 Continue", b"103 Early"]), max_size=2)):
        out += b"HTTP/1.1 " + status + b"\r\n\r\n"
    code = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 500, 503, 599]))
    phrase = draw(st.sampled_from([b" OK", b" Whatever It Is", b"", b" ", b" caf\xc3\xa9"]))
    out += b"HTTP/%s %d%s\r\n" % (version, code, phrase)
    for name, value in draw(st.lists(st.tuples(_names, values), max_size=4)):
        out += name + b": " + value + b"\r\n"
    connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"keep-alive, X-Hop"]))
    if connection is not None:
        out += b"Connection: " + connection + b"\r\n"
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    body = draw(st.binary(max_size=40))
    bodiless = method == b"HEAD" or code in (204, 304)
    if framing == "length":
        out += b"Content-Length: %d\r\n\r\n" % len(body)
        if not bodiless:
            out += body
    elif framing == "chunked":
        out += b"Transfer-Encoding: chunked\r\n\r\n"
        if not bodiless:
            rest = body
            while rest:
                size = draw(st.integers(1, len(rest)))
                extension = draw(st.sampled_from([b"", b";a=b", b';q="x y"']))
                out += b"%x%s\r\n%s\r\n" % (size, extension, rest[:size])
                rest = rest[size:]
            out += b"0\r\n"
            for name, value in draw(st.lists(st.tuples(_names, values), max_size=2)):
                out += name + b": " + value + b"\r\n"
            out += b"\r\n"
    else:
        out += b"\r\n"
        if not bodiless:
            out += body
    return method, bytes(out)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes]:
    method, wire = draw(responses())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(wire)))
        how = draw(st.sampled_from(["insert", "replace", "delete", "line", "drop CR"]))
        if how == "insert":
            wire = wire[:at] + draw(st.sampled_from(_INTERESTING)) + wire[at:]
        elif how == "replace":
            wire = wire[:at] + draw(st.sampled_from(_INTERESTING)) + wire[at + 1 :]
        elif how == "delete":
            wire = wire[:at] + wire[at + 1 :]
        elif how == "line":  # a whole line after some line end
            end = wire.find(b"\r\n", at)
            if end >= 0:
                wire = wire[: end + 2] + draw(st.sampled_from(_LINES)) + b"\r\n" + wire[end + 2 :]
        else:
            cr = wire.find(b"\r", at)
            if cr >= 0:
                wire = wire[:cr] + wire[cr + 1 :]
    return method, wire


def _compare(method: bytes, wire: bytes) -> None:
    our, our_why = ours(method, wire)
    their, their_why = theirs(method, wire)
    if our != their:
        assert explained(wire, (our, our_why), (their, their_why), WE_REFUSE, H11_REFUSES), (
            f"{method!r} {wire!r}\n ours:  {our} ({our_why})\n h11:   {their} ({their_why})"
        )


@settings(max_examples=400, deadline=None)
@given(responses())
def test_well_formed_responses_get_the_same_verdict_as_from_h11(sent: tuple[bytes, bytes]) -> None:
    _compare(*sent)


@settings(max_examples=1500, deadline=None)
@given(mutated())
def test_mutated_responses_get_the_same_verdict_as_from_h11(sent: tuple[bytes, bytes]) -> None:
    _compare(*sent)


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_the_corpus_gets_the_same_verdict_as_from_h11(case: Case) -> None:
    _compare(case.method, case.answer)


# -- work -------------------------------------------------------------------------------------


class CountingParser(httptools.HttpResponseParser):
    """llhttp, counting what it is handed."""

    calls = 0
    fed = 0

    def feed_data(self, data: Any) -> None:
        CountingParser.calls += 1
        CountingParser.fed += len(data)
        super().feed_data(data)


def _count(head: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, float]:
    """Feed ``head`` to a reader a byte at a time: llhttp's calls, bytes, and the CPU time."""
    monkeypatch.setattr(response_module, "HttpResponseParser", CountingParser)
    record = Record()
    reader = ResponseReader(record)
    reader.expect(False)
    CountingParser.calls = CountingParser.fed = 0
    started = time.process_time()
    for i in range(len(head)):
        reader.feed(head[i : i + 1])
    spent = time.process_time() - started
    assert record.complete
    return CountingParser.calls, CountingParser.fed, spent


@pytest.mark.parametrize("size", [8 * 1024, 32 * 1024])
def test_a_head_fed_a_byte_at_a_time_costs_linear_work(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llhttp gets every byte once, in one call per line at most: httptools joins the pieces of
    a field by copying, so a field in n pieces would cost n times its size."""
    one_field = OK + b"X-Big: " + b"v" * size + b"\r\n" + EMPTY
    calls, fed, spent = _count(one_field, monkeypatch)
    assert fed == len(one_field)
    assert calls <= one_field.count(b"\n") + 1
    many = OK + b"X-F: %s\r\n" % (b"v" * 200) * (size // 207) + EMPTY
    calls, fed, _ = _count(many, monkeypatch)
    assert fed == len(many)
    assert calls <= many.count(b"\n") + 1
    print(f"\n{size // 1024} KiB head, one byte a read: {spent * 1000:.1f} ms CPU")


def test_the_work_for_a_head_grows_linearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted, not timed: 4 times the head, at most 4 times (plus slack) the work."""
    work = []
    for size in (8 * 1024, 32 * 1024):
        head = OK + b"X-Big: " + b"v" * size + b"\r\n" + b"X-F: 1\r\n" * (size // 256) + EMPTY
        calls, fed, _ = _count(head, monkeypatch)
        work.append(calls * 64 + fed)
    assert work[1] / work[0] < 4 * 1.5


def test_report_the_cpu_time_of_a_megabyte_in_one_byte_reads() -> None:
    """Reported (run with -s), not asserted: a 1 MB body in one-byte reads, through the reader
    alone and through the backend client's connection."""
    size = 1024 * 1024
    for framing, head in [
        ("Content-Length", OK + b"Content-Length: %d\r\n\r\n" % size),
        ("until close", OK + b"\r\n"),
    ]:
        record = Record()
        reader = ResponseReader(record)
        reader.expect(False)
        reader.feed(head)
        byte = b"x"
        started = time.process_time()
        for _ in range(size):
            reader.feed(byte)
        reader_time = time.process_time() - started
        assert len(record.body) == size
        started = time.process_time()
        seen = deliver([head] + [byte] * size)
        connection_time = time.process_time() - started
        assert len(seen.body) == size
        print(
            f"\n1 MB of one-byte reads, {framing}: reader {reader_time:.2f} s CPU, "
            f"backend client with a body reader {connection_time:.2f} s CPU"
        )


# -- end to end: what the gateway's client gets --------------------------------------------------


class FixedAnswer(Protocol):
    """A backend that answers every request it reads (any head ending in an empty line) with
    the same bytes."""

    answer = b""

    def dataReceived(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):
            self.transport.write(self.answer)  # type: ignore[union-attr]


@attrs.define
class Gateway:
    daemon: Daemon
    backend: IListeningPort

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.address.port}"


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    body = b'{"version":"0.32.15"}'
    FixedAnswer.answer = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nX-Kept: 2\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    factory = Factory.forProtocol(FixedAnswer)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    daemon = await start_daemon(tmp_path)
    http = Http.to(daemon)
    number = port.getHost().port  # type: ignore[attr-defined]
    record = {"Identifier": "fixed", "Hostname": "127.0.0.1", "Port": number}
    assert (await http.put("/v1.0/backends", record)).status == 201
    assert (await http.put("/v1.0/frontends/frontend1", {"Backends": ["fixed"]})).status == 200
    state = daemon.runtime.state("fixed")
    if not state.healthy:
        state.succeeded(daemon.now(), threshold=1)
    yield Gateway(daemon, port)
    await daemon.stopService()
    await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_fields_a_backend_connection_names_never_reach_the_client(gateway: Gateway) -> None:
    for method in ("GET", "HEAD"):
        response = await treq.request(method, gateway.url + "/api/version", persistent=False)
        body = await response.content()
        assert response.code == 200
        headers = response.headers
        assert not headers.hasHeader(b"x-secret"), method
        assert not headers.hasHeader(b"keep-alive"), method
        assert headers.getRawHeaders(b"x-kept") == [b"2"], method
        assert headers.getRawHeaders(b"x-ollamaflow-backend") == [b"fixed"], method
        assert body == (b'{"version":"0.32.15"}' if method == "GET" else b"")
