"""The API keys' admin routes over a real socket, against a daemon with a real SQLite file:
the secret shown once and stored hashed, replace and rotate, delete, usage, bad input; and a
frontend's RequireApiKey through the frontend routes."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from harness import Http, Reply, start_daemon
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from logcapture import keeping
from test_admin import assert_error
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.logger import globalLogPublisher

from ollamaflow.admin import apikeys as admin_apikeys
from ollamaflow.apikeys import hash_secret
from ollamaflow.daemon import Daemon
from ollamaflow.records import ApiKey, UsageRow
from ollamaflow.store import Store, hour_start
from ollamaflow.utctime import format_utc, utc_clock

KEY = {
    "Identifier": "team-a",
    "Name": "Team A",
    "Frontends": ["frontend1"],
    "Models": ["llama3*"],
    "RequestsPerMinute": 60,
    "Priority": 5,
}


async def create(http: Http, body: Any = KEY) -> dict[str, Any]:
    reply = await http.request("POST", "/v1.0/apikeys", body)
    assert reply.status == 201, reply.body
    created: dict[str, Any] = reply.json
    return created


def opened_by(daemon: Daemon) -> dict[str, ApiKey]:
    """The keys the gateway lets in, by the hash of their secret."""
    return {h: c.key for h, c in daemon.gateway.router.key_ring().by_hash.items() if c.key}


def database_path(daemon: Daemon) -> str:
    return str(daemon.loaded.database_path)


def stored_rows(daemon: Daemon, sql: str) -> list[tuple[Any, ...]]:
    """Rows read from the daemon's SQLite file behind its back."""
    database = sqlite3.connect(database_path(daemon))
    try:
        return [tuple(row) for row in database.execute(sql).fetchall()]
    finally:
        database.close()


# -- create, read, and the secret ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_shows_the_key_once_and_stores_only_its_hash(
    http: Http, daemon: Daemon
) -> None:
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    try:
        reply = await http.request("POST", "/v1.0/apikeys", KEY)
        assert reply.status == 201, reply.body
        assert reply.headers.getRawHeaders("cache-control") == ["no-store"]
        body = reply.json
        secret = body["Key"]
        assert re.fullmatch(r"ofk_[A-Za-z0-9_-]{43}", secret)
        assert body["KeyPrefix"] == secret[:12]
        assert {k: body[k] for k in KEY} == KEY
        assert body["Active"] is True and body["AllowModelManagement"] is False
        assert body["CreatedUtc"] == body["LastUpdateUtc"]
        assert "SecretHash" not in body

        read = (await http.get("/v1.0/apikeys/team-a")).json
        assert read == {k: v for k, v in body.items() if k != "Key"}, "the secret: never again"
        assert (await http.get("/v1.0/apikeys")).json == [read]
        head = await http.request("HEAD", "/v1.0/apikeys/team-a")
        assert (head.status, head.body) == (200, b"")
    finally:
        globalLogPublisher.removeObserver(observer)

    digest = hash_secret(secret)
    assert opened_by(daemon)[digest] == daemon.registry.catalog.api_keys["team-a"]
    for text in (await http.get("/v1.0/apikeys")).body.decode(), repr(events):
        assert secret not in text and digest not in text and secret[12:] not in text
    [row] = stored_rows(daemon, "SELECT * FROM apikeys")
    assert not any(secret in str(column) or secret[12:] in str(column) for column in row)
    assert digest in row, "stored as its SHA-256"


@pytest_twisted.ensureDeferred
async def test_an_identifier_is_made_when_none_is_given(http: Http) -> None:
    for body in ({}, {"Identifier": None}, {"identifier": None, "Name": "n"}):
        created = await create(http, body)
        assert re.fullmatch(r"key-[0-9a-f]{12}", created["Identifier"]), created
    put = await http.put("/v1.0/apikeys", {"Name": "by PUT"})
    assert put.status == 201 and put.json["Key"].startswith("ofk_")
    listed = (await http.get("/v1.0/apikeys")).json
    assert len({k["Identifier"] for k in listed}) == 4


@pytest_twisted.ensureDeferred
async def test_reserved_identifiers_and_duplicates_are_refused(http: Http, daemon: Daemon) -> None:
    for reserved in ("anonymous", "admin", "ADMIN", "Anonymous"):
        reply = await http.request("POST", "/v1.0/apikeys", {"Identifier": reserved})
        assert_error(reply, 400, "BadRequest", "Identifier", "reserved")
    for invalid in ("..", "a/b", "a b", "x" * 257):
        reply = await http.request("POST", "/v1.0/apikeys", {"Identifier": invalid})
        assert_error(reply, 400, "BadRequest", "Identifier")
    await create(http)
    reply = await http.request("POST", "/v1.0/apikeys", KEY)
    assert_error(reply, 409, "Conflict", "an API key with identifier 'team-a' already exists")
    assert list(daemon.registry.catalog.api_keys) == ["team-a"]


# -- replace, rotate, delete ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_replace_keeps_the_secret_and_a_read_record_can_be_sent_back(
    http: Http, daemon: Daemon
) -> None:
    created = await create(http)
    digest = hash_secret(created["Key"])
    reply = await http.put(
        "/v1.0/apikeys/team-a",
        {"Identifier": "other", "Priority": -3, "Key": "ofk_mine", "KeyPrefix": "x"},
    )
    assert reply.status == 200, reply.body
    body = reply.json
    assert (body["Identifier"], body["Priority"]) == ("team-a", -3), "the URL's identifier wins"
    assert body["Models"] == [] and "Name" not in body, "a full replace"
    assert "Key" not in body, "no secret shown"
    assert body["KeyPrefix"] == created["KeyPrefix"] and body["CreatedUtc"] == created["CreatedUtc"]
    assert opened_by(daemon)[digest].priority == -3, "the secret still works"

    read = (await http.get("/v1.0/apikeys/team-a")).json
    again = await http.put("/v1.0/apikeys/team-a", read)
    assert again.status == 200 and {**again.json, "LastUpdateUtc": None} == {
        **read,
        "LastUpdateUtc": None,
    }
    assert_error(await http.put("/v1.0/apikeys/ghost", KEY), 404, "NotFound", "ghost")


@pytest_twisted.ensureDeferred
async def test_rotate_gives_a_new_secret_to_the_same_record(http: Http, daemon: Daemon) -> None:
    created = await create(http)
    reply = await http.request("POST", "/v1.0/apikeys/team-a/rotate")
    assert reply.status == 200, reply.body
    assert reply.headers.getRawHeaders("cache-control") == ["no-store"]
    rotated = reply.json
    assert rotated["Key"] != created["Key"] and rotated["KeyPrefix"] == rotated["Key"][:12]
    same = {"Key", "KeyPrefix", "LastUpdateUtc"}
    assert {k: v for k, v in rotated.items() if k not in same} == {
        k: v for k, v in created.items() if k not in same
    }
    hashes = opened_by(daemon)
    assert hash_secret(rotated["Key"]) in hashes and hash_secret(created["Key"]) not in hashes
    assert "Key" not in (await http.get("/v1.0/apikeys/team-a")).json
    assert_error(await http.request("POST", "/v1.0/apikeys/ghost/rotate"), 404, "NotFound")
    reply = await http.request("GET", "/v1.0/apikeys/team-a/rotate")
    assert_error(reply, 405, "MethodNotAllowed")


@pytest_twisted.ensureDeferred
async def test_delete_removes_the_key_and_its_usage(http: Http, daemon: Daemon) -> None:
    await create(http)
    await create(http, {"Identifier": "team-b"})
    hour = hour_start(daemon.now())
    await daemon.store.add_usage(
        [UsageRow("team-a", "llama3", hour, requests=3), UsageRow("team-b", "m", hour)]
    )
    assert (await http.delete("/v1.0/apikeys/team-a")).status == 204
    assert_error(await http.get("/v1.0/apikeys/team-a"), 404, "NotFound", "team-a")
    head = await http.request("HEAD", "/v1.0/apikeys/team-a")
    assert (head.status, head.body) == (404, b"")
    assert_error(await http.delete("/v1.0/apikeys/team-a"), 404, "NotFound")
    assert_error(await http.get("/v1.0/apikeys/team-a/usage"), 404, "NotFound")
    assert stored_rows(daemon, "SELECT key_id FROM apikey_usage") == [("team-b",)]
    assert list(daemon.registry.catalog.api_keys) == ["team-b"]


@pytest_twisted.ensureDeferred
async def test_a_stored_key_that_does_not_load_is_left_out_and_repaired_by_put(
    http: Http, daemon: Daemon
) -> None:
    created = await create(http)
    database = sqlite3.connect(database_path(daemon))
    with database:
        database.execute("UPDATE apikeys SET doc = '{\"Priority\": 5000}'")
    database.close()
    await daemon.registry.refresh()
    [left_out] = daemon.registry.catalog.left_out
    assert (left_out.kind, left_out.identifier) == ("apikey", "team-a")
    assert opened_by(daemon) == {}, "a key that does not load opens nothing"
    assert_error(await http.get("/v1.0/apikeys/team-a"), 404, "NotFound")
    reply = await http.request("POST", "/v1.0/apikeys/team-a/rotate")
    assert_error(reply, 409, "Conflict", "stored API key 'team-a' is not valid", "Priority")
    repaired = await http.put("/v1.0/apikeys/team-a", {"Priority": 1})
    assert repaired.status == 200 and repaired.json["KeyPrefix"] == created["KeyPrefix"]
    assert daemon.registry.catalog.left_out == ()
    assert list(opened_by(daemon)) == [hash_secret(created["Key"])]


# -- bad input --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        (b'{"Identifier": "k", "Priority": 5000}', ("Priority", "5000")),
        (b'{"Identifier": "k", "RequestsPerMinute": -1}', ("RequestsPerMinute",)),
        (b'{"Identifier": "k", "TokensPerMinute": 1e400}', ("TokensPerMinute",)),
        (b'{"Identifier": "k", "Models": ["llama 3"]}', ("Models[0]",)),
        (b'{"Identifier": "k", "Frontends": [".."]}', ("Frontends[0]",)),
        (b'{"Identifier": "k", "ExpiresUtc": "tomorrow"}', ("ExpiresUtc",)),
        (b'{"Identifier": "k", "ExpiresUtc": "0001-01-01T00:00:00+14:00"}', ("ExpiresUtc",)),
        (b'{"Identifier": "k", "ExpiresUtc": "9999-12-31T23:59:59-14:00"}', ("ExpiresUtc",)),
        (b'{"Identifier": "k", "Active": "yes"}', ("Active",)),
        (b'{"Identifier": "k", "Colour": "blue"}', ("unknown field", "Colour")),
        (b'{"Identifier": "k", "Name": "\\ud800"}', ("Name",)),
        (b"[1]", ("JSON object",)),
        (b"", ("no body",)),
        (b"{nope", ("not valid JSON",)),
    ],
)
async def test_bad_key_bodies_are_400_naming_the_problem(
    http: Http, daemon: Daemon, raw: bytes, mentions: tuple[str, ...]
) -> None:
    for method, path in (("POST", "/v1.0/apikeys"), ("PUT", "/v1.0/apikeys/k")):
        reply = await http.request(method, path, raw=raw)
        assert_error(reply, 400, "BadRequest", *mentions)
    assert (await daemon.store.snapshot()).api_keys == ()


# -- usage ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_usage_by_hour_and_model_since_a_time(http: Http, daemon: Daemon) -> None:
    await create(http)
    now = hour_start(daemon.now())
    await daemon.store.add_usage(
        [
            UsageRow("team-a", "llama3", now - timedelta(hours=30), requests=100),
            UsageRow("team-a", "llama3", now - timedelta(hours=2), requests=2, errors=1),
            UsageRow("team-a", "all-minilm", now, requests=1, prompt_tokens=7),
            UsageRow("team-a", "llama3", now, requests=3, prompt_tokens=5, completion_tokens=9),
            UsageRow("team-b", "llama3", now, requests=50),
        ]
    )
    reply = await http.get("/v1.0/apikeys/team-a/usage")
    assert reply.status == 200, reply.body
    body = reply.json
    assert body["Identifier"] == "team-a" and "Truncated" not in body
    assert body["SinceUtc"] == format_utc(now - timedelta(hours=24)), "24 hours by default"
    assert body["Usage"] == [
        {"HourUtc": format_utc(now - timedelta(hours=2)), "Model": "llama3", "Requests": 2,
         "Errors": 1, "PromptTokens": 0, "CompletionTokens": 0},
        {"HourUtc": format_utc(now), "Model": "all-minilm", "Requests": 1, "Errors": 0,
         "PromptTokens": 7, "CompletionTokens": 0},
        {"HourUtc": format_utc(now), "Model": "llama3", "Requests": 3, "Errors": 0,
         "PromptTokens": 5, "CompletionTokens": 9},
    ]  # fmt: skip
    assert body["Totals"] == {"Requests": 6, "Errors": 1, "PromptTokens": 12, "CompletionTokens": 9}

    since = (now - timedelta(hours=31)).astimezone(timezone(timedelta(hours=2)))
    query = since.isoformat().replace("+", "%2B")
    older = (await http.get(f"/v1.0/apikeys/team-a/usage?since={query}")).json
    assert older["SinceUtc"] == format_utc(now - timedelta(hours=31))
    assert [u["Requests"] for u in older["Usage"]] == [100, 2, 1, 3]
    naive = (now - timedelta(minutes=1)).replace(tzinfo=None).isoformat()
    recent = (await http.get(f"/v1.0/apikeys/team-a/usage?since={naive}")).json
    assert recent["SinceUtc"] == format_utc(now - timedelta(hours=1)), "no offset: UTC"
    assert recent["Totals"]["Requests"] == 4


@pytest_twisted.ensureDeferred
async def test_usage_refuses_a_bad_since_and_an_unknown_key(http: Http) -> None:
    await create(http)
    for since in ("yesterday", "", "2025-13-01", "%ff", "0001-01-01T00:00:00%2B14:00"):
        reply = await http.get(f"/v1.0/apikeys/team-a/usage?since={since}")
        assert_error(reply, 400, "BadRequest", "since")
    assert_error(await http.get("/v1.0/apikeys/ghost/usage"), 404, "NotFound", "ghost")
    assert (await http.get("/v1.0/apikeys/team-a/usage?since=1900-01-01")).status == 200


@pytest_twisted.ensureDeferred
async def test_usage_without_a_key_is_under_anonymous_and_admin(http: Http, daemon: Daemon) -> None:
    hour = hour_start(daemon.now())
    await daemon.store.add_usage([UsageRow("anonymous", "llama3", hour, requests=4)])
    anonymous = (await http.get("/v1.0/apikeys/anonymous/usage")).json
    assert anonymous["Identifier"] == "anonymous" and anonymous["Totals"]["Requests"] == 4
    admin = (await http.get("/v1.0/apikeys/admin/usage")).json
    assert admin["Usage"] == [] and admin["Totals"]["Requests"] == 0
    assert_error(await http.get("/v1.0/apikeys/anonymous"), 404, "NotFound")


@pytest_twisted.ensureDeferred
async def test_usage_comes_from_the_ledger_and_is_capped(
    http: Http, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create(http)
    now = hour_start(daemon.now())
    asked: list[tuple[str, datetime, int]] = []

    def usage_of(identifier: str, since: datetime, limit: int) -> Deferred[list[UsageRow]]:
        asked.append((identifier, since, limit))
        return succeed([UsageRow(identifier, f"m{i}", now, requests=1) for i in range(limit)])

    monkeypatch.setattr(daemon.admin, "usage_of", usage_of)
    monkeypatch.setattr(admin_apikeys, "MAX_USAGE_ROWS", 3)
    body = (await http.get("/v1.0/apikeys/team-a/usage")).json
    assert asked == [("team-a", now - timedelta(hours=24), 4)], "one more than shown"
    assert [u["Model"] for u in body["Usage"]] == ["m0", "m1", "m2"]
    assert body["Truncated"] is True and body["Totals"]["Requests"] == 3


# -- frontends: RequireApiKey -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_require_api_key_round_trips_through_the_frontend_routes(
    http: Http, daemon: Daemon
) -> None:
    assert (await http.get("/v1.0/frontends/frontend1")).json["RequireApiKey"] is False
    reply = await http.put(
        "/v1.0/frontends/frontend1", {"Backends": ["backend1"], "requireapikey": True}
    )
    assert reply.status == 200 and reply.json["RequireApiKey"] is True
    assert (await http.get("/v1.0/frontends/frontend1")).json["RequireApiKey"] is True
    assert daemon.registry.catalog.frontends["frontend1"].require_api_key is True
    created = await http.put("/v1.0/frontends", {"Identifier": "open"})
    assert created.status == 201 and created.json["RequireApiKey"] is False
    reply = await http.put("/v1.0/frontends/open", {"RequireApiKey": "true"})
    assert_error(reply, 400, "BadRequest", "RequireApiKey")
    assert (await daemon.store.snapshot()).frontends[0].require_api_key is True


# -- whatever an admin sends ------------------------------------------------------------------

EXAMPLES = int(os.environ.get("OLLAMAFLOW_HYPOTHESIS_EXAMPLES", "150"))

texts = (
    st.text(max_size=30)
    | st.text(st.characters(codec=None, categories=None), max_size=10)
    | st.sampled_from(["", ".", "..", "*", "a\r\nb", "\x00", "\ud800", "anonymous", "x" * 700])
)
numbers = (
    st.integers()
    | st.integers(min_value=10**30, max_value=10**400)
    | st.floats()
    | st.sampled_from([-1, 0, 1000, 1001, -1001, 2**53 + 1])
)
junk = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
offsets = st.timedeltas(min_value=-timedelta(hours=23), max_value=timedelta(hours=23))
times = st.datetimes(timezones=st.none() | st.builds(timezone, offsets) | st.just(UTC)).map(
    datetime.isoformat
)
counts = st.integers(min_value=0, max_value=10**9)
#: Values that fit each field (mostly), and what is written beside the fields.
KEY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "Identifier": st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True),
    "Name": st.none() | st.text(max_size=30),
    "Active": st.booleans(),
    "ExpiresUtc": st.none() | times,
    "Frontends": st.lists(st.sampled_from(["frontend1", "x", "*"]), max_size=4),
    "Models": st.lists(st.sampled_from(["llama3", "llama3*", "*", "a:b", "Qwen*:7b"]), max_size=4),
    "AllowModelManagement": st.booleans(),
    "RequestsPerMinute": counts,
    "TokensPerMinute": counts,
    "MaxConcurrentRequests": counts,
    "Priority": st.integers(min_value=-1001, max_value=1001),
    "KeyPrefix": texts,
    "CreatedUtc": times | texts,
    "Key": texts,
}


@st.composite
def key_bodies(draw: st.DrawFn) -> bytes:
    """An object with some key fields (in any case), holding fitting values or, in a hostile
    body, any value, and then junk keys; or bytes that are no such object."""
    hostile = draw(st.booleans())
    document: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(sorted(KEY_FIELDS)), unique=True, max_size=7)):
        wire = draw(st.sampled_from([name, name.lower(), name.upper()]))
        document[wire] = draw(KEY_FIELDS[name] | junk if hostile else KEY_FIELDS[name])
    if hostile:
        document.update(draw(st.dictionaries(texts | st.just("SecretHash"), junk, max_size=2)))
    try:
        raw = json.dumps(document).encode()
    except ValueError:
        raw = b"{}"
    return draw(st.just(raw) | st.binary(max_size=32)) if hostile else raw


@pytest_twisted.async_yield_fixture(scope="module")
async def key_daemon(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Daemon]:
    running = await start_daemon(tmp_path_factory.mktemp("keys"))
    reply = await Http.to(running).request("POST", "/v1.0/apikeys", {"Identifier": "fixed"})
    assert reply.status == 201
    yield running
    await running.stopService()


def assert_answer(reply: Reply, method: str) -> None:
    assert reply.status < 500, reply.body
    if reply.status >= 400:
        assert_error(reply, reply.status, reply.json["Error"])
    else:
        assert "SecretHash" not in reply.json
        assert ("Key" in reply.json) == (method == "POST")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=key_bodies(), method=st.sampled_from(["POST", "PUT"]))
@pytest_twisted.ensureDeferred
async def test_any_key_body_is_a_record_or_a_json_4xx(
    key_daemon: Daemon, raw: bytes, method: str
) -> None:
    """One generated create (deleted again) or replace of the key "fixed"."""
    http = Http.to(key_daemon)
    path = "/v1.0/apikeys" if method == "POST" else "/v1.0/apikeys/fixed"
    reply = await http.request(method, path, raw=raw)
    event(f"{method} {reply.status}")
    assert_answer(reply, method)
    if reply.status == 201:
        identifier = reply.json["Identifier"]
        gone = await http.request("DELETE", "/v1.0/apikeys/" + quote(identifier, safe=""))
        assert gone.status == 204, (identifier, gone.body)


@pytest_twisted.ensureDeferred
async def test_afterwards_every_stored_key_loads(key_daemon: Daemon) -> None:
    """After the property above, on its daemon: the database loads with nothing left out."""
    store = await Store.open_sqlite(
        database_path(key_daemon), reactor=reactor, now=utc_clock(reactor.seconds)
    )
    try:
        snapshot = await store.snapshot()
    finally:
        await store.close()
    assert snapshot.left_out == ()
    assert [k.identifier for k in snapshot.api_keys] == ["fixed"]
    assert snapshot.api_keys == tuple(key_daemon.registry.catalog.api_keys.values())
