"""The admin API over a real socket, against a daemon with a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from harness import TOKEN, Http, Reply, start_daemon
from logcapture import keeping
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ollamaflow import records
from ollamaflow.admin import routing as admin_routing
from ollamaflow.daemon import Daemon
from ollamaflow.store import Store


def assert_error(reply: Reply, status: int, kind: str, *mentions: str) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers.getRawHeaders("content-type") == ["application/json"]
    body = reply.json
    assert set(body) == {"Error", "Message", "StatusCode", "Description"}
    assert (body["Error"], body["StatusCode"]) == (kind, status)
    for mention in mentions:
        assert mention in body["Description"]
    return body


BACKEND = {"Identifier": "gpu1", "Hostname": "10.0.0.5", "Port": 11434, "Labels": ["a100"]}


# -- unauthenticated status and auth --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_root_answers_without_auth_like_ollama(daemon: Daemon) -> None:
    anonymous = Http.to(daemon, token=None)
    reply = await anonymous.get("/")
    assert (reply.status, reply.body) == (200, b"Ollama is running")
    head = await anonymous.request("HEAD", "/")
    assert (head.status, head.body) == (200, b"")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Basic dGVzdDp0ZXN0", "Bearer", f"Token {TOKEN}"],
)
async def test_missing_or_wrong_token_is_401(daemon: Daemon, authorization: str | None) -> None:
    client = Http.to(daemon, token=None)
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in ["/v1.0/frontends", "/v1.0/backends/health", "/v1.0/no-such-route"]:
        reply = await client.get(path, headers=headers)
        assert_error(reply, 401, "AuthenticationFailed")


@pytest_twisted.ensureDeferred
async def test_any_configured_token_works_and_is_never_logged(tmp_path: Path) -> None:
    running = await start_daemon(tmp_path, {"AdminBearerTokens": ["first-token", "second-token"]})
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    try:
        for token in ["first-token", "second-token"]:
            assert (await Http.to(running, token).get("/v1.0/backends")).status == 200
        assert (await Http.to(running, "nope-token").get("/v1.0/backends")).status == 401
        await Http.to(running, "second-token").put("/v1.0/backends", {"Port": "x"})
    finally:
        globalLogPublisher.removeObserver(observer)
        await running.stopService()
    text = repr(events)
    assert "first-token" not in text and "second-token" not in text and "nope-token" not in text


# -- the seeded configuration and reads -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_first_run_seeds_frontend1_and_backend1(http: Http) -> None:
    frontends = (await http.get("/v1.0/frontends")).json
    assert [(f["Identifier"], f["Hostname"], f["Backends"]) for f in frontends] == [
        ("frontend1", "*", ["backend1"])
    ]
    backends = (await http.get("/v1.0/backends")).json
    assert [(b["Identifier"], b["Hostname"], b["Port"]) for b in backends] == [
        ("backend1", "localhost", 11434)
    ]
    one = await http.get("/v1.0/frontends/frontend1")
    assert one.status == 200 and one.json["CreatedUtc"].endswith("Z")


@pytest_twisted.ensureDeferred
async def test_head_answers_200_or_404_without_a_body(http: Http) -> None:
    for path, status in [
        ("/v1.0/frontends/frontend1", 200),
        ("/v1.0/frontends/nope", 404),
        ("/v1.0/backends/backend1", 200),
        ("/v1.0/backends/nope", 404),
    ]:
        reply = await http.request("HEAD", path)
        assert (reply.status, reply.body) == (status, b""), path


@pytest_twisted.ensureDeferred
async def test_unknown_identifiers_are_404(http: Http) -> None:
    for path in ["/v1.0/frontends/nope", "/v1.0/backends/nope", "/v1.0/backends/nope/health"]:
        assert_error(await http.get(path), 404, "NotFound", "'nope'")
    assert_error(await http.delete("/v1.0/frontends/nope"), 404, "NotFound", "nope")
    assert_error(await http.delete("/v1.0/backends/nope"), 404, "NotFound", "nope")
    assert_error(await http.put("/v1.0/backends/nope", {"Hostname": "h"}), 404, "NotFound", "nope")
    assert_error(await http.put("/v1.0/frontends/nope", {"Hostname": "h"}), 404, "NotFound", "nope")


# -- writes -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_backend_stores_and_returns_the_record(http: Http, daemon: Daemon) -> None:
    reply = await http.put(
        "/v1.0/backends", {"identifier": "gpu1", "hostname": "10.0.0.5", "labels": ["a100"]}
    )
    assert reply.status == 201
    body = reply.json
    assert body["Identifier"] == "gpu1" and body["Labels"] == ["a100"] and body["Port"] == 11434
    assert body["CreatedUtc"] == body["LastUpdateUtc"]
    assert (await http.get("/v1.0/backends/gpu1")).json == body
    assert "gpu1" in daemon.registry.catalog.backends, "the running daemon sees it at once"


@pytest_twisted.ensureDeferred
async def test_replace_keeps_created_time_and_the_url_identifier_wins(http: Http) -> None:
    created = (await http.put("/v1.0/backends", BACKEND)).json
    reply = await http.put("/v1.0/backends/gpu1", {"Identifier": "other", "Port": 9999})
    assert reply.status == 200
    body = reply.json
    assert body["Identifier"] == "gpu1" and body["Port"] == 9999
    assert body["Hostname"] == "localhost", "PUT is a full replace: omitted fields reset"
    assert body["CreatedUtc"] == created["CreatedUtc"]
    assert body["LastUpdateUtc"] >= created["LastUpdateUtc"]
    assert (await http.request("HEAD", "/v1.0/backends/other")).status == 404


@pytest_twisted.ensureDeferred
async def test_frontend_changes_take_effect_in_the_running_daemon(
    http: Http, daemon: Daemon
) -> None:
    await http.put("/v1.0/backends", BACKEND)
    reply = await http.put(
        "/v1.0/frontends",
        {"Identifier": "team-a", "Hostname": "Team-A.example", "Backends": ["gpu1", "backend1"]},
    )
    assert reply.status == 201
    catalog = daemon.registry.catalog
    found = catalog.frontend_for_host("team-a.EXAMPLE:43411")
    assert found is not None and found.backends == ("gpu1", "backend1")
    assert (await http.delete("/v1.0/frontends/team-a")).status == 204
    fallback = daemon.registry.catalog.frontend_for_host("team-a.example")
    assert fallback is not None and fallback.identifier == "frontend1"


@pytest_twisted.ensureDeferred
async def test_duplicate_identifier_is_409(http: Http) -> None:
    assert (await http.put("/v1.0/backends", BACKEND)).status == 201
    assert_error(await http.put("/v1.0/backends", BACKEND), 409, "Conflict", "gpu1")
    assert_error(await http.put("/v1.0/frontends", {"Identifier": "frontend1"}), 409, "Conflict")


@pytest_twisted.ensureDeferred
async def test_deleting_a_listed_backend_is_409_unless_forced(http: Http, daemon: Daemon) -> None:
    assert_error(await http.delete("/v1.0/backends/backend1"), 409, "Conflict", "frontend1")
    assert (await http.get("/v1.0/backends/backend1")).status == 200
    assert_error(await http.delete("/v1.0/backends/backend1?force=maybe"), 400, "BadRequest")
    assert (await http.delete("/v1.0/backends/backend1?force=true")).status == 204
    assert (await http.get("/v1.0/backends/backend1")).status == 404
    assert (await http.get("/v1.0/frontends/frontend1")).json["Backends"] == []
    assert "backend1" not in daemon.registry.catalog.backends


@pytest_twisted.ensureDeferred
async def test_delete_frontend_then_backend(http: Http) -> None:
    assert (await http.delete("/v1.0/frontends/frontend1")).status == 204
    assert (await http.delete("/v1.0/backends/backend1")).status == 204
    assert (await http.get("/v1.0/frontends")).json == []
    assert (await http.get("/v1.0/backends")).json == []


@pytest_twisted.ensureDeferred
async def test_changes_survive_a_restart(tmp_path: Path) -> None:
    first = await start_daemon(tmp_path)
    await Http.to(first).put("/v1.0/backends", BACKEND)
    await first.stopService()
    second = await start_daemon(tmp_path)
    try:
        reply = await Http.to(second).get("/v1.0/backends/gpu1")
        assert reply.status == 200 and reply.json["Hostname"] == "10.0.0.5"
        frontends = (await Http.to(second).get("/v1.0/frontends")).json
        assert [f["Identifier"] for f in frontends] == ["frontend1"], "seeded once only"
    finally:
        await second.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stored_record_that_does_not_load_is_left_out_logged_once_and_repairable(
    tmp_path: Path,
) -> None:
    """A hand-edited row, or one an older version accepted, never stops the daemon."""
    first = await start_daemon(tmp_path)
    await Http.to(first).put("/v1.0/backends", BACKEND)
    reply = await Http.to(first).put(
        "/v1.0/frontends/frontend1", {"Backends": ["backend1", "gpu1"]}
    )
    assert reply.status == 200
    await first.stopService()
    database = sqlite3.connect(tmp_path / "ollamaflow.db")
    with database:
        database.execute(
            "UPDATE backends SET doc = ? WHERE identifier = 'gpu1'",
            ('{"Hostname": "10.0.0.5", "Headers": {"X-A\\r\\nX-Evil": "1"}}',),
        )
    database.close()
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    try:
        second = await start_daemon(tmp_path)
        try:
            http = Http.to(second)
            assert [b["Identifier"] for b in (await http.get("/v1.0/backends")).json] == [
                "backend1"
            ]
            listed = (await http.get("/v1.0/frontends/frontend1")).json["Backends"]
            assert listed == ["backend1", "gpu1"], "the frontend keeps listing it"
            assert (await http.get("/v1.0/backends/gpu1")).status == 404
            await second.registry.refresh()
            warnings = [
                formatEvent(e)
                for e in events
                if e.get("log_level") == LogLevel.warn and "left out" in formatEvent(e)
            ]
            assert len(warnings) == 1, warnings
            assert "backend 'gpu1'" in warnings[0] and "Headers" in warnings[0]
            assert "/v1.0/backends/gpu1" in warnings[0]

            reply = await http.put("/v1.0/backends/gpu1", {"Hostname": "10.0.0.6"})
            assert reply.status == 200, reply.body
            assert (await http.get("/v1.0/backends/gpu1")).json["Hostname"] == "10.0.0.6"
            assert second.registry.catalog.left_out == ()
        finally:
            await second.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest_twisted.ensureDeferred
async def test_a_left_out_record_can_be_deleted(tmp_path: Path) -> None:
    first = await start_daemon(tmp_path)
    await first.stopService()
    database = sqlite3.connect(tmp_path / "ollamaflow.db")
    with database:
        database.execute("UPDATE frontends SET doc = '{\"TimeoutMs\": -1}'")
    database.close()
    second = await start_daemon(tmp_path)
    try:
        http = Http.to(second)
        assert (await http.get("/v1.0/frontends")).json == []
        assert (await http.delete("/v1.0/frontends/frontend1")).status == 204
        assert (await second.store.snapshot()).left_out == ()
        assert (await http.delete("/v1.0/backends/backend1")).status == 204, "no longer in use"
    finally:
        await second.stopService()


@pytest_twisted.ensureDeferred
async def test_a_record_that_would_not_load_back_is_400_not_500(
    http: Http, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that skipped the admin rules (here: parsing made lenient) is refused by the
    store before commit, and the admin API says why."""
    real = records.parse_record

    def lenient(cls: type[Any], data: Any) -> Any:
        record, unknown = real(cls, {**data, "RequiredModels": []})
        return attrs.evolve(record, required_models=tuple(data["RequiredModels"])), unknown

    monkeypatch.setattr(admin_routing, "parse_record", lenient)
    before = await daemon.store.snapshot()
    reply = await http.put("/v1.0/frontends/frontend1", {"RequiredModels": ["llama 3"]})
    assert_error(reply, 400, "BadRequest", "RequiredModels[0]: ", "was not stored")
    assert await daemon.store.snapshot() == before


# -- bad input ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        (b"{not json", ("not valid JSON",)),
        (b"", ("no body",)),
        (b"[1, 2]", ("expected a JSON object",)),
        (b'{"Identifier": "x", "Port": "80"}', ("Port", '"80"', "integer")),
        (b'{"Identifier": "x", "Port": 70000}', ("Port", "70000", "65535")),
        (b'{"Identifier": "x", "ApiFormat": "Vllm"}', ("ApiFormat", "Ollama or 0, OpenAI or 1")),
        (b'{"Identifier": "x", "Colour": "blue"}', ("unknown field", "Colour")),
        (b'{"Port": 1}', ("Identifier is required",)),
        (b"\xff\xfe", ("not valid JSON",)),
    ],
)
async def test_bad_backend_bodies_are_400_naming_the_problem(
    http: Http, raw: bytes, mentions: tuple[str, ...]
) -> None:
    assert_error(await http.put("/v1.0/backends", raw=raw), 400, "BadRequest", *mentions)
    assert [b["Identifier"] for b in (await http.get("/v1.0/backends")).json] == ["backend1"]


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_wrong_methods(http: Http) -> None:
    assert_error(await http.get("/v1.0/nothing-here"), 404, "NotFound")
    assert_error(await http.get("/v1.0"), 404, "NotFound")
    reply = await http.request("PATCH", "/v1.0/frontends/frontend1")
    assert_error(reply, 405, "MethodNotAllowed", "PATCH")
    assert "PUT" in reply.headers.getRawHeaders("allow")[0]


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_admin_limit_is_413_without_being_read(http: Http) -> None:
    huge = b'{"Identifier": "x", "Name": "' + b"a" * (2 << 20) + b'"}'
    assert_error(await http.put("/v1.0/backends", raw=huge), 413, "TooLarge")
    assert (await http.request("HEAD", "/v1.0/backends/x")).status == 404


@pytest_twisted.ensureDeferred
async def test_an_internal_failure_is_a_json_500_without_traceback(
    http: Http, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Store, *args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Store, "create_backend", broken)
    reply = await http.put("/v1.0/backends", BACKEND)
    body = assert_error(reply, 500, "InternalError", "reference")
    assert "disk on fire" not in reply.body.decode() and "Traceback" not in reply.body.decode()
    assert body["Description"]
    monkeypatch.undo()
    assert (await http.put("/v1.0/backends", BACKEND)).status == 201, "the daemon carries on"


# -- health ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_routes_report_runtime_state(http: Http, daemon: Daemon) -> None:
    every = (await http.get("/v1.0/backends/health")).json
    assert [b["Identifier"] for b in every] == ["backend1"]
    assert every[0]["Healthy"] is False and every[0]["ActiveRequests"] == 0
    assert every[0]["Frontends"] == ["frontend1"]

    state = daemon.runtime.state("backend1")
    state.succeeded(daemon.now(), threshold=1)
    state.active_requests = 3
    one = (await http.get("/v1.0/backends/backend1/health")).json
    assert one["Healthy"] is True and one["ActiveRequests"] == 3
    assert one["HealthySinceUtc"].endswith("Z") and "Uptime" in one

    summary = (await http.get("/v1.0/health")).json
    assert summary["HealthyBackends"] == 1 and summary["UnhealthyBackends"] == 0
    assert summary["Frontends"] == 1 and summary["Backends"] == 1
    assert summary["Version"]
