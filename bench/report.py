"""Rows of results, target checks, the machine description, the printed table and the JSON."""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One line of the table; ``error`` set means the measurement failed (the run exits 1)."""

    scenario: str
    target: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    data: dict = field(default_factory=dict)


@dataclass
class Check:
    """A target (issues 7, 19), with what this run measured; ``passed`` None = not measured."""

    target: str
    measured: str
    passed: bool | None


def machine_info(twistd: str, nginx: str | None, wrk: str | None) -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "cpu": model or platform.processor() or "unknown",
        "memory_gib": round(memory_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": _first_line([twistd, "--version"]).removeprefix("twistd (the Twisted daemon) "),
        "nginx": _first_line([nginx, "-v"]).removeprefix("nginx version: ") if nginx else None,
        "wrk": _first_line([wrk, "-v"]).split(" [")[0] if wrk else None,
    }


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    header = ("scenario", "target", "req/s", "p50 ms", "p99 ms", "notes")
    cells = [
        (
            r.scenario,
            r.target,
            _number(r.rps, 0),
            _number(r.p50_ms, 3),
            _number(r.p99_ms, 3),
            "; ".join(([f"ERROR: {r.error}"] if r.error else []) + r.notes),
        )
        for r in rows
    ]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(5)]
    lines = []
    for i, c in enumerate([header, *cells]):
        left = [c[0].ljust(widths[0]), c[1].ljust(widths[1])]
        right = [c[k].rjust(widths[k]) for k in (2, 3, 4)]
        lines.append("  ".join([*left, *right, c[5]]).rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def checks_table(checks: list[Check]) -> str:
    mark = {True: "PASS", False: "FAIL", None: "n/a "}
    width = max((len(c.target) for c in checks), default=10)
    return "\n".join(f"{mark[c.passed]}  {c.target.ljust(width)}  {c.measured}" for c in checks)


def machine_line(machine: dict[str, object]) -> str:
    return (
        f"{machine['cores']} cores, {machine['cpu']}, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, Twisted {machine['twisted']}, "
        f"nginx {machine['nginx'] or '-'}, {machine['wrk'] or 'no wrk'}"
    )


def write_json(path: Path, document: dict[str, object], rows: list[Row], checks: list[Check]):
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **document,
        "rows": [asdict(r) for r in rows],
        "targets": [asdict(c) for c in checks],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def calls(one: Callable[[], None]) -> int:
    """Python and C function calls made by one call of ``one`` (after one call to warm it):
    the same on any machine and under any load, to compare two versions of the code."""
    one()
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        one()
    finally:
        sys.setprofile(None)
    return count


def best_microseconds(
    one: Callable[[], None],
    seconds: float,
    *,
    rounds: int,
    batch: int,
    clock: Callable[[], float],
) -> float:
    """Microseconds per call of ``one``: the best of ``rounds`` rounds of ``seconds`` /
    ``rounds`` each, calling it ``batch`` times between readings of ``clock`` (after a warm-up
    of 200 calls: caches and code paths)."""
    for _ in range(200):
        one()
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        count = 0
        began = clock()
        deadline = began + seconds / rounds
        while True:
            for _ in range(batch):
                one()
            count += batch
            now = clock()
            if now >= deadline:
                break
        best = min(best, (now - began) / count * 1e6)
    return best
