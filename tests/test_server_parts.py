"""The server layer's small parts, in memory: one answer to a bug, the Date cache, the record
of a request head, and the Protocols the concrete classes must satisfy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_server import Server, get
from twisted.internet.task import Clock
from twisted.web.http import datetimeToString

from ollamaflow.server.dates import DateCache
from ollamaflow.server.failures import fail
from ollamaflow.server.interfaces import ClientRequest, RequestHandler, ResponseWriter


class Writer:
    """A ResponseWriter that records what is done to it."""

    def __init__(self, *, started: bool = False, finished: bool = False, gone: bool = False):
        self.started = started
        self.finished = finished
        self.disconnected = gone
        self.calls: list[tuple[str, Any]] = []

    def setResponseCode(self, code: int, phrase: bytes | None = None) -> None:
        self.calls.append(("code", code))

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.calls.append(("header", (name, value)))

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def finish(self) -> None:
        self.calls.append(("finish", None))

    def abort_connection(self) -> None:
        self.calls.append(("abort", None))


def test_a_bug_before_the_status_is_a_json_500_with_its_length() -> None:
    writer = Writer()
    fail(writer, b'{"error":"x"}')
    assert writer.calls == [
        ("code", 500),
        ("header", (b"Content-Type", b"application/json")),
        ("header", (b"Content-Length", b"13")),
        ("write", b'{"error":"x"}'),
        ("finish", None),
    ]


def test_a_bug_after_the_status_aborts_so_the_response_cannot_look_whole() -> None:
    writer = Writer(started=True)
    fail(writer, b"{}")
    assert writer.calls == [("abort", None)]


@pytest.mark.parametrize(("finished", "gone"), [(True, False), (False, True), (True, True)])
def test_a_bug_after_the_response_or_the_client_is_gone_does_nothing(
    finished: bool, gone: bool
) -> None:
    writer = Writer(started=True, finished=finished, gone=gone)
    fail(writer, b"{}")
    assert writer.calls == []


def test_fail_on_a_real_request_in_memory() -> None:
    def broken_after_a_header(request: ClientRequest) -> bytes:
        request.setHeader(b"Content-Length", b"999")
        raise RuntimeError("bug")

    server = Server(broken_after_a_header)
    conn = server.connect()
    conn.send(get(b"/api/tags"))
    response = conn.response()
    assert response.status == 500
    assert response.header(b"content-length") == b"%d" % len(response.body), "the 500's own"
    assert "reference" in json.loads(response.body)["error"]
    conn.send(get(b"/api/tags"))
    assert conn.response().status == 500, "the connection goes on"


def test_the_date_is_formatted_once_a_second() -> None:
    clock = Clock()
    clock.advance(1_700_000_000.2)
    dates = DateCache(clock)
    first = dates.value()
    assert first == datetimeToString(1_700_000_000)
    clock.advance(0.7)
    assert dates.value() is first, "the same second: the same bytes, not formatted again"
    clock.advance(0.2)
    assert dates.value() == datetimeToString(1_700_000_001)


def test_the_concrete_classes_satisfy_the_protocols() -> None:
    """Checked by mypy through these assignments; at run time they must hold the members."""
    server = Server()
    handler: RequestHandler = server.front_door
    conn = server.connect()
    conn.send(get(b"/api/tags"))
    request: ClientRequest = server.held
    writer: ResponseWriter = request
    assert callable(handler.body_limit) and writer.finished
    assert request.header(b"HOST") == request.header(b"host") == b"flow.example"
    assert request.header(b"x-absent") is None and request.header(b"X-Absent") is None
