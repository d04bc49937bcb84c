"""Run one fixed-duration load test with wrk (when installed) or bench/loadgen.py.

Both give the same JSON shape: requests, errors, non_2xx, seconds, rps, p50_ms, p99_ms.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from procs import BenchError

HERE = Path(__file__).resolve().parent

# wrk's Lua hooks: the request to send, then a JSON summary on stdout (latency in microseconds).
_WRK_SCRIPT = """
wrk.method = %(method)s
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
if %(host)s then wrk.headers["Host"] = %(host)s end
if %(authorization)s then wrk.headers["Authorization"] = %(authorization)s end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nWRK-JSON {"requests": %%d, "seconds": %%f, "errors": %%d, "non_2xx": %%d, '
    .. '"p50_us": %%f, "p99_us": %%f}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: str = ""
    #: The Host header (which frontend answers); 127.0.0.1:port when None.
    host: str | None = None
    #: The Authorization header's value (``Bearer <key>``); none sent when None.
    authorization: str | None = None


@dataclass(frozen=True)
class LoadTool:
    """Which generator to use; ``wrk`` is the path of the binary, or None for our own."""

    wrk: str | None
    workdir: Path

    @property
    def name(self) -> str:
        return "wrk" if self.wrk else "bench/loadgen.py"

    def run(self, port: int, request: Request, connections: int, duration: float) -> dict:
        if self.wrk:
            return self._wrk(port, request, connections, duration)
        return self._loadgen(port, request, connections, duration)

    def _wrk(self, port: int, request: Request, connections: int, duration: float) -> dict:
        script = self.workdir / "wrk-request.lua"
        script.write_text(
            _WRK_SCRIPT
            % {
                "method": _lua(request.method),
                "body": _lua(request.body or None),
                "host": _lua(request.host),
                "authorization": _lua(request.authorization),
            }
        )
        seconds = max(1, round(duration))
        argv = [self.wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                "-s", str(script), f"http://127.0.0.1:{port}{request.path}"]  # fmt: skip
        out = _run(argv, seconds + 30)
        line = next((x for x in out.splitlines() if x.startswith("WRK-JSON ")), None)
        if line is None:
            raise BenchError(f"wrk printed no summary: {out.strip()[-300:]}")
        data = json.loads(line.removeprefix("WRK-JSON "))
        requests, elapsed = data["requests"], data["seconds"]
        good = requests - data["non_2xx"]
        return {
            "tool": "wrk",
            "requests": requests,
            "errors": data["errors"],
            "non_2xx": data["non_2xx"],
            "seconds": round(elapsed, 3),
            "rps": round(good / elapsed, 1) if elapsed else 0.0,
            "p50_ms": data["p50_us"] / 1000 if requests else None,
            "p99_ms": data["p99_us"] / 1000 if requests else None,
        }

    def _loadgen(self, port: int, request: Request, connections: int, duration: float) -> dict:
        argv = [sys.executable, str(HERE / "loadgen.py"), "--port", str(port),
                "--path", request.path, "--method", request.method, "--body", request.body,
                "--connections", str(connections), "--duration", str(duration)]  # fmt: skip
        if request.host:
            argv += ["--host", request.host]
        if request.authorization:
            argv += ["--authorization", request.authorization]
        out = _run(argv, duration + 30)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError) as e:
            raise BenchError(f"loadgen printed no summary: {out.strip()[-300:]}") from e


def find_wrk() -> str | None:
    return shutil.which("wrk")


def _lua(value: str | None) -> str:
    return "nil" if value is None else json.dumps(value)  # a JSON string is a valid Lua string


def _run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, start_new_session=True
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{Path(argv[0]).name} did not finish within {timeout:.0f} s") from e
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()[-300:]
        raise BenchError(f"{Path(argv[0]).name} exited {done.returncode}: {message}")
    return done.stdout
