"""Logs: JSON lines or text as the settings say, the level filter, and the access log end to end
(one line per proxied request, its fields, bodies only on request, never a secret)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from harness import Http, start_daemon, until
from twisted.logger import Logger, LogLevel, globalLogPublisher

from ollamaflow.accesslog import NAMESPACE, AccessLog
from ollamaflow.daemon import Daemon
from ollamaflow.gateway.completed import Completed
from ollamaflow.logs import json_line, logs_info, observer_for
from ollamaflow.settings import LogFormat, Logging
from ollamaflow.sim import SimConfig

ACCESS_FIELDS = {
    "request_id",
    "client",
    "frontend",
    "backend",
    "method",
    "path",
    "model",
    "status",
    "outcome",
    "bytes",
    "queued_ms",
    "ttfb_ms",
    "duration_ms",
    "retries",
}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert "\x1e" not in text, "plain JSON lines, not RFC 7464 records"
    return [json.loads(line) for line in text.splitlines()]


def completed(**kw: Any) -> Completed:
    fields: dict[str, Any] = {
        "request_id": "r1",
        "client": "10.0.0.7",
        "frontend": "frontend1",
        "backend": "gpu1",
        "method": "POST",
        "path": "/api/chat",
        "model": "llama3:latest",
        "status": 200,
        "outcome": "ok",
        "bytes": 1234,
        "queued": 0.0,
        "ttfb": 0.0421,
        "duration": 1.5,
        "retries": 0,
        **kw,
    }
    return Completed(**fields)


# -- the observers ---------------------------------------------------------------------------


def test_json_lines_one_object_per_line_with_the_event_fields() -> None:
    out = io.StringIO()
    observer = observer_for(Logging(format=LogFormat.JSON), None, out)
    log = Logger(namespace="ollamaflow.test", observer=observer)
    log.info("backend {backend} is healthy", backend="gpu1")
    log.warn("odd {thing}", thing=object(), multi="two\nlines")
    lines = lines_of(out)
    assert len(lines) == 2 == len(out.getvalue().splitlines())
    first, second = lines
    assert first["level"] == "info"
    assert first["namespace"] == "ollamaflow.test"
    assert first["message"] == "backend gpu1 is healthy"
    assert first["backend"] == "gpu1"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["level"] == "warn"
    assert second["thing"].startswith("<object object")  # not JSON-able: its repr
    assert second["multi"] == "two\nlines"
    assert not [key for line in lines for key in line if key.startswith("log_")]


def test_json_line_of_a_failure_has_its_traceback() -> None:
    out = io.StringIO()
    log = Logger(namespace="t", observer=observer_for(Logging(format=LogFormat.JSON), None, out))
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it broke")
    (line,) = lines_of(out)
    assert line["level"] == "critical"
    assert line["message"] == "it broke"
    assert "ZeroDivisionError" in line["traceback"]


def test_level_filter() -> None:
    out = io.StringIO()
    observer = observer_for(Logging(format=LogFormat.JSON, minimum_severity=2), None, out)
    log = Logger(namespace="t", observer=observer)
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    assert [line["message"] for line in lines_of(out)] == ["w", "e"]
    assert logs_info(Logging(minimum_severity=1))
    assert logs_info(Logging(minimum_severity=0))
    assert not logs_info(Logging(minimum_severity=2))


def test_auto_is_text_on_a_terminal_and_json_otherwise(tmp_path: Path) -> None:
    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        Logger(namespace="t", observer=observer_for(Logging(), None, stream)).info("hello {x}", x=1)
    assert "hello 1" in tty.getvalue() and not tty.getvalue().startswith("{")
    assert json.loads(pipe.getvalue())["message"] == "hello 1"

    forced = Terminal()
    Logger(observer=observer_for(Logging(format=LogFormat.JSON), None, forced)).info("j")
    assert json.loads(forced.getvalue())["message"] == "j"
    text = io.StringIO()
    Logger(observer=observer_for(Logging(format=LogFormat.TEXT), None, text)).info("plain")
    assert text.getvalue().rstrip().endswith("plain") and "{" not in text.getvalue()


def test_the_log_file_gets_the_same_format_choice(tmp_path: Path) -> None:
    auto_file, text_file = tmp_path / "logs" / "auto.log", tmp_path / "logs" / "text.log"
    quiet = {"console_logging": False}
    Logger(observer=observer_for(Logging(**quiet), auto_file)).info("to a file")
    Logger(observer=observer_for(Logging(**quiet, format=LogFormat.TEXT), text_file)).info("t")
    assert json.loads(auto_file.read_text())["message"] == "to a file"
    assert text_file.read_text().rstrip().endswith("t")
    assert not text_file.read_text().startswith("{")


# -- the access log, unit ----------------------------------------------------------------------


def capture() -> tuple[list[dict[str, Any]], Logger]:
    events: list[dict[str, Any]] = []
    return events, Logger(namespace=NAMESPACE, observer=events.append)


def test_access_event_fields_and_tokens() -> None:
    events, logger = capture()
    access = AccessLog(logger=logger)
    access(completed(eval_count=100, eval_duration_ns=2_000_000_000))
    (event,) = events
    assert event["log_level"] is LogLevel.info
    assert event["log_namespace"] == NAMESPACE
    line = json.loads(json_line(event))
    assert set(line) >= ACCESS_FIELDS
    assert line["ttfb_ms"] == 42.1 and line["duration_ms"] == 1500.0 and line["queued_ms"] == 0
    assert line["eval_count"] == 100 and line["tokens_per_second"] == 50.0
    assert "request_body" not in line and "response_body" not in line
    assert line["message"].startswith("POST /api/chat 200 ok client=10.0.0.7")
    assert "tokens=100 tokens_per_second=50.0" in line["message"]


def test_access_event_without_tokens_or_backend() -> None:
    events, logger = capture()
    AccessLog(logger=logger)(completed(backend=None, ttfb=None, status=503, outcome="refused"))
    line = json.loads(json_line(events[0]))
    assert line["backend"] is None and line["ttfb_ms"] is None
    assert "eval_count" not in line and "tokens_per_second" not in line
    assert "tokens=" not in line["message"]


def test_access_event_bodies_only_when_captured() -> None:
    events, logger = capture()
    AccessLog(logger=logger)(completed(request_body='{"a": 1}', response_body="done"))
    line = json.loads(json_line(events[0]))
    assert line["request_body"] == '{"a": 1}' and line["response_body"] == "done"
    assert "request_body='{\"a\": 1}'" in line["message"]


def test_a_disabled_access_log_emits_nothing() -> None:
    events, logger = capture()
    AccessLog(enabled=False, logger=logger)(completed())
    assert events == []


# -- end to end ----------------------------------------------------------------------------------


@attrs.define
class Captured:
    """Every log event of the process while a test runs, written as JSON lines and as text."""

    json_out: io.StringIO = attrs.field(factory=io.StringIO)
    text_out: io.StringIO = attrs.field(factory=io.StringIO)

    def access(self) -> list[dict[str, Any]]:
        return [line for line in lines_of(self.json_out) if line["namespace"] == NAMESPACE]


@pytest.fixture
def captured() -> Any:
    found = Captured()
    observers = [
        observer_for(Logging(format=LogFormat.JSON, minimum_severity=0), None, found.json_out),
        observer_for(Logging(format=LogFormat.TEXT, minimum_severity=0), None, found.text_out),
    ]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    yield found
    for observer in observers:
        globalLogPublisher.removeObserver(observer)


@pytest_twisted.async_yield_fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    running = await start_daemon(tmp_path)
    yield running
    await running.stopService()


async def serve(daemon: Daemon, sim_port: int, backend: dict[str, Any], **frontend: Any) -> Http:
    admin = Http.to(daemon)
    body = {"Identifier": "sim0", "Hostname": "127.0.0.1", "Port": sim_port, **backend}
    assert (await admin.put("/v1.0/backends", body)).status == 201
    reply = await admin.put("/v1.0/frontends/frontend1", {"Backends": ["sim0"], **frontend})
    assert reply.status == 200, reply.body
    await until(lambda: daemon.runtime.state("sim0").healthy)
    return Http.to(daemon, token=None)


@pytest_twisted.ensureDeferred
async def test_one_access_line_per_request_and_no_secret_anywhere(
    daemon: Daemon, simulators: Any, captured: Captured
) -> None:
    sim = await simulators(config=SimConfig(tokens_per_second=500))
    client = await serve(daemon, sim.port, {"BearerToken": "backend-secret"})
    secret = {"Authorization": "Bearer client-secret"}
    generate = {"model": "llama3", "prompt": "hi", "stream": False}
    assert (await client.request("POST", "/api/generate", generate, headers=secret)).status == 200
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.request("POST", "/api/chat", chat, headers=secret)).status == 200
    assert (await client.get("/api/version", headers=secret)).status == 200
    missing = {"model": "nosuchmodel", "prompt": "hi"}
    assert (await client.request("POST", "/api/generate", missing, headers=secret)).status == 404
    await until(lambda: len(captured.access()) == 4)

    gen, chat_line, version, refused = captured.access()
    for line in (gen, chat_line, version, refused):
        assert set(line) >= ACCESS_FIELDS, line
        assert line["level"] == "info" and line["frontend"] == "frontend1"
        assert line["client"] == "127.0.0.1"
        assert "request_body" not in line and "response_body" not in line
    assert gen["backend"] == "sim0" and gen["model"] == "llama3:latest"
    assert (gen["method"], gen["path"], gen["status"], gen["outcome"]) == (
        "POST",
        "/api/generate",
        200,
        "ok",
    )
    assert gen["bytes"] > 0 and gen["ttfb_ms"] is not None and gen["duration_ms"] >= 0
    assert gen["eval_count"] == 10 and gen["tokens_per_second"] > 0
    assert chat_line["eval_count"] == 10 and chat_line["path"] == "/api/chat"
    assert "eval_count" not in version and version["path"] == "/api/version"
    assert refused["status"] == 404 and refused["outcome"] == "refused"
    assert refused["backend"] is None

    everything = captured.json_out.getvalue() + captured.text_out.getvalue()
    for secret_text in ("client-secret", "backend-secret", "test-admin-token"):
        assert secret_text not in everything
    assert "POST /api/generate 200 ok" in captured.text_out.getvalue()


async def logged_bodies(daemon: Daemon, simulators: Any, captured: Captured) -> dict[str, Any]:
    """One request before and one after the frontend asks for bodies: the second's line."""
    sim = await simulators()
    client = await serve(daemon, sim.port, {})
    generate = {"model": "llama3", "prompt": "quiet please", "stream": False}
    assert (await client.request("POST", "/api/generate", generate)).status == 200
    await until(lambda: len(captured.access()) == 1)
    assert "quiet please" not in captured.json_out.getvalue()
    assert "request_body" not in captured.access()[0]
    assert "response_body" not in captured.access()[0]

    admin = Http.to(daemon)
    body = {"Backends": ["sim0"], "LogRequestBody": True, "LogResponseBody": True}
    assert (await admin.put("/v1.0/frontends/frontend1", body)).status == 200
    generate["prompt"] = "log me"
    assert (await client.request("POST", "/api/generate", generate)).status == 200
    await until(lambda: len(captured.access()) == 2)
    return captured.access()[1]


@pytest_twisted.ensureDeferred
async def test_response_bodies_are_logged_only_when_the_frontend_asks(
    daemon: Daemon, simulators: Any, captured: Captured
) -> None:
    line = await logged_bodies(daemon, simulators, captured)
    assert json.loads(line["response_body"])["done"] is True


@pytest_twisted.ensureDeferred
async def test_request_bodies_are_logged_only_when_the_frontend_asks(
    daemon: Daemon, simulators: Any, captured: Captured
) -> None:
    line = await logged_bodies(daemon, simulators, captured)
    assert "log me" in line.get("request_body", "")


@pytest_twisted.ensureDeferred
async def test_no_access_lines_when_the_level_drops_info(tmp_path: Path, simulators: Any) -> None:
    quiet = await start_daemon(
        tmp_path, {"Logging": {"ConsoleLogging": False, "MinimumSeverity": 2}}
    )
    try:
        assert not any(isinstance(o, AccessLog) for o in quiet.gateway.observers)
        response = await treq.get(f"http://127.0.0.1:{quiet.address.port}/", persistent=False)
        assert response.code == 200
        await response.content()
    finally:
        await quiet.stopService()
