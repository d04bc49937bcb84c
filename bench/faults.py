"""Failover under load (issue 16): 30 mixed clients, three simulated backends, one fault at a time.

    python bench/faults.py                      # each fault for 10 s: 1.5-2.5 minutes
    python bench/faults.py --smoke              # each fault for 2 s: 30-45 s (CI)
    python bench/faults.py --faults hang,error500 --window 5

Starts three simulators paced like a small GPU and the daemon (``twistd -n ollamaflow``) in
front of them, keeps ``--clients`` clients busy with streaming ``/api/chat``, non-streaming
``/api/generate`` and ``/api/embed``, and injects each fault in turn on one backend for
``--window`` seconds. Per fault it prints what the clients saw and how long the daemon took to
take the backend out of rotation and to put it back. The goal (issue 16) is PASS when the only
failures are responses the faulted backend cut after their first byte. The exit code is 1 only
when the harness itself failed (a row says ERROR), never because a goal was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import random
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from flow import BackendSpec, Daemon
from httpwire import ProtocolError, ResponseParser, build_request
from procs import BenchError, Children, exit_on_signals, find_twistd, free_ports, raise_nofile_limit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FRONTEND = "frontend1"
CHAT_MODEL = "llama3"
EMBED_MODEL = "all-minilm"
#: Request kinds, their paths and their shares of what each client sends.
PATHS = {"chat": "/api/chat", "generate": "/api/generate", "embed": "/api/embed"}
MIX = {"chat": 0.4, "generate": 0.3, "embed": 0.3}


@attrs.frozen
class Fault:
    """One fault: the simulator knobs that start it and those that end it."""

    key: str
    label: str
    on: Mapping[str, object]
    #: None: the simulator ends it by itself (``refuse_seconds``); it answers nothing meanwhile.
    off: Mapping[str, object] | None


def all_faults(window: float, drop_after: int) -> list[Fault]:
    """Every fault of issue 16, in the order they run."""
    return [
        Fault("refuse", "refused", {"refuse": True, "refuse_seconds": window}, None),
        Fault("reset_head", "reset mid-head", {"reset_head": True}, {"reset_head": False}),
        Fault("hang", "hang", {"hang": True}, {"hang": False}),
        Fault("error500", "error 500", {"error500": True}, {"error500": False}),
        Fault(
            "drop",
            "mid-stream cuts",
            {"drop_mid_stream_after": drop_after},
            {"drop_mid_stream_after": None},
        ),
    ]


FAULT_KEYS = tuple(f.key for f in all_faults(1.0, 1))
#: Knobs that end every fault: set before each row, so a row starts on healthy simulators.
NO_FAULTS = {"refuse": False, "reset_head": False, "hang": False, "error500": False,
             "drop_mid_stream_after": None}  # fmt: skip


@attrs.frozen
class Plan:
    """Sizes and settings of the run; ``--smoke`` shrinks the times, never the load."""

    smoke: bool
    faults: tuple[str, ...]
    clients: int
    window: float
    lead: float
    seed: int
    backends: int = 3
    victim: int = 0
    tps: float = 50.0
    ttft: float = 0.05
    tokens: tuple[int, int] = (20, 40)
    slots: int = 6
    timeout_ms: int = 8000
    rate_limit: int = 100
    health_interval_ms: int = 1000
    health_timeout_ms: int = 1000
    poll: float = 0.05
    recovery_timeout: float = 30.0
    client_timeout: float = 60.0
    drop_after: int = 3

    @property
    def victim_id(self) -> str:
        return f"sim{self.victim}"

    def settings_lines(self, records: Mapping[str, str]) -> list[str]:
        """What the run used, for the report; ``records`` as :func:`read_settings` gives them."""
        low, high = self.tokens
        mix = ", ".join(f"{share:.0%} {PATHS[kind]}" for kind, share in MIX.items())
        unread = "(not read: the daemon did not start)"
        return [
            f"simulators: {self.backends} ollamaflow-sim, {self.tps:g} tokens/s, ttft "
            f"{self.ttft:g} s, {low}-{high} tokens (num_predict), --num-parallel {self.slots}, "
            "load time 0",
            f"daemon: HealthCheckIntervalMs {self.health_interval_ms}, HealthCheckTimeoutMs "
            f"{self.health_timeout_ms}",
            f"backends: {records.get('backend', unread)}",
            f"frontend: {records.get('frontend', unread)}",
            f"load: {self.clients} clients, one request at a time each, a new connection per "
            f"request: {mix} (chat streaming, generate not)",
            f"faults: on {self.victim_id} for {self.window:g} s after {self.lead:g} s of load "
            f"(mid-stream cuts: drop_mid_stream_after {self.drop_after}); "
            f"health polled every {self.poll * 1000:.0f} ms; a row begins with every backend in "
            f"rotation (a fresh daemon if one is still out after {self.recovery_timeout:g} s) and "
            f"ends once {self.victim_id} is back in rotation (or {self.recovery_timeout:g} s after "
            "the fault) and every request in flight has ended",
        ]


@attrs.frozen
class Outcome:
    """What one client request came to."""

    kind: str
    #: "ok", "cut" (2xx received, then the response broke off) or "failed" (no 2xx head).
    verdict: str
    #: Empty when ok; else the status (``502``) or what went wrong (``ECONNRESET``, ``timeout``).
    reason: str
    #: ``X-OllamaFlow-Backend`` of the answer ("" when there was none).
    backend: str


@attrs.define
class Row:
    """One fault's line of the table."""

    fault: str
    sent: int = 0
    ok: int = 0
    cut: int = 0
    failed: int = 0
    failed_reasons: Counter[str] = attrs.Factory(Counter)
    #: Cut responses by backend:reason.
    cut_reasons: Counter[str] = attrs.Factory(Counter)
    cuts_elsewhere: int = 0
    #: Seconds from the fault's start until the backend was marked unhealthy (None: never).
    left: float | None = None
    #: Seconds from the fault's end until it was healthy for good (None: never; negative: it
    #: was back before the fault ended).
    back: float | None = None
    was_down: bool = False
    #: Times it re-entered rotation while the fault was still on (the last of them too, when
    #: ``back`` is negative).
    flaps: int = 0
    #: What the faulted simulator counted: API requests while faulted (health checks on `/`
    #: left out; None for `refuse`, which takes none), streams it cut and heads it reset during
    #: the row. Proof that the fault bit.
    victim_requests: int | None = None
    victim_cut: int = 0
    victim_resets: int = 0
    notes: list[str] = attrs.Factory(list)
    error: str | None = None

    @property
    def goal(self) -> str:
        if self.error is not None:
            return "ERROR"
        return "PASS" if self.failed == 0 and self.cuts_elsewhere == 0 else "FAIL"

    def as_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["goal"] = self.goal
        return data


# --- the clients --------------------------------------------------------------------------


def request_body(kind: str, rng: random.Random, number: int, tokens: tuple[int, int]) -> bytes:
    """A request of ``kind`` for the simulators' models; generations get ``tokens`` (low, high)."""
    count = rng.randint(*tokens)
    if kind == "chat":
        body: dict[str, object] = {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": f"question {number}"}],
            "stream": True,
            "options": {"num_predict": count},
        }
    elif kind == "generate":
        body = {
            "model": CHAT_MODEL,
            "prompt": f"story {number}",
            "stream": False,
            "options": {"num_predict": count},
        }
    else:
        body = {"model": EMBED_MODEL, "input": f"text {number}"}
    return json.dumps(body).encode()


@attrs.define
class _Reading:
    """A response as it arrives."""

    status: int = 0
    backend: str = ""
    body: bytearray = attrs.Factory(bytearray)
    complete: bool = False
    error: str | None = None

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.backend = headers.get("x-ollamaflow-backend", "")

    def data(self, piece: bytes) -> None:
        self.body += piece

    def done(self) -> None:
        self.complete = True


async def exchange(port: int, kind: str, body: bytes, limit: float) -> Outcome:
    """One request on a connection of its own, read to its end (or ``limit`` seconds)."""
    request = build_request("POST", f"127.0.0.1:{port}", PATHS[kind], body)
    reading = _Reading()
    parser = ResponseParser(reading.head, reading.data, reading.done)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            while not reading.complete:
                data = await reader.read(65536)
                if not data:
                    if not parser.connection_closed():
                        reading.error = "closed"
                    break
                parser.feed(data)
    except TimeoutError:
        reading.error = "timeout"
    except (ProtocolError, ValueError) as e:
        reading.error = f"protocol: {e}"
    except OSError as e:
        reading.error = errno.errorcode.get(e.errno or 0, type(e).__name__)
    finally:
        if writer is not None:
            writer.close()
    verdict, reason = judge(kind, reading)
    return Outcome(kind, verdict, reason, reading.backend)


def judge(kind: str, reading: _Reading) -> tuple[str, str]:
    """Verdict and reason: no 2xx head is "failed"; a 2xx that did not end whole is "cut"."""
    if reading.status == 0:
        return "failed", reading.error or "no response"
    if not 200 <= reading.status < 300:
        return "failed", str(reading.status)
    if reading.error is not None:
        return "cut", reading.error
    if kind == "chat":
        lines = bytes(reading.body).split(b"\n")
        if any(b'"done":true' in line.replace(b" ", b"") for line in lines):
            return "ok", ""
        return "cut", "no done:true"
    try:
        document = json.loads(reading.body)
    except ValueError:
        return "cut", "not JSON"
    if not isinstance(document, dict):
        return "cut", "not an object"
    if kind == "generate" and document.get("done") is True:
        return "ok", ""
    if kind == "embed" and document.get("embeddings"):
        return "ok", ""
    return "cut", "unexpected body"


async def client(
    port: int, plan: Plan, index: int, rng: random.Random, stop: asyncio.Event, out: list[Outcome]
) -> None:
    """Send requests of the mix one after another until ``stop`` is set."""
    kinds, weights = list(MIX), list(MIX.values())
    number = index * 1_000_000
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        number += 1
        body = request_body(kind, rng, number, plan.tokens)
        out.append(await exchange(port, kind, body, plan.client_timeout))


# --- health of the faulted backend ----------------------------------------------------------


async def backend_health(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """``GET /v1.0/backends/health``: each backend's record by identifier."""
    status, records = await asyncio.to_thread(daemon.admin, "GET", "/v1.0/backends/health")
    if status != 200 or not isinstance(records, list):
        raise BenchError(f"GET /v1.0/backends/health: {status} {str(records)[:200]}")
    return {r["Identifier"]: r for r in records if isinstance(r, dict) and "Identifier" in r}


def in_rotation(record: Mapping[str, Any] | None) -> bool:
    """Whether the daemon sends every request there: ``InRotation`` (healthy, and not held out
    after a failed request) where the daemon reports it, else ``Healthy``; and no model steered
    away from it after 500s."""
    if record is None or record.get("SteeredModels"):  # models steered away after 500s
        return False
    return record.get("InRotation", record.get("Healthy")) is True


async def wait_in_rotation(daemon: Daemon, ids: Sequence[str], limit: float, poll: float) -> bool:
    """Wait until every backend in ``ids`` is in rotation three polls in a row; False if not
    within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    streak = 0
    while time.monotonic() < deadline:
        states = await backend_health(daemon)
        streak = streak + 1 if all(in_rotation(states.get(i)) for i in ids) else 0
        if streak >= 3:
            return True
        await asyncio.sleep(poll)
    return False


class HealthWatch:
    """Polls ``GET /v1.0/backends/health`` and keeps (time, in rotation) of one backend."""

    def __init__(self, daemon: Daemon, identifier: str, poll: float) -> None:
        self.daemon = daemon
        self.identifier = identifier
        self.poll = poll
        self.samples: list[tuple[float, bool]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            record = (await backend_health(self.daemon)).get(self.identifier)
            if record is None:
                raise BenchError(f"GET /v1.0/backends/health does not list {self.identifier}")
            self.samples.append((time.monotonic(), in_rotation(record)))
            await asyncio.sleep(max(0.0, self.poll - (time.monotonic() - began)))

    def in_rotation_for(self, polls: int, since: float) -> bool:
        """The last ``polls`` samples, all taken after ``since``, say in rotation."""
        last = self.samples[-polls:]
        return len(last) == polls and last[0][0] >= since and all(h for _, h in last)

    def out_since(self, since: float) -> bool:
        """Some sample taken after ``since`` says out of rotation."""
        return any(not h for t, h in self.samples if t >= since)


def timings(samples: Sequence[tuple[float, bool]], start: float, end: float, row: Row) -> None:
    """Fill ``left``, ``back``, ``was_down`` and ``flaps`` from the samples of one row."""
    after = [(t, h) for t, h in samples if t >= start]
    down = next((t for t, h in after if not h), None)
    if down is None:
        return
    row.was_down = True
    row.left = down - start
    previous = True
    for t, healthy in after:
        if healthy and not previous and t < end:
            row.flaps += 1
        previous = healthy
    if after[-1][1]:
        final = len(after) - 1
        while final > 0 and after[final - 1][1]:
            final -= 1
        row.back = after[final][0] - end


# --- processes and configuration ------------------------------------------------------------


class FaultDaemon(Daemon):
    """``flow.Daemon`` with the health-check pace of this run in its settings file."""

    def __init__(self, children: Children, twistd: str, plan: Plan, name: str) -> None:
        pace = {
            "HealthCheckIntervalMs": plan.health_interval_ms,
            "HealthCheckTimeoutMs": plan.health_timeout_ms,
        }
        super().__init__(children, twistd, REPO, name, 1, pace)


FRONTEND_FIELDS = ("LoadBalancing", "AllowRetries", "TimeoutMs", "MaxQueueDepth", "QueueTimeoutMs")
BACKEND_FIELDS = ("MaxParallelRequests", "ModelParallelRequests", "RateLimitRequestsThreshold",
                  "UnhealthyThreshold", "HealthyThreshold", "HealthCheckMethod",
                  "HealthCheckUrl")  # fmt: skip


def read_settings(daemon: Daemon, backend: str) -> dict[str, str]:
    """The frontend's and one backend's settings as the daemon holds them, one line each."""
    out = {}
    for key, path, fields in (
        ("frontend", f"/v1.0/frontends/{FRONTEND}", FRONTEND_FIELDS),
        ("backend", f"/v1.0/backends/{backend}", BACKEND_FIELDS),
    ):
        status, record = daemon.admin("GET", path)
        if status != 200 or not isinstance(record, dict):
            raise BenchError(f"admin GET {path}: {status} {str(record)[:200]}")
        out[key] = ", ".join(f"{name} {json.dumps(record.get(name))}" for name in fields)
    return out


@attrs.define
class Rig:
    """What runs under test: the simulators, started once, and the daemon, started again when
    a row cannot begin with every backend in rotation (so each row measures its own fault)."""

    children: Children
    twistd: str
    plan: Plan
    specs: list[BackendSpec] = attrs.Factory(list)
    daemon: FaultDaemon | None = None
    starts: int = 0
    #: The settings the daemon reported, for the report (see :func:`read_settings`).
    records: dict[str, str] = attrs.Factory(dict)

    @property
    def ids(self) -> list[str]:
        return [s.identifier for s in self.specs]

    def start(self) -> None:
        """Start the simulators and a configured daemon; return once they serve."""
        self.specs = start_simulators(self.children, self.twistd, self.plan)
        self.start_daemon()

    def start_daemon(self) -> FaultDaemon:
        """A fresh daemon (stopping the one before), configured, healthy, its models read."""
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        self.starts += 1
        name = "ollamaflow" if self.starts == 1 else f"ollamaflow-{self.starts}"
        daemon = FaultDaemon(self.children, self.twistd, self.plan, name)
        configure(daemon, self.specs, self.plan)
        daemon.wait_healthy(self.ids, timeout=20)
        if not daemon.wait_models(timeout=20):
            raise BenchError("the aggregated /api/tags listed no model within 20 s")
        self.records = read_settings(daemon, self.specs[self.plan.victim].identifier)
        self.daemon = daemon
        return daemon


def start_simulators(children: Children, twistd: str, plan: Plan) -> list[BackendSpec]:
    """The paced simulators, listening; their backend records' identifiers are sim0, sim1..."""
    ports = free_ports(plan.backends)
    started = []
    for i, port in enumerate(ports):
        argv = [
            twistd, "-n", "--pidfile=", "ollamaflow-sim", "--port", str(port),
            "--models", f"{CHAT_MODEL},{EMBED_MODEL}", "--tokens", str(plan.tokens[1]),
            "--tokens-per-second", str(plan.tps), "--ttft", str(plan.ttft), "--load-time", "0",
            "--num-parallel", str(plan.slots), "--keep-alive=-1", "--no-host-check",
        ]  # fmt: skip
        started.append(children.start(f"sim{i}", argv))
    for child, port in zip(started, ports, strict=True):
        child.wait_port(port)
    return [BackendSpec(f"sim{i}", port) for i, port in enumerate(ports)]


def configure(daemon: Daemon, specs: Sequence[BackendSpec], plan: Plan) -> None:
    """Backends with ``slots`` each behind one LeastOutstanding frontend that retries."""
    daemon.configure(specs)
    for spec in specs:
        record = {"Identifier": spec.identifier, "Hostname": "127.0.0.1", "Port": spec.port,
                  "MaxParallelRequests": plan.slots,
                  "RateLimitRequestsThreshold": plan.rate_limit}  # fmt: skip
        expect(daemon.admin("PUT", f"/v1.0/backends/{spec.identifier}", record), "PUT backend")
    frontend = {"Identifier": FRONTEND, "Hostname": "*",
                "Backends": [s.identifier for s in specs], "LoadBalancing": "LeastOutstanding",
                "AllowRetries": True, "TimeoutMs": plan.timeout_ms}  # fmt: skip
    expect(daemon.admin("PUT", f"/v1.0/frontends/{FRONTEND}", frontend), "PUT frontend")


def expect(answer: tuple[int, object], what: str) -> None:
    status, body = answer
    if status not in (200, 201):
        raise BenchError(f"admin {what}: {status} {str(body)[:200]}")


def sim_call(port: int, method: str, path: str, body: object | None = None) -> object:
    """A ``/_sim/`` control request to one simulator; its JSON answer (BenchError unless 200)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise BenchError(f"simulator {method} {path}: {e.code} {e.read()[:200]!r}") from e
    except (OSError, ValueError) as e:
        raise BenchError(f"simulator {method} {path}: {e}") from e


async def sim_counters(port: int) -> dict[str, Any]:
    """A simulator's counters (``GET /_sim/state``)."""
    state = await asyncio.to_thread(sim_call, port, "GET", "/_sim/state")
    counters = state.get("counters") if isinstance(state, dict) else None
    if not isinstance(counters, dict):
        raise BenchError(f"simulator on {port}: /_sim/state has no counters")
    return counters


async def api_requests(port: int) -> int:
    """API requests a simulator has received since its counters were reset, health checks on
    ``/`` left out."""
    requests = (await sim_counters(port)).get("requests", {})
    return sum(n for path, n in requests.items() if path != "/")


async def until_listening(port: int, limit: float) -> float:
    """Poll a refusing simulator's ``/_sim/config`` until it answers; the time it did."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            await asyncio.to_thread(sim_call, port, "GET", "/_sim/config")
            return time.monotonic()
        except BenchError:
            await asyncio.sleep(0.02)
    raise BenchError(f"simulator on {port} still refusing {limit:.0f} s after its window")


# --- one row ---------------------------------------------------------------------------------


async def run_fault(rig: Rig, fault: Fault, row: Row, index: int) -> None:
    """Load, the fault for ``plan.window`` seconds, load until the backend is back; tally."""
    plan, specs = rig.plan, rig.specs
    victim = specs[plan.victim]
    for spec in specs:
        await asyncio.to_thread(sim_call, spec.port, "POST", "/_sim/config", NO_FAULTS)
    assert rig.daemon is not None
    if not await wait_in_rotation(rig.daemon, rig.ids, plan.recovery_timeout, plan.poll):
        out = [i for i, r in (await backend_health(rig.daemon)).items() if not in_rotation(r)]
        row.notes.append(
            f"daemon restarted: {', '.join(out) or 'a backend'} still out of rotation "
            f"{plan.recovery_timeout:g} s after the previous row"
        )
        await asyncio.to_thread(rig.start_daemon)
    daemon = rig.daemon
    assert daemon is not None
    await asyncio.to_thread(sim_call, victim.port, "POST", "/_sim/reset")
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(
            client(daemon.port, plan, i, random.Random(f"{plan.seed}/{index}/{i}"), stop, outcomes)
        )
        for i in range(plan.clients)
    ]
    watch = HealthWatch(daemon, victim.identifier, plan.poll)
    watching = asyncio.create_task(watch.run())
    try:
        await asyncio.sleep(plan.lead)
        # Counted just before the fault: a request that reached the box a moment before counts
        # as faulted, rather than one that met the fault going uncounted.
        before = await api_requests(victim.port)
        await asyncio.to_thread(sim_call, victim.port, "POST", "/_sim/config", dict(fault.on))
        started = time.monotonic()
        await asyncio.sleep(plan.window)
        if fault.off is None:
            ended = await until_listening(victim.port, plan.window + 10)
        else:
            row.victim_requests = await api_requests(victim.port) - before
            await asyncio.to_thread(sim_call, victim.port, "POST", "/_sim/config", dict(fault.off))
            ended = time.monotonic()
        # A detection that comes late still shows: wait two checks past the end at least.
        grace = ended + 2 * (plan.health_interval_ms + plan.health_timeout_ms) / 1000
        deadline = ended + plan.recovery_timeout
        while time.monotonic() < deadline:
            if watching.done():
                watching.result()  # raises the poller's error
            back = watch.in_rotation_for(3, ended)
            if back and (watch.out_since(started) or time.monotonic() >= grace):
                break
            await asyncio.sleep(plan.poll)
        stop.set()
        await asyncio.gather(*clients)
        # Requests that ended late (timeouts of a hung backend) may have taken it out again.
        while time.monotonic() < deadline and not watch.in_rotation_for(3, ended):
            if watching.done():
                watching.result()
            await asyncio.sleep(plan.poll)
    finally:
        stop.set()
        watch.stop.set()
        for task in clients:
            task.cancel()  # only those still running: after an error
        await asyncio.gather(*clients, watching, return_exceptions=True)
    watching.result()  # the poller's error, if it had one
    counters = await sim_counters(victim.port)
    row.victim_cut = counters.get("dropped_streams", 0)
    row.victim_resets = counters.get("reset_heads", 0)
    # Every client has its answer: a slot still held now was never given back.
    held = {i: r.get("ActiveRequests") for i, r in (await backend_health(daemon)).items()}
    held = {i: n for i, n in held.items() if n}
    if held:
        row.notes.append("slots still held: " + ", ".join(f"{i} ({n})" for i, n in held.items()))
    tally(row, outcomes, victim.identifier)
    timings(watch.samples, started, ended, row)


def tally(row: Row, outcomes: Sequence[Outcome], victim: str) -> None:
    """Count every outcome into the row: ok, cut (and where), failed (and why)."""
    row.sent = len(outcomes)
    for outcome in outcomes:
        if outcome.verdict == "ok":
            row.ok += 1
        elif outcome.verdict == "cut":
            row.cut += 1
            row.cut_reasons[f"{outcome.backend or '?'}:{outcome.reason}"] += 1
            if outcome.backend != victim:
                row.cuts_elsewhere += 1
        else:
            row.failed += 1
            row.failed_reasons[outcome.reason] += 1


# --- report ------------------------------------------------------------------------------------


def seconds(value: float | None, none: str) -> str:
    return none if value is None else f"{value:.2f} s"


def details(row: Row, victim: str) -> str:
    """Failures by status or error, cuts made elsewhere, flaps: the row's last column."""
    if row.error is not None:
        return f"ERROR: {row.error}"
    parts = []
    if row.failed_reasons:
        parts.append(", ".join(f"{k} ({v})" for k, v in row.failed_reasons.most_common()))
    if row.cuts_elsewhere:
        elsewhere = Counter(
            {k: v for k, v in row.cut_reasons.items() if not k.startswith(f"{victim}:")}
        )
        parts.append(
            "cut elsewhere: " + ", ".join(f"{k} ({v})" for k, v in elsewhere.most_common())
        )
    if row.flaps:
        parts.append(f"back in rotation {row.flaps}x while faulty")
    if row.victim_cut:
        parts.append(f"{victim} cut {row.victim_cut} streams")
    if row.victim_resets:
        parts.append(f"{victim} reset {row.victim_resets} heads")
    parts.extend(row.notes)
    return "; ".join(parts) or "-"


def table(rows: Sequence[Row], victim: str) -> str:
    header = ["fault", "sent", "ok", "cut", "failed", f"at {victim}", "left", "back", "goal",
              "failed / notes"]  # fmt: skip
    lines = []
    for r in rows:
        left = "-" if r.error is not None else seconds(r.left, "never")
        back = "-" if r.error is not None or not r.was_down else seconds(r.back, "never")
        lines.append([r.fault, str(r.sent), str(r.ok), str(r.cut), str(r.failed),
                      "-" if r.victim_requests is None else str(r.victim_requests), left, back,
                      r.goal, details(r, victim)])  # fmt: skip
    last = len(header) - 1
    widths = [max([len(header[i]), *(len(line[i]) for line in lines)]) for i in range(last)]
    numeric = {1, 2, 3, 4, 5, 6, 7}

    def render(cells: list[str]) -> str:
        out = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in
               enumerate(zip(cells, widths, strict=False))]  # fmt: skip
        return "  ".join([*out, cells[last]]).rstrip()

    rule = "  ".join("-" * w for w in widths) + "  " + "-" * len(header[last])
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


# --- the command ---------------------------------------------------------------------------


async def run_all(rig: Rig, rows: list[Row]) -> None:
    """Every fault of the plan in turn, one row each."""
    plan = rig.plan
    faults = {f.key: f for f in all_faults(plan.window, plan.drop_after)}
    for index, key in enumerate(plan.faults):
        fault = faults[key]
        print(f"{fault.label} ...", flush=True)
        row = Row(fault.label)
        try:
            await run_fault(rig, fault, row, index)
        except Exception as e:  # the harness failed: say so in the row, try the next fault
            row.error = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
        rows.append(row)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="each fault for 2 s, health checked twice as often")
    add("--faults", default=",".join(FAULT_KEYS), help="comma-separated subset, in order")
    add("--window", type=float, help="seconds each fault lasts [10; smoke 2]")
    add("--clients", type=int, default=30, help="concurrent clients")
    add("--seed", type=int, default=16, help="seed of the request mix")
    add("--twistd", help="twistd to run the daemon and simulators [next to this python]")
    add("--json", type=Path, default=HERE / "results" / "faults.json", help="results file")
    add("--keep-tmp", action="store_true", help="keep the temporary folder (logs, configs)")
    args = parser.parse_args(argv)
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    if not faults or not set(faults) <= set(FAULT_KEYS):
        parser.error(f"--faults: choose from {', '.join(FAULT_KEYS)}")
    window = args.window if args.window is not None else (2.0 if args.smoke else 10.0)
    if not 0 < window <= 600 or not 1 <= args.clients <= 1000:
        parser.error("--window must be 0..600 s and --clients 1..1000")
    plan = Plan(
        smoke=args.smoke,
        faults=faults,
        clients=args.clients,
        window=window,
        lead=0.5 if args.smoke else 1.0,
        seed=args.seed,
        health_interval_ms=500 if args.smoke else 1000,
        health_timeout_ms=500 if args.smoke else 1000,
        recovery_timeout=5.0 if args.smoke else 30.0,
    )
    return args, plan


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    exit_on_signals()
    began = time.monotonic()
    twistd = find_twistd(args.twistd)
    raise_nofile_limit()
    workdir = Path(tempfile.mkdtemp(prefix="ollamaflow-faults-"))
    children = Children(workdir)
    rows: list[Row] = []
    setup_error: str | None = None
    rig = Rig(children, twistd, plan)
    try:
        print("starting simulators and the daemon ...", flush=True)
        rig.start()
        asyncio.run(run_all(rig, rows))
    except BenchError as e:
        setup_error = str(e)
    finally:
        children.stop_all()
    print()
    settings = plan.settings_lines(rig.records)
    for line in settings:
        print(line)
    print()
    if setup_error is not None:
        rows.append(Row("setup", error=setup_error))
    print(table(rows, plan.victim_id))
    print()
    victim = plan.victim_id
    for line in (
        'cut: a 2xx head, then the body broke off (a stream without its final "done": true)',
        "failed: no 2xx head (an error status, or a connection error or timeout before one)",
        f"at {victim}: API requests {victim} received while faulted (- for refused)",
        f"left: fault start to {victim} out of rotation (InRotation false; Healthy without it)",
        f"back: fault end to {victim} in rotation for good (negative: before the fault ended)",
        f"goal PASS: nothing failed and every cut came from {victim} (issue 16)",
    ):
        print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "seconds": round(time.monotonic() - began, 1),
        "settings": settings,
        "plan": attrs.asdict(plan),
        "rows": [r.as_json() for r in rows],
    }
    args.json.write_text(json.dumps(document, indent=2))
    errors = any(r.error is not None for r in rows)
    print(f"\nwrote {args.json} in {time.monotonic() - began:.1f} s")
    if errors or args.keep_tmp:
        print(f"logs and configs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
