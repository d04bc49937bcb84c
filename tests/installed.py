"""The real thing for end-to-end tests: the project installed from a built wheel into a fresh
virtualenv (once per test session), and ``twistd -n ollamaflow`` run from it in a folder."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import venv
from pathlib import Path

import attrs
import pytest
from harness import Http, until

import twisted

ROOT = Path(__file__).resolve().parent.parent

#: The twistd installed for each session (by its base temporary folder): the fixture is
#: imported by several test modules, and one installation serves them all.
_INSTALLED: dict[Path, Path] = {}


@pytest.fixture(scope="session", name="twistd")
def twistd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``twistd`` of a fresh virtualenv with the project installed from a built wheel (not
    editable); import it into a test module to use it there (as ``twistd``)."""
    session = tmp_path_factory.getbasetemp()
    if session not in _INSTALLED:
        _INSTALLED[session] = _install(tmp_path_factory.mktemp("install"))
    return _INSTALLED[session]


def _install(where: Path) -> Path:
    wheels = where / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    (wheel,) = wheels.glob("ollamaflow-*.whl")
    env_dir = where / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(wheel)], check=True)
    # The Twisted these tests run on, above setup.cfg's cap too (CI's newest-Twisted run):
    # pip may warn of the conflict with the cap; the daemon must work all the same.
    subprocess.run([*pip, f"twisted[tls]=={twisted.__version__}"], check=True)
    used = subprocess.run(
        [python, "-c", "import twisted; print(twisted.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert used == twisted.__version__, "the daemon under test runs the tests' Twisted"
    return env_dir / "bin" / "twistd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


TOKEN = "t0k"


@attrs.define
class Twistd:
    """``twistd -n ollamaflow`` in a folder of its own, its output in a file there (a pipe
    nobody reads could fill and stall it)."""

    proc: subprocess.Popen[bytes]
    output_path: Path

    @classmethod
    def spawn(cls, twistd: Path, folder: Path, *args: str) -> Twistd:
        """Start it; ``args`` follow ``ollamaflow``."""
        return cls(*_spawn(twistd, folder, args))

    @property
    def output(self) -> str:
        return self.output_path.read_text()

    async def terminate(self, seconds: float = 30) -> int:
        """SIGTERM it; its exit status once it has exited (negative: killed by that signal)."""
        self.proc.send_signal(signal.SIGTERM)
        await until(lambda: self.proc.poll() is not None, seconds, "the daemon exits")
        return self.proc.returncode

    def kill(self) -> None:
        """Make sure it is gone (a failed test must not leave it running)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _spawn(
    twistd: Path, folder: Path, args: tuple[str, ...]
) -> tuple[subprocess.Popen[bytes], Path]:
    output_path = folder / "output.log"
    with output_path.open("wb") as output:
        proc = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "ollamaflow", *args],
            cwd=folder,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return proc, output_path


@attrs.define
class Foreground(Twistd):
    """:class:`Twistd` on settings written for it: a free port, the admin token
    :data:`TOKEN`."""

    port: int = 0

    @classmethod
    def start(
        cls,
        twistd: Path,
        folder: Path,
        *args: str,
        settings_file: Path | None = None,
        **settings: object,
    ) -> Foreground:
        """``args`` follow ``ollamaflow``; ``settings_file`` (default: ollamaflow.json in
        ``folder``) is where the settings are written."""
        port = free_port()
        written = {
            "Webserver": {"Hostname": "127.0.0.1", "Port": port},
            "AdminBearerTokens": [TOKEN],
            "HealthCheckIntervalMs": 100,
            **settings,
        }
        (settings_file or folder / "ollamaflow.json").write_text(json.dumps(written))
        proc, output_path = _spawn(twistd, folder, args)
        return cls(proc, output_path, port)

    @property
    def http(self) -> Http:
        return Http(f"http://127.0.0.1:{self.port}", TOKEN)

    async def ready(self) -> None:
        async def answers() -> bool:
            return (await self.http.get("/v1.0/health")).status == 200

        await until(answers, 30, "the daemon answers", ignoring=(Exception,))

    async def serve(self, name: str, port: int) -> None:
        """Make frontend1 serve the simulator on ``port`` as backend ``name``; wait until the
        daemon routes to it (healthy, its models known)."""
        backend = {"Identifier": name, "Hostname": "127.0.0.1", "Port": port}
        assert (await self.http.put("/v1.0/backends", backend)).status == 201
        reply = await self.http.put("/v1.0/frontends/frontend1", {"Backends": [name]})
        assert reply.status == 200, reply.body

        async def routed() -> bool:
            reply = await self.http.get("/api/tags")
            if reply.status != 200:  # no backend healthy yet: 503 in Ollama's dialect
                return False
            return any(m["name"].startswith("llama3") for m in reply.json["models"])

        await until(routed, 30, "the daemon routes to the simulator")
