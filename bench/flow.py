"""The OllamaFlow daemon under test: its settings file, start, admin API calls, health wait."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from procs import BenchError, Child, Children, free_ports

FRONTEND = "frontend1"


@dataclass(frozen=True)
class BackendSpec:
    identifier: str
    port: int


class Daemon:
    """One ``twistd -n ollamaflow`` process with a settings file and database of its own."""

    def __init__(
        self,
        children: Children,
        twistd: str,
        repo: Path,
        name: str,
        workers: int,
        extra: dict[str, object] | None = None,
    ):
        self.children = children
        self.token = secrets.token_hex(16)
        self.port = free_ports(1)[0]
        self.folder = children.workdir / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings = self.folder / "ollamaflow.json"
        settings: dict[str, object] = {
            "Webserver": {"Hostname": "127.0.0.1", "Port": self.port},
            "DatabaseFilename": "ollamaflow.db",
            "AdminBearerTokens": [self.token],
            "Logging": {"MinimumSeverity": 3, "ConsoleLogging": True},
        }
        if workers != 1:
            settings["Workers"] = workers
        settings.update(extra or {})
        self.settings.write_text(json.dumps(settings, indent=2))
        argv = [twistd, "-n", "--pidfile=", "ollamaflow", "--config", str(self.settings)]
        self.child: Child = children.start(name, argv, cwd=repo)
        self.child.wait_port(self.port)
        self._wait_admin()

    def stop(self) -> None:
        self.children.stop(self.child)

    @property
    def pid(self) -> int:
        return self.child.pid

    def admin(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except OSError as e:
            raise BenchError(f"admin {method} {path}: {e}") from e
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def _wait_admin(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _ = self.admin("GET", "/v1.0/health")
            if status == 200:
                return
            time.sleep(0.1)
        raise BenchError(f"daemon admin API not ready within {timeout:.0f} s")

    def configure(self, backends: Sequence[BackendSpec]) -> None:
        """Make ``frontend1`` list exactly ``backends`` and delete every other backend."""
        _, listed = self.admin("GET", "/v1.0/backends")
        existing = {b["Identifier"] for b in listed} if isinstance(listed, list) else set()
        wanted = {b.identifier for b in backends}
        for spec in backends:
            record = {
                "Identifier": spec.identifier,
                "Hostname": "127.0.0.1",
                "Port": spec.port,
                # Limits are not what is measured here: keep them out of the way.
                "MaxParallelRequests": 100000,
                "RateLimitRequestsThreshold": 100000,
            }
            path = "/v1.0/backends" + (f"/{spec.identifier}" if spec.identifier in existing else "")
            self._expect(self.admin("PUT", path, record), (200, 201), f"PUT {path}")
        frontend = {"Identifier": FRONTEND, "Hostname": "*", "Backends": sorted(wanted)}
        self._expect(
            self.admin("PUT", f"/v1.0/frontends/{FRONTEND}", frontend), (200, 201), "PUT frontend"
        )
        for gone in sorted(existing - wanted):
            path = f"/v1.0/backends/{gone}?force=true"
            self._expect(self.admin("DELETE", path), (204, 404), f"DELETE {path}")

    def frontend(
        self,
        identifier: str,
        hostname: str,
        backends: Sequence[str],
        extra: Mapping[str, object] | None = None,
    ) -> None:
        """Add (or replace) a frontend answering requests whose Host is ``hostname``, with the
        fields of ``extra`` too (``{"RequireApiKey": True}``)."""
        record: dict[str, object] = {
            "Identifier": identifier,
            "Hostname": hostname,
            "Backends": list(backends),
            **(extra or {}),
        }
        status, _ = self.admin("GET", f"/v1.0/frontends/{identifier}")
        path = "/v1.0/frontends" + (f"/{identifier}" if status == 200 else "")
        self._expect(self.admin("PUT", path, record), (200, 201), f"PUT {path}")

    def api_key(self, record: Mapping[str, object]) -> tuple[str, str]:
        """Create an API key; returns its identifier and its secret (shown in this answer only)."""
        status, body = self.admin("POST", "/v1.0/apikeys", dict(record))
        self._expect((status, body), (201,), "POST /v1.0/apikeys")
        if not isinstance(body, dict) or not isinstance(body.get("Key"), str):
            raise BenchError("admin POST /v1.0/apikeys: no Key in the answer")
        return str(body["Identifier"]), body["Key"]

    def key_requests(self, identifier: str) -> int:
        """The requests the daemon counted on the API key ``identifier`` (the last 24 hours)."""
        path = f"/v1.0/apikeys/{identifier}/usage"
        status, body = self.admin("GET", path)
        totals = body.get("Totals") if isinstance(body, dict) else None
        count = totals.get("Requests") if isinstance(totals, dict) else None
        if status != 200 or not isinstance(count, int):
            raise BenchError(f"admin GET {path}: {status} {str(body)[:200]}")
        return count

    def status(self, method: str, path: str, body: str, headers: Mapping[str, str]) -> int:
        """The status of one client request (not an admin one: no admin token), with
        ``headers`` (``Host`` picks the frontend)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=body.encode() or None, method=method
        )
        for name, value in headers.items():
            request.add_header(name, value)
        if body:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as e:
            e.read()
            return e.code
        except OSError as e:
            raise BenchError(f"{method} {path}: {e}") from e

    @staticmethod
    def _expect(answer: tuple[int, object], ok: tuple[int, ...], what: str) -> None:
        status, body = answer
        if status not in ok:
            raise BenchError(f"admin {what}: {status} {str(body)[:200]}")

    def wait_healthy(self, identifiers: Sequence[str], timeout: float, polls: int = 3) -> float:
        """Seconds until every backend shows ``"Healthy": true`` in ``polls`` reads in a row.

        Several reads in a row because with more than one worker each read may be answered by
        a different process, each judging health itself.
        """
        started = time.monotonic()
        deadline = started + timeout
        streak = 0
        unhealthy: list[str] = list(identifiers)
        while time.monotonic() < deadline:
            status, records = self.admin("GET", "/v1.0/backends/health")
            healthy = {
                r.get("Identifier")
                for r in (records if isinstance(records, list) else [])
                if isinstance(r, dict) and r.get("Healthy") is True
            }
            unhealthy = [i for i in identifiers if i not in healthy]
            streak = streak + 1 if status == 200 and not unhealthy else 0
            if streak >= polls:
                return time.monotonic() - started
            time.sleep(0.05)
        raise BenchError(
            f"{len(unhealthy)} of {len(identifiers)} backends not healthy after {timeout:.0f} s "
            "(is the health checker running?)"
        )

    def wait_models(self, timeout: float) -> bool:
        """Wait until the aggregated ``/api/tags`` lists a model (the inventory has been read)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{self.port}/api/tags"
                with urllib.request.urlopen(url, timeout=5) as response:
                    if json.loads(response.read()).get("models"):
                        return True
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        return False


def supports_workers(python: str, repo: Path) -> bool:
    """Whether this checkout's settings know ``Workers`` (else the daemon ignores the key)."""
    import subprocess

    code = (
        "import attrs, ollamaflow.settings as s; print('workers' in attrs.fields_dict(s.Settings))"
    )
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, cwd=repo, timeout=30
    )
    return done.stdout.strip() == "True"
