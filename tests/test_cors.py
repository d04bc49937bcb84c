"""CORS: the decision (origins, preflight answers, bounds) as plain functions, the front door
answering every OPTIONS itself in memory, and the settings reaching a real daemon."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import pytest_twisted
import treq
from harness import Collect, DaemonUnderTest, Http, start_daemon, until
from hypothesis import given, settings
from hypothesis import strategies as st
from listening import stop_listening
from recorder import start_recorder
from test_server import Admin, Conn, Gateway, Server, answer, http
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import Request

from ollamaflow import cors
from ollamaflow.cors import (
    MAX_ORIGIN,
    MAX_REQUEST_HEADERS_VALUE,
    MAX_REQUESTED_HEADERS,
    OLLAMA_ORIGINS,
    ORIGIN_ENTRY,
    Glob,
    Policy,
    decide,
    requested_headers,
)
from ollamaflow.daemon import Daemon
from ollamaflow.frontdoor import FrontDoor, Root
from ollamaflow.server.acceptor import Acceptor
from ollamaflow.server.connection import HTTPConnection

EXAMPLES = settings(max_examples=300, deadline=None)

CLIENT = Policy.of().client
ADMIN = Policy.of().admin


def names(fields: cors.Fields) -> set[bytes]:
    return {name.lower() for name, _ in fields}


def value(fields: cors.Fields, name: bytes) -> bytes | None:
    found = [v for n, v in fields if n.lower() == name]
    assert len(found) <= 1
    return found[0] if found else None


# -- origins -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        b"http://localhost",
        b"https://localhost",
        b"http://localhost:3000",
        b"https://localhost:8443",
        b"http://127.0.0.1",
        b"http://127.0.0.1:5173",
        b"https://0.0.0.0:1",
        b"http://0.0.0.0",
        b"app://obsidian.md",
        b"file://",
        b"tauri://localhost",
        b"vscode-webview://1a2b3c",
        b"HTTP://LocalHost:3000",  # origins compare without case
    ],
)
def test_ollamas_default_origins_are_allowed_for_clients_and_echoed(origin: bytes) -> None:
    assert CLIENT.allow_origin(origin) == origin


@pytest.mark.parametrize(
    "origin",
    [
        b"http://example.com",
        b"http://localhost.example.com",
        b"http://127.0.0.2:80",
        b"http://evil.localhost",
        b"chrome-extension://abcdef",  # Ollama allows browser extensions only when configured
        b"null",
        b"http://localhost/",  # an Origin never has a path
        b"http://localhost:3000, http://evil.example",  # nor is a list
        b"http://localhost:3000/x",
        b"",
        b"localhost",
        b"http://localhost:" + b"1" * MAX_ORIGIN,  # too long to be looked at
    ],
)
def test_other_origins_are_not_allowed_for_clients(origin: bytes) -> None:
    assert CLIENT.allow_origin(origin) is None


def test_the_admin_api_allows_any_origin_by_default_with_a_star() -> None:
    for origin in (b"http://example.com", b"null", b"x" * 10_000, b"http://localhost:3000"):
        assert ADMIN.allow_origin(origin) == b"*"


def test_configured_origins_add_to_ollamas_and_may_use_stars() -> None:
    policy = Policy.of(
        ["https://app.example", "https://*.corp.example", "chrome-extension://*", "null"],
        admin=["https://ui.example"],
    )
    allowed = policy.client.allow_origin
    assert allowed(b"https://app.example") == b"https://app.example"
    assert allowed(b"https://APP.example") == b"https://APP.example"
    assert allowed(b"http://app.example") is None, "the scheme counts"
    assert allowed(b"https://app.example:8443") is None, "so does the port"
    assert allowed(b"https://chat.corp.example") == b"https://chat.corp.example"
    assert allowed(b"https://corp.example") is None
    assert allowed(b"chrome-extension://abc") == b"chrome-extension://abc"
    assert allowed(b"null") == b"null"
    assert allowed(b"http://localhost:3000") == b"http://localhost:3000", "Ollama's stay"
    assert policy.admin.allow_origin(b"https://ui.example") == b"https://ui.example"
    assert policy.admin.allow_origin(b"https://app.example") is None
    assert policy.admin.allow_origin(b"http://localhost:3000") is None, "not the clients' list"
    assert Policy.of(["*"]).client.allow_origin(b"https://anything.example") == b"*"


def test_ollamas_default_list_is_written_as_settings_entries() -> None:
    assert all(re.fullmatch(ORIGIN_ENTRY, entry) for entry in OLLAMA_ORIGINS)
    assert "http://localhost:*" in OLLAMA_ORIGINS and "https://0.0.0.0" in OLLAMA_ORIGINS


def _glob_regex(pattern: bytes) -> re.Pattern[bytes]:
    return re.compile(b".*".join(re.escape(part) for part in pattern.split(b"*")), re.DOTALL)


@EXAMPLES
@given(
    pattern=st.text(alphabet="ab*:", max_size=8).map(str.encode),
    origin=st.text(alphabet="ab:", max_size=12).map(str.encode),
)
def test_a_glob_matches_exactly_as_a_star_regex_would(pattern: bytes, origin: bytes) -> None:
    expected = _glob_regex(pattern).fullmatch(origin) is not None
    assert Glob(tuple(pattern.split(b"*"))).match(origin) is expected


@EXAMPLES
@given(origin=st.binary(max_size=2 * MAX_ORIGIN))
def test_any_origin_bytes_get_no_answer_or_themselves(origin: bytes) -> None:
    """Hostile input: never raises, and what is echoed is what came, allowed and bounded."""
    policy = Policy.of(["https://*.example", "*://*:*"])
    allowed = policy.client.allow_origin(origin)
    assert allowed is None or (allowed == origin and len(origin) <= MAX_ORIGIN)
    if allowed is not None:
        assert b"," not in origin and b"/" not in origin.partition(b"://")[2]


def test_matching_a_long_origin_against_many_stars_is_fast() -> None:
    """No backtracking: the pieces between stars are found once each."""
    policy = Policy.of(["http://" + "a*" * 100 + "b"])
    origin = b"http://" + b"a" * (MAX_ORIGIN - 7)
    assert policy.client.allow_origin(origin) is None


# -- requested header names ----------------------------------------------------------------------


def test_requested_headers_are_echoed_in_lower_case() -> None:
    assert requested_headers(None) == b""
    assert requested_headers(b"") == b""
    assert requested_headers(b"authorization,content-type") == b"authorization, content-type"
    assert requested_headers(b" X-Trace ,, Content-Type") == b"x-trace, content-type"


@pytest.mark.parametrize(
    ("header_value", "why"),
    [
        (b"a" * (MAX_REQUEST_HEADERS_VALUE + 1), "longer than"),
        (b",".join(b"x-h%d" % i for i in range(MAX_REQUESTED_HEADERS + 1)), "more than"),
        (b"content type", "not a list of header field names"),
        (b"x-" + b"a" * 200, "not a list of header field names"),
        (b"x(y)", "not a list of header field names"),
    ],
)
def test_requested_headers_beyond_the_bounds_are_refused(header_value: bytes, why: str) -> None:
    refused = requested_headers(header_value)
    assert isinstance(refused, str) and why in refused


@EXAMPLES
@given(st.binary(max_size=MAX_REQUEST_HEADERS_VALUE + 64))
def test_requested_headers_from_any_bytes_are_tokens_or_a_reason(header_value: bytes) -> None:
    echoed = requested_headers(header_value)
    if isinstance(echoed, bytes) and echoed:
        listed = echoed.split(b", ")
        assert len(listed) <= MAX_REQUESTED_HEADERS
        assert all(re.fullmatch(rb"[!#$%&'*+.^_`|~0-9a-z-]{1,128}", n) for n in listed)


# -- the decision ----------------------------------------------------------------------------------


def test_no_origin_is_served_as_it_is_and_options_answered_with_allow() -> None:
    assert decide(CLIENT, b"POST", None, {}, False) == cors.SERVE
    answer = decide(CLIENT, b"OPTIONS", None, {}, False)
    assert answer.status == 200
    assert value(answer.fields, b"allow") == b"GET, HEAD, POST, PUT, DELETE, OPTIONS"
    assert not any(n.startswith(b"access-control-") for n in names(answer.fields))


def test_the_servers_own_origin_is_no_cross_origin_request() -> None:
    fields = {b"host": b"flow.example:43411"}
    assert decide(CLIENT, b"POST", b"http://flow.example:43411", fields, False) == cors.SERVE
    assert decide(CLIENT, b"POST", b"https://flow.example:43411", fields, True) == cors.SERVE
    refused = decide(CLIENT, b"POST", b"https://flow.example:43411", fields, False)
    assert refused.status == 403, "another scheme is another origin"


def test_a_disallowed_origin_is_refused_403() -> None:
    decision = decide(CLIENT, b"POST", b"http://evil.example", {}, False)
    assert decision.status == 403 and decision.error == ""
    preflight = decide(
        CLIENT,
        b"OPTIONS",
        b"http://evil.example",
        {b"access-control-request-method": b"POST"},
        False,
    )
    assert preflight.status == 403


def test_an_allowed_actual_request_is_served_with_origin_and_exposed_fields() -> None:
    decision = decide(CLIENT, b"POST", b"http://localhost:3000", {}, False)
    assert decision.status is None
    assert value(decision.fields, b"access-control-allow-origin") == b"http://localhost:3000"
    exposed = value(decision.fields, b"access-control-expose-headers")
    assert exposed is not None
    assert {b"X-OllamaFlow-Request", b"X-OllamaFlow-Backend"} <= set(exposed.split(b", "))
    assert value(decision.fields, b"vary") == b"Origin"
    admin = decide(ADMIN, b"GET", b"http://anywhere.example", {}, False)
    assert value(admin.fields, b"access-control-allow-origin") == b"*"
    assert value(admin.fields, b"vary") is None, "the answer is the same for every origin"


def test_a_preflight_gets_methods_its_own_headers_and_a_max_age() -> None:
    fields = {
        b"access-control-request-method": b"POST",
        b"access-control-request-headers": b"authorization,content-type",
    }
    decision = decide(ADMIN, b"OPTIONS", b"http://ui.example", fields, False)
    assert decision.status == 200
    got = dict(decision.fields)
    assert got[b"Access-Control-Allow-Origin"] == b"*"
    assert b"POST" in got[b"Access-Control-Allow-Methods"].split(b", ")
    assert got[b"Access-Control-Allow-Headers"] == b"authorization, content-type"
    assert got[b"Access-Control-Max-Age"] == b"7200"
    assert got[b"Allow"] == cors.ALLOWED_METHODS
    assert b"Access-Control-Allow-Private-Network" not in got
    client = decide(CLIENT, b"OPTIONS", b"http://localhost:3000", fields, False)
    assert dict(client.fields)[b"Vary"] == b"Origin, Access-Control-Request-Headers"


def test_a_preflight_asking_for_a_private_network_is_told_yes_once_allowed() -> None:
    fields = {
        b"access-control-request-method": b"GET",
        b"access-control-request-private-network": b"true",
    }
    decision = decide(CLIENT, b"OPTIONS", b"http://localhost:3000", fields, False)
    assert dict(decision.fields)[b"Access-Control-Allow-Private-Network"] == b"true"
    assert decide(CLIENT, b"OPTIONS", b"http://evil.example", fields, False).status == 403


def test_a_cross_origin_options_that_is_no_preflight_is_answered_as_an_actual_request() -> None:
    decision = decide(CLIENT, b"OPTIONS", b"http://localhost:3000", {}, False)
    assert decision.status == 200
    got = dict(decision.fields)
    assert got[b"Allow"] == cors.ALLOWED_METHODS
    assert got[b"Access-Control-Allow-Origin"] == b"http://localhost:3000"
    assert b"Access-Control-Allow-Methods" not in got


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({b"access-control-request-method": b"P OST"}, "Access-Control-Request-Method"),
        ({b"access-control-request-method": b"X" * 33}, "Access-Control-Request-Method"),
        (
            {
                b"access-control-request-method": b"POST",
                b"access-control-request-headers": b"a b",
            },
            "Access-Control-Request-Headers",
        ),
    ],
)
def test_a_malformed_preflight_is_a_400_saying_why(fields: dict[bytes, bytes], why: str) -> None:
    decision = decide(ADMIN, b"OPTIONS", b"http://ui.example", fields, False)
    assert decision.status == 400 and why in decision.error


_header_names = st.sampled_from(
    [
        b"host",
        b"access-control-request-method",
        b"access-control-request-headers",
        b"access-control-request-private-network",
    ]
)


@EXAMPLES
@given(
    method=st.sampled_from([b"GET", b"POST", b"OPTIONS", b"DELETE"]),
    origin=st.none() | st.binary(max_size=64) | st.sampled_from([b"http://localhost:1", b"null"]),
    fields=st.dictionaries(_header_names, st.binary(max_size=80)),
    admin=st.booleans(),
    secure=st.booleans(),
)
def test_any_request_gets_a_decision_and_never_credentials(
    method: bytes, origin: bytes | None, fields: dict[bytes, bytes], admin: bool, secure: bool
) -> None:
    decision = decide(ADMIN if admin else CLIENT, method, origin, fields, secure)
    assert b"access-control-allow-credentials" not in names(decision.fields)
    assert decision.status in (None, 200, 400, 403)
    if method == b"OPTIONS":
        assert decision.status is not None, "every OPTIONS is answered here"
    if decision.status == 400:
        assert decision.error
    allowed = value(decision.fields, b"access-control-allow-origin")
    assert allowed in (None, b"*", origin)


# -- the front door, in memory ---------------------------------------------------------------------


def test_haproxys_options_health_check_is_200_with_allow_and_never_reaches_the_gateway() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"OPTIONS / HTTP/1.0\r\n\r\n")
    response = conn.response()
    assert response.status == 200
    assert response.header(b"allow") == cors.ALLOWED_METHODS
    assert response.header(b"content-length") == b"0"
    assert response.header(b"date")
    assert response.header(b"connection") == b"close" and conn.closed
    assert not any(n.lower().startswith(b"access-control-") for n, _ in response.headers)
    assert server.gateway.requests == []


@pytest.mark.parametrize(
    "path", [b"/", b"/api/chat", b"/v1/chat/completions", b"/v1.0/backends", b"/metrics"]
)
def test_every_options_without_origin_is_answered_here_and_the_connection_kept(
    path: bytes,
) -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"OPTIONS", path), http(b"GET", b"/api/tags"))
    options, tags = conn.responses()
    assert options.status == 200 and options.header(b"allow") == cors.ALLOWED_METHODS
    assert options.body == b""
    assert tags.status == 200 and tags.body == b"gateway GET /api/tags"
    assert [r.path for r in server.gateway.requests] == [b"/api/tags"]
    assert not conn.closed


def preflight(path: bytes, origin: bytes, method: bytes = b"POST", *more: bytes) -> bytes:
    return http(
        b"OPTIONS",
        path,
        b"Origin: " + origin,
        b"Access-Control-Request-Method: " + method,
        *more,
    )


def test_a_preflight_for_api_chat_is_answered_here_and_never_reaches_the_gateway() -> None:
    server = Server()
    conn = server.connect()
    conn.send(
        preflight(
            b"/api/chat", b"http://localhost:5173", b"POST", b"Access-Control-Request-Headers: x"
        )
    )
    response = conn.response()
    assert response.status == 200
    assert response.header(b"access-control-allow-origin") == b"http://localhost:5173"
    assert response.header(b"access-control-allow-headers") == b"x"
    assert response.header(b"access-control-allow-credentials") is None
    assert server.gateway.requests == []
    assert not conn.closed


def test_a_preflight_for_the_admin_api_needs_no_token() -> None:
    server = Server()
    conn = server.connect()
    conn.send(
        preflight(
            b"/v1.0/backends",
            b"http://ui.example",
            b"GET",
            b"Access-Control-Request-Headers: authorization",
        )
    )
    response = conn.response()
    assert response.status == 200, "no token asked"
    assert response.body == b"", "the admin API (here its stand-in) never saw it"
    assert response.header(b"access-control-allow-origin") == b"*"
    assert response.header(b"access-control-allow-headers") == b"authorization"


def test_a_disallowed_origin_is_403_with_an_empty_body_and_its_body_dropped() -> None:
    server = Server()
    conn = server.connect()
    body = json.dumps({"model": "llama3", "messages": []}).encode()
    conn.send(
        http(b"POST", b"/api/chat", b"Origin: http://evil.example", body=body),
        preflight(b"/api/chat", b"http://evil.example"),
        http(b"GET", b"/api/tags"),
    )
    refused, refused_preflight, tags = conn.responses()
    for response in (refused, refused_preflight):
        assert response.status == 403
        assert response.body == b""
        assert response.header(b"content-length") == b"0"
        assert response.header(b"access-control-allow-origin") is None
    assert tags.status == 200, "the connection goes on"
    assert [r.path for r in server.gateway.requests] == [b"/api/tags"]


def test_admin_origins_when_configured_refuse_the_others() -> None:
    server = Server()
    server.front_door.cors = Policy.of(admin=["https://ui.example"])
    conn = server.connect()
    conn.send(
        http(b"GET", b"/v1.0/backends", b"Origin: https://evil.example"),
        http(b"GET", b"/v1.0/backends", b"Origin: https://ui.example"),
    )
    refused, allowed = conn.responses()
    assert refused.status == 403 and refused.body == b""
    assert allowed.status == 200 and allowed.json()["path"] == "/v1.0/backends"
    assert allowed.header(b"access-control-allow-origin") == b"https://ui.example"
    assert allowed.header(b"vary") == b"Origin"


def test_an_allowed_client_request_reaches_the_gateway_without_its_origin() -> None:
    """The gateway answers with the CORS fields set; the backend never sees ``Origin``, so an
    Ollama there neither refuses an origin allowed here nor names it a second time."""
    server = Server()
    conn = server.connect()
    conn.send(http(b"GET", b"/api/tags", b"Origin: http://localhost:5173", b"X-App: 1"))
    response = conn.response()
    assert response.status == 200 and response.body == b"gateway GET /api/tags"
    assert response.header(b"access-control-allow-origin") == b"http://localhost:5173"
    assert response.header(b"access-control-expose-headers") == cors.EXPOSED
    assert response.header(b"vary") == b"Origin"
    (request,) = server.gateway.requests
    assert request.headers == [(b"Host", b"flow.example"), (b"X-App", b"1")]


def test_an_allowed_admin_request_is_served_with_a_star() -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"GET", b"/v1.0/x", b"Origin: https://anywhere.example"))
    response = conn.response()
    assert response.status == 200 and response.json()["path"] == "/v1.0/x"
    assert response.header(b"access-control-allow-origin") == b"*"
    assert response.header(b"access-control-allow-credentials") is None


def test_without_origin_no_response_carries_cors_fields() -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"GET", b"/api/tags"), http(b"GET", b"/v1.0/x"), http(b"GET", b"/"))
    for response in conn.responses():
        assert response.status == 200
        assert not [n for n, _ in response.headers if n.lower().startswith(b"access-control")]
        assert response.header(b"vary") is None


def test_a_same_origin_request_is_served_as_it_is() -> None:
    """Without CORS fields, and without its Origin too: a backend would judge it by its own
    Host, and refuse it as cross-origin."""
    server = Server()
    conn = server.connect()
    conn.send(http(b"POST", b"/api/chat", b"Origin: http://flow.example", body=b"{}"))
    response = conn.response()
    assert response.status == 200 and response.header(b"access-control-allow-origin") is None
    assert [n for n, _ in server.gateway.requests[0].headers] == [b"Host", b"Content-Length"]


@pytest.mark.parametrize(
    ("path", "dialect"),
    [(b"/api/chat", "error"), (b"/v1/chat/completions", "error"), (b"/v1.0/x", "Message")],
)
def test_a_malformed_preflight_is_a_400_in_the_dialect_of_its_path(
    path: bytes, dialect: str
) -> None:
    server = Server()
    conn = server.connect()
    conn.send(
        preflight(path, b"http://localhost:1", b"POST", b"Access-Control-Request-Headers: a b")
    )
    response = conn.response()
    assert response.status == 400
    assert response.header(b"content-type") == b"application/json"
    assert dialect in response.json()
    assert "Access-Control-Request-Headers" in response.body.decode()
    assert not conn.closed and server.gateway.requests == []


def test_an_options_with_a_body_is_answered_once_its_body_is_read() -> None:
    server = Server()
    conn = server.connect()
    conn.send(http(b"OPTIONS", b"/api/chat", body=b"hello"), http(b"GET", b"/api/tags"))
    options, tags = conn.responses()
    assert options.status == 200 and tags.status == 200
    assert server.gateway.bodies == [b""]


def test_a_client_that_leaves_before_the_answer_is_forgotten() -> None:
    server = Server()
    conn = server.connect()
    conn.send(b"OPTIONS /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    conn.lose()
    assert conn.transport.value() == b""
    assert server.acceptor.connections == set()


class Metrics:
    def render(self, request: Request) -> bytes:
        return b"metrics"


def test_metrics_allow_the_admin_origins() -> None:
    front_door = FrontDoor(
        Gateway(answer),
        Root(Admin(), metrics=Metrics()),
        lambda host: 1 << 20,
        cors_policy=Policy.of(admin=["https://grafana.example"]),
    )
    proto = Acceptor(front_door, Clock()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert isinstance(proto, HTTPConnection)
    transport = StringTransport()
    proto.makeConnection(transport)
    conn = Conn(proto, transport)
    conn.send(
        http(b"GET", b"/metrics", b"Origin: https://grafana.example"),
        http(b"GET", b"/metrics", b"Origin: http://localhost:3000"),
    )
    allowed, refused = conn.responses()
    assert allowed.body == b"metrics"
    assert allowed.header(b"access-control-allow-origin") == b"https://grafana.example"
    assert refused.status == 403, "Ollama's origins are the clients', not the admin's"


# -- a real daemon -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_settings_reach_the_daemons_listener(tmp_path: Path) -> None:
    daemon = await start_daemon(
        tmp_path,
        {"Cors": {"AllowedOrigins": ["https://app.example"], "AdminAllowedOrigins": []}},
    )
    try:
        anonymous = Http.to(daemon, token=None)
        app = await anonymous.request(
            "OPTIONS", "/api/chat", headers=_preflight("https://app.example")
        )
        assert app.status == 200
        assert app.headers.getRawHeaders("access-control-allow-origin") == ["https://app.example"]
        other = await anonymous.request(
            "OPTIONS", "/api/chat", headers=_preflight("https://x.example")
        )
        assert other.status == 403 and other.body == b""
        admin = await Http.to(daemon).get(
            "/v1.0/backends", headers={"Origin": "https://app.example"}
        )
        assert admin.status == 403, "an empty admin list allows no origin"
        plain = await Http.to(daemon).get("/v1.0/backends")
        assert plain.status == 200, "requests without Origin are not CORS"
    finally:
        await daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_errors_carry_the_cors_fields_so_scripts_can_read_them(daemon: Daemon) -> None:
    """A 401 from the admin API, a 400 and a 404 from the gateway: a page learns why."""
    origin = {"Origin": "http://localhost:3000"}
    anonymous = Http.to(daemon, token=None)
    unauthorized = await anonymous.get("/v1.0/backends", headers=origin)
    assert unauthorized.status == 401
    assert unauthorized.headers.getRawHeaders("access-control-allow-origin") == ["*"]
    bad = await anonymous.request("POST", "/api/chat", raw=b"{not json", headers=origin)
    assert bad.status == 400
    assert bad.headers.getRawHeaders("access-control-allow-origin") == ["http://localhost:3000"]
    missing = await anonymous.request("POST", "/v1.0/nowhere", headers=origin)
    assert missing.status in (401, 404)
    assert missing.headers.getRawHeaders("access-control-allow-origin") == ["*"]


def _preflight(origin: str, method: str = "POST", headers: str = "content-type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


@pytest_twisted.ensureDeferred
async def test_a_daemon_answers_options_itself_and_hides_origin_from_backends(
    tmp_path: Path,
) -> None:
    fleet = DaemonUnderTest(await start_daemon(tmp_path, {"HealthCheckIntervalMs": 100}))
    recorder = start_recorder(reactor)
    try:
        reply = await fleet.http.put(
            "/v1.0/backends",
            {"Identifier": "rec", "Hostname": "127.0.0.1", "Port": recorder.address[1]},
        )
        assert reply.status == 201, reply.body
        reply = await fleet.http.put("/v1.0/frontends/frontend1", {"Backends": ["rec"]})
        assert reply.status == 200, reply.body
        await until(lambda: fleet.daemon.runtime.state("rec").healthy)
        anonymous = Http.to(fleet.daemon, token=None)
        admin = await anonymous.request(
            "OPTIONS",
            "/v1.0/backends",
            headers=_preflight("http://ui.example", "GET", "authorization"),
        )
        assert admin.status == 200
        assert admin.headers.getRawHeaders("access-control-allow-origin") == ["*"]
        assert admin.headers.getRawHeaders("access-control-allow-headers") == ["authorization"]
        chat = await anonymous.request(
            "OPTIONS", "/api/chat", headers=_preflight("http://localhost:1")
        )
        assert chat.status == 200
        haproxy = await _raw(fleet.daemon.address.port, b"OPTIONS / HTTP/1.0\r\n\r\n")
        assert haproxy.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nAllow: " in haproxy
        assert all(s.method != b"OPTIONS" for s in recorder.seen), "none reached the backend"
        origin: dict[bytes | str, bytes | str] = {"Origin": "http://localhost:3000"}
        tags = await treq.get(fleet.url + "/api/tags", headers=origin, persistent=False)
        await tags.content()
        assert tags.code == 200
        assert tags.headers.getRawHeaders("access-control-allow-origin") == [
            "http://localhost:3000"
        ]
        assert tags.headers.getRawHeaders("x-ollamaflow-backend") == ["rec"]
        (seen,) = [s for s in recorder.seen if s.header("x-forwarded-for")]  # not the inventory's
        assert seen.uri == b"/api/tags"
        assert seen.header("origin") == []
    finally:
        assert recorder.port is not None
        await stop_listening(recorder.port)
        await fleet.daemon.stopService()


async def _raw(port: int, payload: bytes) -> bytes:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    collect = Collect(payload)
    await connectProtocol(endpoint, collect)
    return await collect.done
