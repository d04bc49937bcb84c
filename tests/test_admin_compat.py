"""OllamaFlow 1.2 admin compatibility: frontends naming backends not created yet, and every
record the admin API serves accepted back by PUT unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from harness import DaemonUnderTest, Http, start_daemon, until
from logcapture import keeping
from test_admin import assert_error
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ollamaflow.daemon import Daemon

# -- a frontend may name backends that do not exist yet ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_frontend_may_name_backends_not_created_yet_and_shows_them_missing(
    http: Http, daemon: Daemon
) -> None:
    """1.2's own Postman collection creates the frontend first."""
    reply = await http.put(
        "/v1.0/frontends", {"Identifier": "f2", "Backends": ["ghost", "backend1", "phantom"]}
    )
    assert reply.status == 201, reply.body
    assert reply.json["Backends"] == ["ghost", "backend1", "phantom"], "kept, in order"
    assert reply.json["MissingBackends"] == ["ghost", "phantom"]
    got = (await http.get("/v1.0/frontends/f2")).json
    assert got["MissingBackends"] == ["ghost", "phantom"]
    listed = {f["Identifier"]: f for f in (await http.get("/v1.0/frontends")).json}
    assert "MissingBackends" not in listed["frontend1"], "shown only when some are missing"
    assert listed["f2"]["MissingBackends"] == ["ghost", "phantom"]
    health = (await http.get("/v1.0/health")).json
    entries = {q["Identifier"]: q for q in health["Queues"]}
    assert entries["f2"]["MissingBackends"] == ["ghost", "phantom"]
    assert entries["frontend1"]["MissingBackends"] == []

    reply = await http.put("/v1.0/backends", {"Identifier": "ghost", "Hostname": "10.0.0.1"})
    assert reply.status == 201
    assert (await http.get("/v1.0/frontends/f2")).json["MissingBackends"] == ["phantom"]
    ghost = (await http.get("/v1.0/backends/ghost/health")).json
    assert ghost["Frontends"] == ["f2"]


@pytest_twisted.ensureDeferred
async def test_missing_backends_are_logged_once_when_they_appear(http: Http) -> None:
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    try:
        await http.put("/v1.0/frontends/frontend1", {"Backends": ["backend1", "later"]})
        await http.put("/v1.0/frontends/frontend1", {"Backends": ["later", "backend1"]})
        await http.put("/v1.0/backends", {"Identifier": "later"})
        await http.put("/v1.0/frontends/frontend1", {"Backends": ["later", "again"]})
    finally:
        globalLogPublisher.removeObserver(observer)
    warnings = [
        formatEvent(e) for e in events if e.get("log_level") is LogLevel.warn and "frontend" in e
    ]
    assert warnings == [
        "frontend 'frontend1' lists backends that do not exist: 'later'; it is served by its"
        " other backends, and by each of these once it is created",
        "frontend 'frontend1' lists backends that do not exist: 'again'; it is served by its"
        " other backends, and by each of these once it is created",
    ]


@pytest_twisted.ensureDeferred
async def test_replacing_a_frontend_may_name_missing_backends_too_within_the_same_bounds(
    http: Http,
) -> None:
    reply = await http.put("/v1.0/frontends/frontend1", {"Backends": ["backend1", "later"]})
    assert reply.status == 200 and reply.json["MissingBackends"] == ["later"]
    too_many = [f"b{i}" for i in range(1025)]
    assert_error(
        await http.put("/v1.0/frontends/frontend1", {"Backends": too_many}), 400, "BadRequest"
    )
    too_long = ["x" * 257]
    assert_error(
        await http.put("/v1.0/frontends/frontend1", {"Backends": too_long}),
        400,
        "BadRequest",
        "Backends[0]",
    )
    assert (await http.get("/v1.0/frontends/frontend1")).json["Backends"] == ["backend1", "later"]


@pytest_twisted.ensureDeferred
async def test_deleting_a_backend_a_frontend_lists_is_still_refused_unless_forced(
    http: Http,
) -> None:
    """As in 1.2; force removes it from the frontends, missing ones stay listed."""
    await http.put("/v1.0/frontends/frontend1", {"Backends": ["ghost", "backend1"]})
    assert_error(await http.delete("/v1.0/backends/backend1"), 409, "Conflict", "frontend1")
    assert (await http.delete("/v1.0/backends/backend1?force=true")).status == 204
    after = (await http.get("/v1.0/frontends/frontend1")).json
    assert after["Backends"] == ["ghost"] and after["MissingBackends"] == ["ghost"]


@pytest_twisted.ensureDeferred
async def test_missing_backends_survive_a_restart(tmp_path: Path) -> None:
    first = await start_daemon(tmp_path)
    await Http.to(first).put("/v1.0/frontends/frontend1", {"Backends": ["later", "backend1"]})
    await first.stopService()
    second = await start_daemon(tmp_path)
    try:
        got = (await Http.to(second).get("/v1.0/frontends/frontend1")).json
        assert got["Backends"] == ["later", "backend1"] and got["MissingBackends"] == ["later"]
    finally:
        await second.stopService()


@pytest_twisted.ensureDeferred
async def test_requests_go_to_the_backends_that_exist_and_to_a_missing_one_once_created(
    tmp_path: Path,
) -> None:
    fleet = DaemonUnderTest(await start_daemon(tmp_path, {"HealthCheckIntervalMs": 60000}))
    try:
        await fleet.add("real")
        await fleet.serve("real")
        reply = await fleet.http.put(
            "/v1.0/frontends/frontend1", {"Backends": ["late", "real"], "LoadBalancing": 1}
        )
        assert reply.status == 200 and reply.json["MissingBackends"] == ["late"]
        served = set()
        for _ in range(4):
            response = await treq.get(fleet.url + "/api/version", persistent=False)
            assert response.code == 200
            served.update(response.headers.getRawHeaders("x-ollamaflow-backend"))
            await response.content()
        assert served == {"real"}, "routing uses the backends that exist"

        await fleet.add("late")  # created through the admin API; checked at once
        runtime = fleet.daemon.runtime
        await until(lambda: runtime.state("late").healthy, what="the new backend checked")
        for _ in range(4):
            response = await treq.get(fleet.url + "/api/version", persistent=False)
            served.update(response.headers.getRawHeaders("x-ollamaflow-backend"))
            await response.content()
        assert served == {"real", "late"}, "routable as soon as it exists and is healthy"
    finally:
        await fleet.stop()


@pytest_twisted.ensureDeferred
async def test_a_frontend_whose_backends_are_all_missing_answers_503_naming_them(
    http: Http, daemon: Daemon
) -> None:
    await http.put("/v1.0/frontends/frontend1", {"Backends": ["ghost"]})
    response = await treq.get(f"{http.base}/api/tags", persistent=False)
    assert response.code == 503
    message = (await response.json())["error"]
    assert (
        message == "frontend 'frontend1' has no active backends; these do not exist (yet): 'ghost'"
    )


# -- GET, edit, PUT: every record the admin API serves goes back unchanged ----------------------


def _read_only_keys_filled(daemon: Daemon, backend: str) -> None:
    """Give ``backend`` every kind of runtime state the health record can show."""
    now = daemon.now()
    state = daemon.runtime.state(backend)
    state.failed(now, threshold=1, error="connection refused")
    state.succeeded(now, threshold=1)
    state.unhealthy_since = now  # both times at once: every optional key is written
    state.begin("llama3:latest")
    state.suspected(daemon.reactor_time.seconds() + 60)
    daemon.runtime.model_holds.blamed(backend, "big:latest", daemon.reactor_time.seconds(), 1)


async def _round_trip(http: Http, read: str, write: str) -> tuple[dict[str, Any], Any]:
    before = (await http.get(read)).json
    reply = await http.put(write, before)
    assert reply.status == 200, (read, reply.body)
    return before, reply.json


def _config_part(record: dict[str, Any], config_keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k in config_keys and k != "LastUpdateUtc"}


@pytest_twisted.ensureDeferred
async def test_every_record_read_with_get_goes_back_with_put_unchanged(
    http: Http, daemon: Daemon
) -> None:
    """For each record type: GET it, PUT it back as it is → 200 and the same record. A runtime
    key added to a GET and not accepted by PUT fails here, whichever it is."""
    await http.put(
        "/v1.0/backends",
        {
            "Identifier": "gpu1",
            "Hostname": "10.0.0.5",
            "Labels": ["a100"],
            "BearerToken": "secret",
            "Querystring": "a=1",
            "Headers": {"X-Team": "a"},
            "Name": "GPU one",
        },
    )
    await http.put(
        "/v1.0/frontends/frontend1",
        {"Backends": ["gpu1", "backend1", "later"], "Name": "chat", "RequiredModels": ["llama3"]},
    )
    _read_only_keys_filled(daemon, "gpu1")
    backend_keys = set((await http.get("/v1.0/backends/gpu1")).json)
    frontend_keys = set((await http.get("/v1.0/frontends/frontend1")).json) - {"MissingBackends"}

    cases = [
        ("/v1.0/frontends/frontend1", "/v1.0/frontends/frontend1", frontend_keys),
        ("/v1.0/backends/gpu1", "/v1.0/backends/gpu1", backend_keys),
        ("/v1.0/backends/gpu1/health", "/v1.0/backends/gpu1", backend_keys),
    ]
    for read, write, config_keys in cases:
        before, stored = await _round_trip(http, read, write)
        runtime_keys = set(before) - config_keys
        assert _config_part(stored, config_keys) == _config_part(before, config_keys), read
        if read.endswith("/health"):
            shown = {
                "Healthy",
                "InRotation",
                "ActiveRequests",
                "ActiveRequestsByModel",
                "ConsecutiveSuccesses",
                "ConsecutiveFailures",
                "HealthySinceUtc",
                "Uptime",
                "UnhealthySinceUtc",
                "Downtime",
                "LastCheckUtc",
                "LastError",
                "SteeredModels",
                "Frontends",
                "Placement",
            }
            assert runtime_keys == shown, "every runtime key was in the body PUT back"
    # The list routes serve the same records: each item goes back through its own route.
    for item in (await http.get("/v1.0/backends/health")).json:
        reply = await http.put(f"/v1.0/backends/{item['Identifier']}", item)
        assert reply.status == 200, reply.body
    for item in (await http.get("/v1.0/frontends")).json:
        reply = await http.put(f"/v1.0/frontends/{item['Identifier']}", item)
        assert reply.status == 200, reply.body


@pytest_twisted.ensureDeferred
async def test_read_only_keys_are_ignored_on_create_too_but_unknown_keys_are_still_400(
    http: Http,
) -> None:
    health = (await http.get("/v1.0/backends/backend1/health")).json
    copy = {**health, "Identifier": "copy", "Frontends": ["frontend1"], "InRotation": False}
    reply = await http.put("/v1.0/backends", copy)
    assert reply.status == 201, reply.body
    assert (await http.get("/v1.0/backends/copy/health")).json["Frontends"] == [], (
        "Frontends is read-only: listing is the frontend's Backends"
    )
    assert_error(
        await http.put("/v1.0/backends/copy", {**health, "Colour": "blue"}),
        400,
        "BadRequest",
        "unknown field",
        "Colour",
    )
    (
        assert_error(
            await http.put("/v1.0/frontends/frontend1", {"Healthy": True}),
            400,
            "BadRequest",
            "unknown field",
            "Healthy",
        ),
        "a backend's runtime key is not a frontend's",
    )
    (
        assert_error(
            await http.put("/v1.0/backends/copy", {"MissingBackends": []}),
            400,
            "BadRequest",
            "MissingBackends",
        ),
        "a frontend's runtime key is not a backend's",
    )
