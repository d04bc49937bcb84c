"""The real thing: a non-editable install into a fresh virtualenv, run with ``twistd``."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
import treq
from harness import Collect, until
from installed import ROOT, Foreground, free_port, run, twistd_fixture  # noqa: F401
from twisted.internet import reactor
from twisted.python import usage
from twisted.web.client import ResponseDone

from ollamaflow.sim import SimConfig, start_simulator
from ollamaflow.tap import Options


def test_twisted_is_capped_below_a_major_release() -> None:
    """Installs stay on the release line tested (CI tries the newest one apart)."""
    (requirement,) = [
        r for r in importlib.metadata.requires("ollamaflow") or [] if r.startswith("twisted")
    ]
    assert re.search(r"<\s*\d+\s*(,|$)", requirement), requirement


def test_the_plugin_is_listed(twistd: Path, tmp_path: Path) -> None:
    result = run([str(twistd), "--help"], tmp_path)
    assert result.returncode == 0
    assert "ollamaflow " in result.stdout and "ollamaflow-sim" in result.stdout
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()


def test_bad_options_are_a_usage_error_not_a_traceback(twistd: Path, tmp_path: Path) -> None:
    for args in (["--bogus"], ["stop"], ["start", "again"]):
        result = run([str(twistd), "-n", "ollamaflow", *args], tmp_path)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr + result.stdout
        assert "Usage:" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "config", "worker"),
    [
        ([], "ollamaflow.json", None),
        (["start"], "ollamaflow.json", None),
        (["--config", "/etc/of.json"], "/etc/of.json", None),
        (["--config", "/etc/of.json", "start"], "/etc/of.json", None),
        (["start", "--config", "/etc/of.json"], "/etc/of.json", None),  # as a unit file has it
        (["start", "-c", "/etc/of.json"], "/etc/of.json", None),
        (["start", "--config=/etc/of.json", "--worker", "2"], "/etc/of.json", 2),
        (["--worker", "3", "start", "--config", "a.json"], "a.json", 3),
        (["--config", "a.json", "start", "--config", "b.json"], "b.json", None),  # the last wins
        (["--config", "start"], "start", None),  # a value, not the command
    ],
)
def test_options_on_either_side_of_start(args: list[str], config: str, worker: int | None) -> None:
    options = Options()
    options.parseOptions(args)
    assert (options["config"], options["worker"]) == (config, worker)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["stop"], "Unknown command: stop"),
        (["start", "again"], "unexpected argument(s): again"),
        (["--config", "a.json", "start", "again"], "unexpected argument(s): again"),
        (["start", "--bogus"], "option --bogus not recognized"),
        (["start", "--config"], "option --config requires argument"),
        (["start", "--worker", "two"], "invalid literal for int()"),
    ],
)
def test_bad_options_on_either_side_of_start(args: list[str], error: str) -> None:
    with pytest.raises(usage.UsageError) as raised:
        Options().parseOptions(args)
    assert error in str(raised.value)


def test_bad_settings_stop_before_listening_in_one_line(twistd: Path, tmp_path: Path) -> None:
    (tmp_path / "ollamaflow.json").write_text(json.dumps({"Webserver": {"Port": 70000}}))
    result = run([str(twistd), "-n", "--pidfile=", "ollamaflow"], tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"ollamaflow: {tmp_path / 'ollamaflow.json'}: Webserver.Port: 70000 is not allowed; "
        "expected an integer from 0 to 65535"
    ]
    assert not (tmp_path / "ollamaflow.db").exists()


@pytest_twisted.ensureDeferred
async def test_foreground_daemon_in_an_empty_folder(twistd: Path, tmp_path: Path) -> None:
    """``twistd -n ollamaflow start`` writes its settings and database and serves the admin API
    on the default port 43411 with the default token."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 43411)) == 0:
            pytest.fail("port 43411 is taken by another process; this test needs the default")
    proc = subprocess.Popen(
        [str(twistd), "-n", "--pidfile=", "ollamaflow", "start"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        token: dict[bytes | str, bytes | str] = {"Authorization": "Bearer ollamaflowadmin"}

        async def answers() -> bool:
            response = await treq.get("http://127.0.0.1:43411/v1.0/backends", headers=token)
            await response.content()
            return bool(response.code == 200)

        await until(answers, 30, ignoring=(Exception,))
        assert sorted(
            p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))
        ) == [
            "ollamaflow.db",
            "ollamaflow.json",
        ]
        settings = json.loads((tmp_path / "ollamaflow.json").read_text())
        assert settings["Webserver"] == {"Hostname": "*", "Port": 43411, "MaxConnections": 4096}
        response = await treq.get("http://127.0.0.1:43411/v1.0/frontends", headers=token)
        assert [f["Identifier"] for f in await response.json()] == ["frontend1"]
        root = await treq.get("http://127.0.0.1:43411/")
        assert await root.text() == "Ollama is running"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    # A clean drain is a success: exit status 0, not the signal twistd would re-raise.
    assert proc.returncode == 0, output
    assert "Server Shut Down." in output
    # The open-files limit, raised only as far as MaxConnections needs, is logged either way.
    assert "open files limit" in output and "MaxConnections 4096" in output
    assert "default token" in output, "the default admin token is warned about"
    assert "ollamaflowadmin" not in output.replace("default token 'ollamaflowadmin'", "")


@pytest_twisted.ensureDeferred
async def test_daemonized_with_a_pidfile(twistd: Path, tmp_path: Path) -> None:
    port = free_port()
    settings = {"Webserver": {"Hostname": "127.0.0.1", "Port": port}, "AdminBearerTokens": ["t0k"]}
    (tmp_path / "ollamaflow.json").write_text(json.dumps(settings))
    result = run([str(twistd), "--pidfile=flow.pid", "--logfile=flow.log", "ollamaflow"], tmp_path)
    assert result.returncode == 0, result.stderr
    pidfile = tmp_path / "flow.pid"
    pid = int(pidfile.read_text())
    try:
        token: dict[bytes | str, bytes | str] = {"Authorization": "Bearer t0k"}

        async def answers() -> bool:
            response = await treq.get(f"http://127.0.0.1:{port}/v1.0/health", headers=token)
            body = await response.json()
            return bool(body["Status"] == "Running")

        await until(answers, 30, ignoring=(Exception,))
    finally:
        os.kill(pid, signal.SIGTERM)

    async def gone() -> bool:
        return not pidfile.exists()

    await until(gone, 30, ignoring=(Exception,))
    assert "OllamaFlow listening on" in (tmp_path / "flow.log").read_text()


async def stream(daemon: Foreground) -> Collect:
    """A streaming /api/generate through the daemon, its body arriving."""
    response = await treq.post(
        f"http://127.0.0.1:{daemon.port}/api/generate",
        json={"model": "llama3", "prompt": "x"},
        unbuffered=True,
        persistent=False,
    )
    assert response.code == 200, (response.code, await response.text())
    body = Collect()
    response.deliverBody(body)
    return body


@pytest_twisted.ensureDeferred
async def test_sigterm_on_an_idle_daemon_exits_0(twistd: Path, tmp_path: Path) -> None:
    """Nothing in flight: the drain is clean at once, and ``docker stop`` sees exit status 0."""
    daemon = Foreground.start(twistd, tmp_path)
    try:
        await daemon.ready()
        assert await daemon.terminate() == 0, daemon.output
        assert "Server Shut Down." in daemon.output
    finally:
        daemon.kill()


@pytest_twisted.ensureDeferred
async def test_sigterm_with_a_stream_that_ends_within_the_drain_timeout_exits_0(
    twistd: Path, tmp_path: Path
) -> None:
    """A stream in flight at SIGTERM finishes whole within DrainTimeoutMs: exit status 0."""
    sim = await start_simulator(reactor, config=SimConfig(tokens=20, tokens_per_second=40))
    daemon = Foreground.start(twistd, tmp_path)
    try:
        await daemon.ready()
        await daemon.serve("s", sim.port)
        body = await stream(daemon)
        await until(lambda: body.data.count(b"\n") >= 2, what="the stream has begun")
        assert await daemon.terminate() == 0, daemon.output
        await body.done
        assert body.reason is not None and body.reason.check(ResponseDone), body.reason
        assert json.loads(body.data.splitlines()[-1])["done"] is True
        assert len(body.data.splitlines()) == 21
        assert "draining 1 requests in flight" in daemon.output
        assert "cutting them off" not in daemon.output
    finally:
        daemon.kill()
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_sigterm_that_cuts_a_stream_off_exits_as_killed_by_it(
    twistd: Path, tmp_path: Path
) -> None:
    """A stream outlives DrainTimeoutMs and is cut off: not a success, so the process ends by
    SIGTERM as twistd re-raises it (status 143 to a shell, ``docker stop`` and systemd)."""
    sim = await start_simulator(reactor, config=SimConfig(tokens=400, tokens_per_second=20))
    daemon = Foreground.start(twistd, tmp_path, DrainTimeoutMs=300)
    try:
        await daemon.ready()
        await daemon.serve("s", sim.port)
        body = await stream(daemon)
        await until(lambda: body.data.count(b"\n") >= 1, what="the stream has begun")
        assert await daemon.terminate() == -signal.SIGTERM, daemon.output
        await body.done
        assert body.reason is not None and not body.reason.check(ResponseDone), (
            "cut off, never made to look complete"
        )
        assert "1 requests still in flight after 0.3s; cutting them off" in daemon.output
    finally:
        daemon.kill()
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_start_then_config_as_a_unit_file_has_it_with_syslog(
    twistd: Path, tmp_path: Path
) -> None:
    """``twistd -n ollamaflow start --config /etc/...`` (options after ``start``) runs with
    those settings, whose Logging.Servers get every line over UDP: start-up, access log."""
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.setblocking(False)
    received: list[bytes] = []

    def arrived(text: bytes) -> bool:
        with contextlib.suppress(BlockingIOError):
            while True:
                received.append(syslog.recv(65536))
        return any(text in data for data in received)

    etc, run_in = tmp_path / "etc", tmp_path / "elsewhere"
    etc.mkdir()
    run_in.mkdir()
    config = etc / "ollamaflow.json"
    servers = [{"Hostname": "localhost", "Port": syslog.getsockname()[1]}]
    daemon = Foreground.start(
        twistd,
        run_in,
        "start",
        "--config",
        str(config),
        settings_file=config,
        Logging={"Servers": servers, "MinimumSeverity": 1},
    )
    try:
        await daemon.ready()
        assert (etc / "ollamaflow.db").exists() and not (run_in / "ollamaflow.json").exists()
        reply = await daemon.http.request("POST", "/api/generate", {"model": "m", "prompt": "p"})
        assert reply.status >= 400  # no backend has it: the gateway's own answer
        line = b"[ollamaflow.access] POST /api/generate %d refused" % reply.status
        await until(lambda: arrived(line), what="the access line")
        listening = next(data for data in received if b"OllamaFlow listening on" in data)
        assert re.match(rb"<14>1 \S+Z \S+ ollamaflow \d+ - - \[ollamaflow.daemon\] ", listening)
        assert b"not supported" not in b"".join(received), "Logging.Servers is used now"
        assert await daemon.terminate() == 0, daemon.output
    finally:
        daemon.kill()
        syslog.close()
