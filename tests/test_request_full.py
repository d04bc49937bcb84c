"""LogRequestFull: the access log records the client's request head (method, target, header
fields) when the frontend or a backend asks, credentials redacted, cut at a documented bound;
and the body flags' bound (64 KiB) shows as a marker when a body is longer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest_twisted
import test_logs
from harness import TOKEN, until
from hypothesis import assume, given
from hypothesis import strategies as st
from test_logs import Captured, access, serve, written
from twisted.logger import Logger

from ollamaflow.credentials import NO_TOKENS, Tokens
from ollamaflow.daemon import Daemon
from ollamaflow.gateway.completed import LOGGED_BODY_BYTES, logged_text
from ollamaflow.gateway.requesthead import (
    LOGGED_HEAD_BYTES,
    known_secrets,
    logged_head,
    request_head,
    secret_name,
)
from ollamaflow.logs import observer_for
from ollamaflow.records import Backend, Frontend
from ollamaflow.settings import LogFormat, Logging
from ollamaflow.sim import SimConfig

ADMIN = b"admin-s3cret"
captured = test_logs.captured  # the fixture: every log event of the process, as JSON and text


def head(fields: list[tuple[bytes, bytes]], target: bytes = b"/api/chat", *secrets: bytes) -> str:
    return request_head(b"POST", target, b"HTTP/1.1", fields, secrets)


# -- the head, and what is redacted ----------------------------------------------------------------


def test_the_head_is_the_request_line_and_fields_in_order() -> None:
    fields = [(b"Host", b"flow:43411"), (b"User-Agent", b"curl/8"), (b"X-Thread-Id", b"t1")]
    assert head(fields, b"/api/chat?stream=1") == (
        "POST /api/chat?stream=1 HTTP/1.1\nHost: flow:43411\nUser-Agent: curl/8\nX-Thread-Id: t1"
    )


def test_credentials_are_redacted_by_name() -> None:
    fields = [
        (b"Authorization", b"Bearer sk-client"),
        (b"proxy-authorization", b"Basic dXNlcjpwYXNz"),
        (b"Cookie", b"session=abc"),
        (b"X-Api-Key", b"k1"),
        (b"Api-Key", b"k2"),
        (b"X-Auth-Token", b"k3"),
        (b"OpenAI-Api-Key", b"k4"),
        (b"X-Client-Secret", b"k5"),
        (b"Authorization", b"sk-no-scheme"),
        (b"Accept", b"application/json"),
    ]
    assert head(fields).splitlines()[1:] == [
        "Authorization: Bearer [redacted]",
        "proxy-authorization: Basic [redacted]",
        "Cookie: [redacted]",
        "X-Api-Key: [redacted]",
        "Api-Key: [redacted]",
        "X-Auth-Token: [redacted]",
        "OpenAI-Api-Key: [redacted]",
        "X-Client-Secret: [redacted]",
        "Authorization: [redacted]",
        "Accept: application/json",
    ]


def test_a_value_holding_a_known_secret_is_redacted_whatever_its_name() -> None:
    fields = [(b"X-Note", ADMIN), (b"X-Other", b"prefix " + ADMIN + b" suffix"), (b"X-Ok", b"x")]
    assert head(fields, b"/", ADMIN).splitlines()[1:] == [
        "X-Note: [redacted]",
        "X-Other: [redacted]",
        "X-Ok: x",
    ]


def test_credentials_in_the_query_are_redacted() -> None:
    target = b"/v1/chat?key=AIza1&api_key=k2&access_token=t3&stream=true&note=" + ADMIN + b"&flag"
    assert head([], target, ADMIN).splitlines()[0] == (
        "POST /v1/chat?key=[redacted]&api_key=[redacted]&access_token=[redacted]&stream=true"
        "&note=[redacted]&flag HTTP/1.1"
    )
    assert ADMIN.decode() not in head([], b"/x/" + ADMIN, ADMIN)


def test_secret_names() -> None:
    for name in (b"Authorization", b"COOKIE", b"x-api-key", b"Api-Key", b"key", b"apikey"):
        assert secret_name(name), name
    for name in (b"Host", b"Content-Type", b"X-Conversation-Id", b"keep_alive", b"monkey"):
        assert not secret_name(name), name


def test_known_secrets_are_ours_and_the_backends_credentials() -> None:
    backends = [
        Backend(
            identifier="b1",
            bearer_token="b1-token",
            headers={"X-Api-Key": "b1-key", "X-Org": "acme"},
            querystring="api-version=2024&key=b1-query",
        ),
        Backend(identifier="b2"),
    ]
    secrets = known_secrets(Tokens.of(["admin"], [None, "metrics"]), backends)
    assert set(secrets) == {b"admin", b"metrics", b"b1-token", b"b1-key", b"b1-query"}


def test_the_head_is_cut_at_its_bound_with_a_marker() -> None:
    assert LOGGED_HEAD_BYTES == LOGGED_BODY_BYTES == 65536
    fields = [(b"X-Filler-%d" % i, b"f" * 1000) for i in range(100)]
    text = head(fields)
    full = len("POST /api/chat HTTP/1.1") + sum(len(": \n") + 11 + 1000 for _ in fields) + 90
    kept, _, marker = text.rpartition("...[")
    assert len(kept) == LOGGED_HEAD_BYTES
    assert marker.endswith(" more bytes]") and int(marker.split()[0]) > full - 70_000 - 200


def test_odd_bytes_in_a_head_are_text_one_for_one() -> None:
    text = head([(b"X-Bin", bytes(range(256)))])
    assert text.endswith("X-Bin: " + bytes(range(256)).decode("latin-1"))


SECRET = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=20)
FIELD = st.tuples(
    st.binary(min_size=1, max_size=20).filter(lambda n: b":" not in n),
    st.binary(max_size=60),
)


@given(SECRET, st.lists(FIELD, max_size=8), st.lists(st.integers(0, 7), max_size=4), st.data())
def test_a_known_secret_never_reaches_the_head(
    secret: str, fields: list[tuple[bytes, bytes]], where: list[int], data: st.DataObject
) -> None:
    token = secret.encode()
    assume(fields and not any(token in name for name, _ in fields))
    for i in where:
        name, value = fields[i % len(fields)]
        cut = data.draw(st.integers(0, len(value)))
        fields[i % len(fields)] = (name, value[:cut] + token + value[cut:])
    query = data.draw(st.sampled_from([b"/p", b"/p?q=" + token, b"/p?a=1&b=x" + token + b"y"]))
    assert secret not in head(fields, query, token)


# -- when it is recorded ---------------------------------------------------------------------------


class Request:
    """What :func:`logged_head` reads of a ClientRequest."""

    method = b"GET"
    uri = b"/api/tags?key=k"
    clientproto = b"HTTP/1.1"
    headers = [(b"Authorization", b"Bearer b2-token"), (b"X-Echo", b"b2-token")]


def test_only_when_the_frontend_or_a_backend_tried_asks() -> None:
    backends = {
        "quiet": Backend(identifier="quiet"),
        "full": Backend(identifier="full", log_request_full=True, bearer_token="b2-token"),
    }
    request: Any = Request()
    frontend = Frontend(identifier="f", backends=("quiet", "full"))
    assert logged_head(request, frontend, [], NO_TOKENS, backends) is None
    assert logged_head(request, frontend, ["quiet", "gone"], NO_TOKENS, backends) is None
    assert logged_head(request, None, [], NO_TOKENS, backends) is None
    by_backend = logged_head(request, frontend, ["quiet", "full"], NO_TOKENS, backends)
    by_frontend = logged_head(
        request, Frontend(identifier="f", log_request_full=True), [], NO_TOKENS, backends
    )
    assert (
        by_backend
        == by_frontend
        == (
            "GET /api/tags?key=[redacted] HTTP/1.1\n"
            "Authorization: Bearer [redacted]\nX-Echo: [redacted]"
        )
    )


# -- in the access log ---------------------------------------------------------------------------


def test_the_access_line_has_the_head_whole_in_both_formats(tmp_path: Path) -> None:
    text = "GET /x HTTP/1.1\nHost: h\nX-Long: " + "l" * 5000 + "\x1b"

    found = written(tmp_path, lambda log: access(log, request_head=text))
    (line,) = found["text console"].splitlines()
    assert f"request_head={text!r}" in line
    assert json.loads(found["json console"])["request_head"] == text
    plain = io.StringIO()
    log = Logger(observer=observer_for(Logging(format=LogFormat.JSON), None, plain))
    access(log)
    assert "request_head" not in json.loads(plain.getvalue())


def test_logged_text_marks_what_was_left_out() -> None:
    assert logged_text(b"abc", 3) == "abc"
    assert logged_text(b"ab\xff", 10) == "ab\ufffd...[7 more bytes]"
    assert logged_text(b"\xff", 1, "latin-1") == "\xff"


# -- end to end -----------------------------------------------------------------------------------

SECRETS = ("client-s3cret", "backend-s3cret", TOKEN, "query-s3cret")


async def one_logged(
    daemon: Daemon, simulators: Any, captured: Captured, backend: dict[str, Any], **frontend: Any
) -> dict[str, Any]:
    sim = await simulators()
    client = await serve(daemon, sim.port, {"BearerToken": "backend-s3cret", **backend}, **frontend)
    headers = {"Authorization": "Bearer client-s3cret", "X-Echo": TOKEN, "X-Thread-Id": "t-7"}
    body = {"model": "llama3", "prompt": "hi", "stream": False}
    reply = await client.request("POST", "/api/generate?key=query-s3cret", body, headers=headers)
    assert reply.status == 200
    await until(lambda: captured.access())
    (line,) = captured.access()
    everything = captured.json_out.getvalue() + captured.text_out.getvalue()
    for secret in SECRETS:
        assert secret not in everything, secret
    return line


def check_head(text: str) -> None:
    lines = text.splitlines()
    assert lines[0] == "POST /api/generate?key=[redacted] HTTP/1.1"
    assert "Authorization: Bearer [redacted]" in lines
    assert "X-Echo: [redacted]" in lines  # the admin token, under a name of no meaning
    assert "X-Thread-Id: t-7" in lines and "Content-Type: application/json" in lines


@pytest_twisted.ensureDeferred
async def test_the_frontends_log_request_full(
    daemon: Daemon, simulators: Any, captured: Captured
) -> None:
    line = await one_logged(daemon, simulators, captured, {}, LogRequestFull=True)
    check_head(line["request_head"])
    assert (
        "request_head='POST /api/generate?key=[redacted] HTTP/1.1" in captured.text_out.getvalue()
    )
    assert "request_body" not in line


@pytest_twisted.ensureDeferred
async def test_a_backends_log_request_full(
    daemon: Daemon, simulators: Any, captured: Captured
) -> None:
    line = await one_logged(daemon, simulators, captured, {"LogRequestFull": True})
    check_head(line["request_head"])


@pytest_twisted.ensureDeferred
async def test_no_head_unless_asked(daemon: Daemon, simulators: Any, captured: Captured) -> None:
    line = await one_logged(daemon, simulators, captured, {})
    assert "request_head" not in line
    assert "X-Thread-Id" not in captured.json_out.getvalue()


@pytest_twisted.ensureDeferred
async def test_a_refused_request_has_its_head_too(
    daemon: Daemon, simulators: Any, captured: Captured
) -> None:
    sim = await simulators()
    client = await serve(daemon, sim.port, {}, LogRequestFull=True)
    missing = {"model": "nosuchmodel", "prompt": "hi"}
    headers = {"Authorization": "Bearer client-s3cret"}
    assert (await client.request("POST", "/api/generate", missing, headers=headers)).status == 404
    await until(lambda: captured.access())
    (line,) = captured.access()
    assert line["outcome"] == "refused"
    assert "Authorization: Bearer [redacted]" in line["request_head"].splitlines()
    assert "client-s3cret" not in captured.json_out.getvalue() + captured.text_out.getvalue()


@pytest_twisted.ensureDeferred
async def test_bodies_longer_than_the_bound_are_cut_with_a_marker(
    daemon: Daemon, simulators: Any, captured: Captured
) -> None:
    sim = await simulators(config=SimConfig(tokens=2000))
    flags = {"LogRequestBody": True, "LogResponseBody": True}
    client = await serve(daemon, sim.port, {}, **flags)
    prompt = "p" * 100_000
    generate = {"model": "llama3", "prompt": prompt}
    reply = await client.request("POST", "/api/generate", generate)
    assert reply.status == 200 and len(reply.body) > LOGGED_BODY_BYTES
    await until(lambda: captured.access())
    (line,) = captured.access()
    sent = len(json.dumps(generate).encode())
    request_body = line["request_body"]
    assert request_body.endswith(f"...[{sent - LOGGED_BODY_BYTES} more bytes]")
    assert len(request_body) == LOGGED_BODY_BYTES + len(
        f"...[{sent - LOGGED_BODY_BYTES} more bytes]"
    )
    response_body = line["response_body"]
    assert response_body.startswith(reply.body[:100].decode())
    assert response_body.endswith(f"...[{len(reply.body) - LOGGED_BODY_BYTES} more bytes]")
