"""Logs: JSON lines or text as the settings say, the level filter, and the access log end to end
(one line per proxied request, its fields, bodies only on request, never a secret)."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from completions import completed
from harness import Http, start_daemon, until
from hypothesis import given
from hypothesis import strategies as st
from logcapture import keeping
from twisted.logger import Logger, LogLevel, globalLogPublisher, textFileLogObserver
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from ollamaflow.accesslog import NAMESPACE, AccessLog
from ollamaflow.daemon import Daemon
from ollamaflow.logs import (
    MAX_VALUE_CHARS,
    clip,
    clipped,
    json_line,
    logs_info,
    observer_for,
    syslog_observer,
)
from ollamaflow.settings import LogFormat, Logging, SyslogServer
from ollamaflow.sim import SimConfig
from ollamaflow.syslog import MAX_DATAGRAM_BYTES, SyslogSender, datagram, header_field, resolve

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
    quiet = Logging(console_logging=False)
    Logger(observer=observer_for(quiet, auto_file)).info("to a file")
    text = attrs.evolve(quiet, format=LogFormat.TEXT)
    Logger(observer=observer_for(text, text_file)).info("t")
    assert json.loads(auto_file.read_text())["message"] == "to a file"
    assert text_file.read_text().rstrip().endswith("t")
    assert not text_file.read_text().startswith("{")


# -- the access log, unit ----------------------------------------------------------------------


def capture() -> tuple[list[dict[str, Any]], Logger]:
    events: list[dict[str, Any]] = []
    return events, Logger(namespace=NAMESPACE, observer=keeping(events))


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


def test_access_event_names_the_api_key_and_prompt_tokens_never_a_secret() -> None:
    """Which key asked (its Identifier), as the usage accounts it; anonymous requests say
    nothing more than before."""
    events, logger = capture()
    access = AccessLog(logger=logger)
    access(completed(api_key="team-a", eval_count=20, prompt_eval_count=7))
    access(completed())
    keyed, anonymous = (json.loads(json_line(e)) for e in events)
    assert keyed["api_key"] == "team-a" and " key=team-a" in keyed["message"]
    assert keyed["prompt_eval_count"] == 7 and "prompt_tokens=7" in keyed["message"]
    assert "api_key" not in anonymous and "key=" not in anonymous["message"]


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


# -- what a client can put into a line (issue #14) ------------------------------------------

HUGE = "m" * 5_000_000
FORGED = "x\n2026-01-01T00:00:00+0000 [ollamaflow#critical] forged"
#: ESC sequences (clear screen, set the window title), BEL, 8-bit CSI, DEL, a lone surrogate,
#: and the Unicode line separator (a line break to ``str.splitlines``).
NASTY = "\x1b[2J\x1b]0;owned\x07 \x9b31m \x7f \ud800 \u2028 end"
_files = itertools.count()


def more(count: int) -> str:
    """The marker ending a value cut after ``MAX_VALUE_CHARS``, of ``count`` characters."""
    return f"...[{count - MAX_VALUE_CHARS} more characters]"


def written(tmp_path: Path, emit: Callable[[Logger], object]) -> dict[str, str]:
    """What ``emit`` writes in each format to each target: text and JSON, console and file.

    The file is real (UTF-8, strict): a lone surrogate reaching it would raise.
    """
    out: dict[str, str] = {}
    for fmt in (LogFormat.TEXT, LogFormat.JSON):
        console, log_file = io.StringIO(), tmp_path / f"{fmt.value}-{next(_files)}.log"
        observer = observer_for(Logging(format=fmt, minimum_severity=0), log_file, console)
        emit(Logger(namespace="ollamaflow.test", observer=observer))
        out[f"{fmt.value} console"] = console.getvalue()
        out[f"{fmt.value} file"] = log_file.read_text(encoding="utf-8")
    assert out["text console"] == out["text file"] and out["json console"] == out["json file"]
    return out


def access(log: Logger, **kw: Any) -> None:
    """One access-log event, as the gateway's AccessLog emits it, to ``log``'s observer."""
    AccessLog(logger=Logger(namespace=NAMESPACE, observer=log.observer))(completed(**kw))


def test_a_huge_client_value_is_cut_in_every_line(tmp_path: Path) -> None:
    """The finding: a 5 MB model name wrote 5 MB to each log. Now each line stays short."""
    refusal = f"model '{HUGE}' not found"  # the gateway's f-string, passed as a field

    def emit(log: Logger) -> None:
        log.info("request {rid}: {status} {message}", rid="r1", status=404, message=refusal)
        access(log, model=HUGE, status=404, outcome="refused")
        access(log, path="/" + HUGE, model=HUGE, client=HUGE, status=404, outcome="refused")

    found = written(tmp_path, emit)
    for where, text in found.items():
        refused, one, three = text.splitlines()
        # JSON writes a value twice (in the message and as a field) next to ~650 characters
        # of other fields; and a line with more huge values is longer by as many clipped values.
        assert len(refused) < 1024 and len(one) < 1536 and len(three) < 4096, where
        assert more(len(refusal)) in refused, where
        assert more(len(HUGE)) in one and more(len(HUGE) + 1) in three, where
    refused, one, three = map(json.loads, found["json file"].splitlines())
    assert refused["message"] == "request r1: 404 " + refusal[:MAX_VALUE_CHARS] + more(len(refusal))
    assert one["model"] == three["model"] == HUGE[:MAX_VALUE_CHARS] + more(len(HUGE))
    assert three["path"] == "/" + HUGE[: MAX_VALUE_CHARS - 1] + more(len(HUGE) + 1)
    assert three["client"] == one["model"]


def test_non_string_values_are_cut_too(tmp_path: Path) -> None:
    """Objects and exceptions are rendered (str, repr, format spec) and then cut."""

    class Loud:
        def __repr__(self) -> str:
            return "L" * 5_000_000

    def emit(log: Logger) -> None:
        log.warn("odd {thing!r} {error}", thing=Loud(), error=ValueError("e" * 5_000_000))

    for where, text in written(tmp_path, emit).items():
        (line,) = text.splitlines()
        assert len(line) < 2048, (where, len(line))
        assert more(5_000_000) in line, where
    line = json.loads(written(tmp_path, emit)["json console"])
    assert line["thing"] == "L" * MAX_VALUE_CHARS + more(5_000_000)
    assert line["error"].startswith("ValueError('eee") and line["error"].endswith("characters]")


def test_an_unformattable_event_is_cut_too(tmp_path: Path) -> None:
    """Twisted writes an event it cannot format as its repr: whose values must be cut as well."""
    found = written(tmp_path, lambda log: log.info("{missing}", model=HUGE))
    for where, text in found.items():
        (line,) = text.splitlines()
        assert "Unable to format event" in line and len(line) < 2048, (where, len(line))


def test_a_value_cannot_forge_a_line(tmp_path: Path) -> None:
    def emit(log: Logger) -> None:
        log.warn("backend said {error} ({other})", error=FORGED, other="over\rwritten")

    found = written(tmp_path, emit)
    for where, text in found.items():
        assert text.count("\n") == 1 and text.endswith("\n") and "\r" not in text, where
    text = found["text console"]
    assert text.endswith(
        "backend said x\\n2026-01-01T00:00:00+0000 [ollamaflow#critical] forged (over\\rwritten)\n"
    )
    line = json.loads(found["json console"])
    assert line["message"] == text.split("] ", 1)[1].rstrip("\n")  # the text line's message
    assert line["error"] == FORGED  # a JSON field keeps the value: JSON escapes it


def test_terminal_sequences_and_lone_surrogates_are_escaped_never_raised(tmp_path: Path) -> None:
    found = written(tmp_path, lambda log: log.info("model {model}, {model!r}", model=NASTY))
    for where, text in found.items():
        assert text.count("\n") == 1 and text[:-1].isprintable(), (where, text)
        assert len(text.splitlines()) == 1
    escaped = "\\x1b[2J\\x1b]0;owned\\x07 \\x9b31m \\x7f \\ud800 \\u2028 end"
    assert found["text console"].endswith(f"model {escaped}, '{escaped}'\n")
    line = json.loads(found["json console"])
    assert line["model"] == NASTY  # lossless: JSON's own \\u escapes
    assert line["message"] == f"model {escaped}, '{escaped}'"


def test_a_traceback_is_whole_yet_cannot_forge_a_line_or_raise(tmp_path: Path) -> None:
    """Tracebacks are meant to be long: not cut. Their control characters are still escaped."""
    reason = "r" * 5000 + NASTY + FORGED

    def emit(log: Logger) -> None:
        try:
            raise ValueError(reason)
        except ValueError:
            log.failure("it broke")

    found = written(tmp_path, emit)
    text = found["text console"]
    first, *rest = text.splitlines()
    assert first.endswith("it broke") and rest
    assert all(line.startswith("\t") for line in rest)  # continuations, never a new entry
    assert "r" * 5000 + "\\x1b[2J" in text and "\\ud800" in text and "\x1b" not in text
    assert "\t2026-01-01T00:00:00+0000 [ollamaflow#critical] forged" in text
    raw = found["json console"]
    assert raw.count("\n") == 1 and raw[:-1].isprintable()
    line = json.loads(raw)
    assert "r" * 5000 + NASTY + FORGED in line["traceback"]


def test_a_legacy_error_keeps_its_traceback(tmp_path: Path) -> None:
    """twisted.python.log.err puts why and the traceback in ``log_text``: not cut either."""

    def emit(log: Logger) -> None:
        try:
            raise ValueError("r" * 5000)
        except ValueError:
            legacy_log.LogPublisher(publishPublisher=log.observer).msg(
                failure=Failure(), why="legacy", isError=1
            )

    found = written(tmp_path, emit)
    assert "r" * 5000 in found["text console"]
    assert "r" * 5000 in json.loads(found["json console"])["message"]


def test_logged_bodies_are_not_cut(tmp_path: Path) -> None:
    """The access log's opt-in bodies are bounded already (64 KiB) and escaped by !r or JSON."""
    body = '{"prompt": "' + "p" * 10_000 + '\\n"}'
    answer = "a" * 10_000 + "\x1b\x9b\ud800"

    def emit(log: Logger) -> None:
        access(log, request_body=body, response_body=answer)

    found = written(tmp_path, emit)
    (text,) = found["text console"].splitlines()
    assert f"request_body={body!r} response_body={answer!r}" in text
    raw = found["json console"]
    assert raw[:-1].isprintable()
    line = json.loads(raw)
    assert line["request_body"] == body and line["response_body"] == answer
    assert repr(answer) in line["message"]

    # Only the access log's: the same field name elsewhere is cut like any value.
    other = written(tmp_path, lambda log: log.info("{request_body}", request_body=HUGE))
    assert all(len(text) < 1024 for text in other.values())


def test_ordinary_values_are_written_exactly_as_before() -> None:
    """Short printable values: the event is not even copied, and text lines are twisted's own."""
    events, logger = capture()
    AccessLog(logger=logger)(completed(eval_count=100, eval_duration_ns=2_000_000_000))
    log = Logger(namespace="ollamaflow.test", observer=keeping(events))
    log.info("backend {backend} is healthy", backend="gpu1")
    log.warn(
        "n={n:>5} f={f()} {error} {thing!r} {legacy}",
        n=7,
        f=lambda: "called",
        error=OSError(24, "Too many open files"),
        thing=("a", 1),
        legacy="café ✓",
    )
    for event in events[:2]:
        assert clipped(event) is event
    for event in events:
        ours, theirs = io.StringIO(), io.StringIO()
        observer_for(Logging(format=LogFormat.TEXT), None, ours)(event)
        textFileLogObserver(theirs)(event)
        assert ours.getvalue() == theirs.getvalue()
    line = json.loads(json_line(events[-1]))
    assert line["message"] == "n=    7 f=called [Errno 24] Too many open files ('a', 1) café ✓"
    assert line["thing"] == ["a", 1] and line["n"] == 7 and line["legacy"] == "café ✓"


def test_clip() -> None:
    """The decision and the cut, as plain functions."""
    assert clip("llama3:latest") == "llama3:latest"
    assert clip("x" * MAX_VALUE_CHARS) == "x" * MAX_VALUE_CHARS
    assert clip("x" * 1000) == "x" * MAX_VALUE_CHARS + more(1000)
    assert clip("a\nb\r\t\x00\x1b\x7f\x85\xa0\u2028\ud800\U000e0001") == (
        "a\\nb\\r\\t\\x00\\x1b\\x7f\\x85\\xa0\\u2028\\ud800\\U000e0001"
    )
    # Escapes count towards the limit: the cut is on what is written.
    fits = MAX_VALUE_CHARS // len("\\x1b")
    assert clip("\x1b" * 1000) == "\\x1b" * fits + f"...[{1000 - fits} more characters]"
    assert len(clip("\ud800" * 5_000_000)) < MAX_VALUE_CHARS + 40
    assert clip("abcdef", limit=3) == "abc...[3 more characters]"
    fine = ["llama3:latest", "café ✓", "", 200, 1.5, True, None, -(10**20)]
    unfit = ["x" * (MAX_VALUE_CHARS + 1), "a\nb", "\x1b", "\ud800", object(), b"x", 10**400]
    for value in fine + unfit:
        event = {"log_format": "{v}", "v": value}
        assert (clipped(event) is event) is (value in fine), value


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


async def serve(daemon: Daemon, sim_port: int, backend: dict[str, Any], **frontend: Any) -> Http:
    admin = Http.to(daemon)
    body = {"Identifier": "sim0", "Hostname": "127.0.0.1", "Port": sim_port, **backend}
    assert (await admin.put("/v1.0/backends", body)).status == 201
    reply = await admin.put("/v1.0/frontends/frontend1", {"Backends": ["sim0"], **frontend})
    assert reply.status == 200, reply.body
    await until(lambda: daemon.runtime.state("sim0").healthy)
    # Its models too, so a model it lacks is the gateway's 404 (read right after the check).
    await until(lambda: daemon.inventory.known("sim0"))
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


@pytest_twisted.ensureDeferred
async def test_a_huge_model_name_does_not_fill_the_log(
    daemon: Daemon, simulators: Any, captured: Captured
) -> None:
    """The finding end to end: a 5 MB model name is refused (400) before any log or cache; a
    valid name of 551 characters that no backend has is named in the log, cut short (404)."""
    sim = await simulators()
    client = await serve(daemon, sim.port, {})
    huge = {"model": HUGE, "prompt": "hi"}
    assert (await client.request("POST", "/api/generate", huge)).status == 400
    name = "h" * 300 + ".example/" + "n" * 80 + "/" + "m" * 80 + ":" + "t" * 80
    long = {"model": name, "prompt": "hi"}
    assert (await client.request("POST", "/api/generate", long)).status == 404
    await until(lambda: len(captured.access()) == 2)
    text = captured.text_out.getvalue().splitlines()
    assert any("hhhhhhhhhh" in line and "(551 characters)" in line for line in text), text
    for out in (captured.json_out, captured.text_out):
        lines = out.getvalue().splitlines()
        # The access line names it twice in JSON (message and model), each cut short.
        assert all(len(line) < 2048 for line in lines if "hhhhhhhhhh" in line)
        assert len(out.getvalue()) < 100_000


# -- syslog forwarding (Logging.Servers) --------------------------------------------------------

SYSLOG = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<time>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
    rb"(?P<msgid>\S+) (?P<sd>-) (?P<msg>.*)",
    re.DOTALL,
)


class Listener:
    """A real UDP syslog server on 127.0.0.1: what arrived, in order, without waiting for
    more (loopback datagrams are there as soon as ``sendto`` returns)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]

    def received(self) -> list[bytes]:
        out: list[bytes] = []
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out

    def messages(self) -> list[re.Match[bytes]]:
        found = [SYSLOG.fullmatch(data) for data in self.received()]
        assert all(found), found
        return [m for m in found if m]


@pytest.fixture
def listeners() -> Any:
    made: list[Listener] = []

    def make() -> Listener:
        made.append(Listener())
        return made[-1]

    yield make
    for listener in made:
        listener.sock.close()


@pytest.fixture
def senders() -> Any:
    """``SyslogSender.open`` for a test, closed after it."""
    made: list[SyslogSender] = []

    def open_sender(*servers: SyslogServer) -> SyslogSender:
        sender, problems = SyslogSender.open(servers)
        assert problems == []
        made.append(sender)
        return sender

    yield open_sender
    for sender in made:
        sender.close()


def forwarding(sender: SyslogSender, console: io.StringIO | None = None, **kw: Any) -> Logger:
    logging = Logging(format=LogFormat.JSON, console_logging=console is not None, **kw)
    return Logger(
        namespace="ollamaflow.test", observer=observer_for(logging, None, console, sender)
    )


def test_every_line_reaches_the_syslog_server_with_its_severity(
    listeners: Any, senders: Any
) -> None:
    server = listeners()
    log = forwarding(senders(SyslogServer("127.0.0.1", server.port)), minimum_severity=0)
    before = time.time()
    log.debug("d {n}", n=1)
    log.info("i {n}", n=2)
    log.warn("w")
    log.error("e")
    log.critical("c")
    messages = server.messages()
    # facility user (1): PRI = 8 + severity; debug 7, info 6, warn 4, error 3, critical 2
    assert [int(m["pri"]) for m in messages] == [15, 14, 12, 11, 10]
    assert [m["msg"] for m in messages] == [
        b"[ollamaflow.test] d 1",
        b"[ollamaflow.test] i 2",
        b"[ollamaflow.test] w",
        b"[ollamaflow.test] e",
        b"[ollamaflow.test] c",
    ]
    for m in messages:
        assert m["app"] == b"ollamaflow" and m["procid"] == str(os.getpid()).encode()
        assert m["msgid"] == b"-" and m["host"] == socket.gethostname().encode()
        stamp = datetime.strptime(m["time"].decode(), "%Y-%m-%dT%H:%M:%S.%fZ")
        assert abs(stamp.replace(tzinfo=UTC).timestamp() - before) < 60


def test_lines_below_the_level_are_not_forwarded(listeners: Any, senders: Any) -> None:
    server = listeners()
    log = forwarding(senders(SyslogServer("127.0.0.1", server.port)), minimum_severity=2)
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.info("i again")
    assert [m["msg"] for m in server.messages()] == [b"[ollamaflow.test] w"]


def test_two_servers_both_get_every_line_and_a_host_name_works(
    listeners: Any, senders: Any
) -> None:
    first, second = listeners(), listeners()
    sender = senders(SyslogServer("127.0.0.1", first.port), SyslogServer("localhost", second.port))
    console = io.StringIO()
    log = forwarding(sender, console)
    log.info("one")
    log.warn("two")
    expected = [b"[ollamaflow.test] one", b"[ollamaflow.test] two"]
    assert [m["msg"] for m in first.messages()] == expected
    received = second.messages()
    assert [m["msg"] for m in received] == expected, "localhost resolves (to 127.0.0.1)"
    assert [line["message"] for line in lines_of(console)] == ["one", "two"], "console too"


def test_a_syslog_line_is_one_bounded_datagram_escaped_like_a_text_line(
    listeners: Any, senders: Any
) -> None:
    server = listeners()
    log = forwarding(senders(SyslogServer("127.0.0.1", server.port)))
    log.info("model {model}", model=FORGED)
    log.info("nasty {value}", value=NASTY)
    log.info("café {x}", x="ü" * 3000)
    access(log, request_body="b" * 100_000)  # a body is not clipped: the datagram is cut
    forged, nasty, accented, long = server.received()
    assert b"\n" not in forged and b"x\\n2026-01-01" in forged
    assert b"\x1b" not in nasty and b"\\x1b[2J" in nasty
    assert all(len(data) <= MAX_DATAGRAM_BYTES for data in (forged, nasty, accented, long))
    # Non-ASCII text: UTF-8 after a BOM (RFC 5424 §6.4), and never a broken character.
    assert b"- - \xef\xbb\xbf[ollamaflow.test] caf\xc3\xa9 " in accented
    assert accented.decode("utf-8").endswith("more characters]")  # clipped by the log first
    assert len(long) > MAX_DATAGRAM_BYTES - 8, "cut, not shortened more than the marker needs"
    assert re.search(rb"b\.\.\.\[\d+ more bytes\]$", long), long[-40:]


def test_a_traceback_keeps_its_lines(listeners: Any, senders: Any) -> None:
    server = listeners()
    log = forwarding(senders(SyslogServer("127.0.0.1", server.port)))
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it \x1b broke")
    (message,) = server.messages()
    assert int(message["pri"]) == 8 + 2
    text = message["msg"].decode()
    assert text.startswith("[ollamaflow.test] it \\x1b broke\nTraceback")
    assert "ZeroDivisionError" in text


@given(st.text(max_size=3000), st.text(max_size=300))
def test_datagram_is_bounded_whole_utf8_and_keeps_its_start(text: str, host: str) -> None:
    data = datagram(LogLevel.info, 0.0, header_field(host), 123, text)
    assert len(data) <= MAX_DATAGRAM_BYTES
    head, _, msg = data.partition(b" - - ")
    assert head.isascii() and b"\n" not in head
    assert head.startswith(b"<14>1 1970-01-01T00:00:00.000Z ")
    if msg.startswith(b"\xef\xbb\xbf"):
        msg = msg[3:]
    body = msg.decode("utf-8")  # whole characters only
    full = text.encode("utf-8", "backslashreplace").decode()
    if body != full:  # cut: only when it had to be, keeping the start, saying how much is left
        assert len(data) - len(msg) + len(full.encode()) > MAX_DATAGRAM_BYTES
        kept, _, marker = body.rpartition("...[")
        assert full.startswith(kept) and marker.endswith(" more bytes]")
        assert int(marker.split()[0]) == len(full.encode()) - len(kept.encode())


class Unsendable:
    """A socket whose every send fails, as with a full buffer or an unreachable network."""

    def __init__(self) -> None:
        self.attempts = 0

    def sendto(self, data: bytes, address: object) -> int:
        self.attempts += 1
        raise OSError(101, "Network is unreachable")

    def close(self) -> None:
        pass


def test_a_failed_send_never_raises_and_is_told_once_elsewhere() -> None:
    (destination,), _ = resolve([SyslogServer("127.0.0.1", 9)])
    broken = Unsendable()
    sender = SyslogSender([destination], sockets={destination.family: broken})  # type: ignore[dict-item]
    console = io.StringIO()
    log = forwarding(sender, console)
    for n in range(3):
        log.info("line {n}", n=n)
    assert broken.attempts == 3 == sender.dropped, "each line tried; none sent"
    lines = lines_of(console)
    warnings = [line for line in lines if line["level"] == "warn"]
    assert len(warnings) == 1, "said once, to the console and file only (never to syslog)"
    assert "syslog server 127.0.0.1:9: cannot send" in warnings[0]["message"]
    assert [line["message"] for line in lines if line["level"] == "info"] == [
        "line 0",
        "line 1",
        "line 2",
    ]


def test_a_server_that_does_not_resolve_is_named_and_left_out() -> None:
    def getaddrinfo(host: str, port: int, *_: object) -> list[tuple[Any, ...]]:
        if host == "nowhere.invalid":
            raise socket.gaierror(-2, "Name or service not known")
        return socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)

    servers = [SyslogServer("nowhere.invalid", 514), SyslogServer("*", 514)]
    servers.append(SyslogServer("127.0.0.1", 5514))
    sender, problems = SyslogSender.open(servers, getaddrinfo)
    try:
        assert [str(d) for d in sender.destinations] == ["127.0.0.1:5514"]
        assert problems[0] == "cannot resolve nowhere.invalid: [Errno -2] Name or service not known"
        assert problems[1] == "'*' is not a syslog server's address"
        assert len(problems) == 2
    finally:
        sender.close()
    sender.send(b"after close")  # nowhere to go: no error either


def test_an_odd_event_is_forwarded_or_dropped_never_raised(listeners: Any, senders: Any) -> None:
    server = listeners()
    observer = syslog_observer(senders(SyslogServer("127.0.0.1", server.port)), "h\x00st name")
    observer({})  # no level, no time, no namespace, no format
    observer({"log_format": "{x!r}", "x": Unrepresentable(), "log_level": LogLevel.warn})
    first, second = server.messages()
    assert first["host"] == b"h_st_name" and int(first["pri"]) == 14
    assert int(second["pri"]) == 12


class Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("no")
