"""Hostile input on the admin API (issue #14): every value is bounded and checked, and bad
input is a JSON 400 naming the field, never a 5xx, a traceback or a half-written row.

Each case runs against a real daemon over a socket, with a real SQLite file, and checks three
things: the status, the JSON error naming the field, and that the database is unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from harness import Http, Reply

from ollamaflow.daemon import Daemon
from ollamaflow.store import Snapshot


def assert_bad_request(reply: Reply, *mentions: str) -> str:
    """A JSON 400 in the admin shape whose description mentions each of ``mentions``."""
    assert reply.status == 400, reply.body[:500]
    assert reply.headers.getRawHeaders("content-type") == ["application/json"]
    body = json.loads(reply.body)
    assert set(body) == {"Error", "Message", "StatusCode", "Description"}
    assert (body["Error"], body["StatusCode"]) == ("BadRequest", 400)
    description: str = body["Description"]
    for mention in mentions:
        assert mention in description, description
    assert "Traceback" not in description
    return description


async def stored(daemon: Daemon) -> Snapshot:
    """What the database holds, read afresh (not the daemon's copy)."""
    return await daemon.store.snapshot()


def field_error(field: str) -> tuple[str, ...]:
    """What a description names for a refused value: ``<Field>: ... is not allowed; expected``."""
    return (f"{field}: ", " is not allowed; expected ")


HUGE = "1" * 5000


#: (raw body, the field the error must name) for PUT /v1.0/backends.
BAD_BACKENDS: list[tuple[bytes, str]] = [
    (b'{"Identifier": "x", "Headers": {"X-A\\r\\nX-Evil": "1"}}', "Headers"),
    (b'{"Identifier": "x", "Headers": {"X-A\\n": "1"}}', "Headers"),
    (b'{"Identifier": "x", "Headers": {"X-A": "1\\r\\nX-Evil: 2"}}', "Headers.X-A"),
    (b'{"Identifier": "x", "Headers": {"Host": "elsewhere"}}', "Headers.Host"),
    (
        b'{"Identifier": "x", "Headers": {"transfer-encoding": "chunked"}}',
        "Headers.transfer-encoding",
    ),
    (
        b'{"Identifier": "x", "PinnedCompletionsProperties": {"options": {"temperature": NaN}}}',
        "PinnedCompletionsProperties.options.temperature",
    ),
    (
        b'{"Identifier": "x", "PinnedEmbeddingsProperties": {"truncate": Infinity}}',
        "PinnedEmbeddingsProperties.truncate",
    ),
    (
        b'{"Identifier": "x", "PinnedEmbeddingsProperties": {"a": [1, -Infinity]}}',
        "PinnedEmbeddingsProperties.a[1]",
    ),
    (
        b'{"Identifier": "x", "PinnedCompletionsProperties": {"stop": ["\\ud800"]}}',
        "PinnedCompletionsProperties.stop[0]",
    ),
    (
        b'{"Identifier": "x", "PinnedCompletionsProperties": {"seed": ' + HUGE.encode() + b"}}",
        "PinnedCompletionsProperties.seed",
    ),
    (b'{"Identifier": "x", "Hostname": "gpu\\u0001box"}', "Hostname"),
    (b'{"Identifier": "x", "Hostname": "gpu\\nbox"}', "Hostname"),
    (b'{"Identifier": "x", "Hostname": "[::1]"}', "Hostname"),
    (b'{"Identifier": "."}', "Identifier"),
    (b'{"Identifier": ".."}', "Identifier"),
    (b'{"Identifier": "a\\u007fb"}', "Identifier"),
    (b'{"Identifier": "\\ud800"}', "Identifier"),
    (b'{"Identifier": "x", "Name": "\\udfff"}', "Name"),
    (b'{"Identifier": "x", "Name": "line\\nbreak"}', "Name"),
    (b'{"Identifier": ' + HUGE.encode() + b"}", "Identifier"),
    (b'{"Identifier": "x", "Port": ' + HUGE.encode() + b"}", "Port"),
    (b'{"Identifier": "x", "Port": -' + HUGE.encode() + b"}", "Port"),
    (b'{"Identifier": "x", "Weight": 1' + b"0" * 400 + b".5}", "Weight"),
    (b'{"Identifier": "x", "VramBytes": -1}', "VramBytes"),
    (b'{"Identifier": "x", "VramBytes": ' + HUGE.encode() + b"}", "VramBytes"),
    (b'{"Identifier": "x", "VramBytes": "24GB"}', "VramBytes"),
    (b'{"Identifier": "x", "Labels": ["a", "\\ud800"]}', "Labels[1]"),
    (b'{"Identifier": "x", "Labels": ["a b"]}', "Labels[0]"),
    (b'{"Identifier": "x", "BearerToken": "sk\\r\\nX-Evil: 1"}', "BearerToken"),
    (b'{"Identifier": "x", "Querystring": "a=1#frag"}', "Querystring"),
    (b'{"Identifier": "x", "HealthCheckUrl": "/health\\u0000"}', "HealthCheckUrl"),
]


#: (raw body, the field the error must name) for PUT /v1.0/frontends.
BAD_FRONTENDS: list[tuple[bytes, str]] = [
    (b'{"Identifier": "f", "RequiredModels": ["llama 3"]}', "RequiredModels[0]"),
    (b'{"Identifier": "f", "RequiredModels": ["' + b"m" * 674 + b'"]}', "RequiredModels[0]"),
    (b'{"Identifier": "f", "RequiredModels": ["m\\u0000"]}', "RequiredModels[0]"),
    (
        b'{"Identifier": "f", "RequiredModels": ['
        + b",".join(b'"m%d"' % i for i in range(1025))
        + b"]}",
        "RequiredModels",
    ),
    (b'{"Identifier": "f", "Hostname": "chat\\r\\n.example"}', "Hostname"),
    (b'{"Identifier": "f", "Backends": [".."]}', "Backends[0]"),
    (
        b'{"Identifier": "f", "PinnedCompletionsProperties": {"options": {"top_p": NaN}}}',
        "PinnedCompletionsProperties.options.top_p",
    ),
    (b'{"Identifier": "f", "TimeoutMs": ' + HUGE.encode() + b"}", "TimeoutMs"),
    (b'{"Identifier": "f", "LoadBalancing": "Placement"}', "LoadBalancing"),
    (b'{"Identifier": "f", "LoadBalancing": 4}', "LoadBalancing"),
    (b'{"Identifier": "\\udbff\\udbff"}', "Identifier"),
]


#: (collection, record to replace, raw body, the field the error must name).
BAD_RECORDS = [("backends", "backend1", raw, field) for raw, field in BAD_BACKENDS] + [
    ("frontends", "frontend1", raw, field) for raw, field in BAD_FRONTENDS
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("kind", "existing", "raw", "field"),
    BAD_RECORDS,
    ids=[f"{kind}-{field}" for kind, _, _, field in BAD_RECORDS],
)
async def test_bad_values_are_400_naming_the_field_and_nothing_is_stored(
    http: Http, daemon: Daemon, kind: str, existing: str, raw: bytes, field: str
) -> None:
    before = await stored(daemon)
    assert_bad_request(await http.put(f"/v1.0/{kind}", raw=raw), *field_error(field))
    if field != "Identifier":  # on replace, the identifier in the URL wins
        reply = await http.put(f"/v1.0/{kind}/{existing}", raw=raw)
        assert_bad_request(reply, *field_error(field))
    assert await stored(daemon) == before
    assert daemon.registry.catalog.generation == before.generation


def nested(depth: int) -> bytes:
    """A backend body whose Name is arrays nested so that the body is ``depth`` levels deep."""
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    return b'{"Identifier": "x", "Name": ' + inner + b"}"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("depth", [65, 1000, 100_000])
async def test_bodies_nested_deeper_than_64_levels_are_400(
    http: Http, daemon: Daemon, depth: int
) -> None:
    before = await stored(daemon)
    for path in ["/v1.0/backends", "/v1.0/backends/backend1", "/v1.0/frontends"]:
        assert_bad_request(await http.put(path, raw=nested(depth)), "nests deeper than 64 levels")
    assert await stored(daemon) == before


@pytest_twisted.ensureDeferred
async def test_a_body_64_levels_deep_reaches_the_field(http: Http) -> None:
    assert_bad_request(await http.put("/v1.0/backends", raw=nested(64)), *field_error("Name"))


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("raw", "mention"),
    [
        (b'{"Identifier": "x", "Name": "\xed\xa0\x80"}', "not UTF-8"),
        (b'{"Identifier": "x"', "not valid JSON"),
        (b'{"Identifier": "x", "Port": 1}}', "not valid JSON"),
    ],
)
async def test_bodies_that_are_not_json_are_400(
    http: Http, daemon: Daemon, raw: bytes, mention: str
) -> None:
    before = await stored(daemon)
    assert_bad_request(await http.put("/v1.0/backends", raw=raw), mention)
    assert await stored(daemon) == before


@pytest_twisted.ensureDeferred
async def test_many_unknown_fields_are_named_in_a_short_answer(http: Http, daemon: Daemon) -> None:
    body: dict[str, Any] = {"Identifier": "x"} | {f"Colour{i}": i for i in range(5000)}
    body["\ud800"] = 1
    raw = json.dumps(body).encode()
    description = assert_bad_request(await http.put("/v1.0/backends", raw=raw), "Colour0")
    assert "unknown fields" in description and "and 4991 more" in description
    assert len(description) < 1000
    assert (await http.request("HEAD", "/v1.0/backends/x")).status == 404


@pytest_twisted.ensureDeferred
async def test_a_surrogate_as_a_key_is_400(http: Http) -> None:
    raw = b'{"Identifier": "x", "\\ud800": 1}'
    assert_bad_request(await http.put("/v1.0/backends", raw=raw), "unknown field", "\\ud800")


@pytest_twisted.ensureDeferred
async def test_a_good_backend_still_goes_in_and_comes_back(http: Http) -> None:
    body = {
        "Identifier": "gpu.1",
        "Name": "Rack 2 — Zürich",
        "Hostname": "gpu-1.internal",
        "Headers": {"X-Api-Key": "k", "X-Team": "ml\tops ü"},
        "BearerToken": "sk-abc",
        "Querystring": "?api-version=1",
        "PinnedCompletionsProperties": {"options": {"temperature": 0.2, "seed": 2**63 - 1}},
    }
    reply = await http.put("/v1.0/backends", body)
    assert reply.status == 201, reply.body
    again = (await http.get("/v1.0/backends/gpu.1")).json
    assert again["Headers"] == body["Headers"] and again["Querystring"] == "api-version=1"
    assert again["PinnedCompletionsProperties"] == body["PinnedCompletionsProperties"]
    assert (await http.put("/v1.0/backends/gpu.1", again)).status == 200, "GET output goes back"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind", ["backends", "frontends"])
@pytest.mark.parametrize(
    ("segment", "status", "mention"),
    [
        ("x" * 257, 400, "Identifier: "),
        ("a%E2%80%A8b", 400, "Identifier: "),  # U+2028, a line separator
        ("%2E%2E", 404, "no route"),  # dot segments are resolved before routing
        ("a%7Fb", 400, "control character"),  # the server refuses these before any route
        ("a%0D%0Ab", 400, "control character"),
        ("%ED%A0%80", 400, "not UTF-8"),
    ],
)
async def test_identifiers_in_the_url_are_refused_before_the_store(
    http: Http, daemon: Daemon, kind: str, segment: str, status: int, mention: str
) -> None:
    before = await stored(daemon)
    reply = await http.put(f"/v1.0/{kind}/{segment}", {"Hostname": "localhost"})
    assert reply.status == status and mention in json.loads(reply.body)["Description"]
    for method in ["GET", "DELETE"]:
        reply = await http.request(method, f"/v1.0/{kind}/{segment}")
        assert reply.status in (400, 404) and json.loads(reply.body)["Error"], (method, reply.body)
    assert await stored(daemon) == before
