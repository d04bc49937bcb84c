"""The real thing: a non-editable install into a fresh virtualenv, run with ``twistd``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import pytest_twisted
import treq
from harness import until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def twistd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the project installed from a built wheel (not editable)."""
    where = tmp_path_factory.mktemp("install")
    wheels = where / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    (wheel,) = wheels.glob("ollamaflow-*.whl")
    env_dir = where / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(wheel)], check=True)
    return env_dir / "bin" / "twistd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


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
        token = {"Authorization": "Bearer ollamaflowadmin"}

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
    # twistd re-raises the signal after a clean shutdown, as Unix daemons should.
    assert proc.returncode == -signal.SIGTERM, output
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

        async def answers() -> bool:
            response = await treq.get(
                f"http://127.0.0.1:{port}/v1.0/health", headers={"Authorization": "Bearer t0k"}
            )
            body = await response.json()
            return bool(body["Status"] == "Running")

        await until(answers, 30, ignoring=(Exception,))
    finally:
        os.kill(pid, signal.SIGTERM)

    async def gone() -> bool:
        return not pidfile.exists()

    await until(gone, 30, ignoring=(Exception,))
    assert "OllamaFlow listening on" in (tmp_path / "flow.log").read_text()
