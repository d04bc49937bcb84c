"""OllamaFlow benchmark: one command starts backends, nginx, the daemon and a load generator.

    python bench/run.py            # the full run (about 4 minutes on 2 cores)
    python bench/run.py --smoke    # every scenario, tiny: ~25 s (~40 s with wrk), for CI
    python bench/run.py --scenarios keys   # only the cost of API keys (issue 19): ~1 minute
    python bench/run.py --scenarios dashboards   # only the cost of 100 open dashboards: ~1 min

Prints a table and the targets of issues 7 and 19 (and the dashboards'), and writes
bench/results/latest.json. See bench/README.md for what each scenario measures (``keys``: the
same small chat through a frontend without keys and through one that requires a key with limits
set, in turns; ``dashboards``: the same small chat with no dashboard open and with 100 streams
of the live feed ``GET /v1.0/events`` held open by bench/dashboards.py, in turns).
Everything listens on 127.0.0.1 only; every child process runs in its own process group and is
killed at the end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import nginx
import report
from flow import BackendSpec, Daemon, supports_workers
from load import LoadTool, Request, find_wrk
from procs import (
    BenchError,
    Child,
    Children,
    cpu_seconds,
    exit_on_signals,
    find_twistd,
    free_ports,
    peak_rss_kb,
    process_tree,
    raise_nofile_limit,
    rss_kb,
    tail,
)
from report import Check, Row

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHAT = Request(
    "POST",
    "/api/chat",
    json.dumps(
        {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    ),
)
TAGS = Request("GET", "/api/tags")
#: A daemon busy at least this share of a core (median over the rounds) limits the throughput.
SATURATED = 0.9
#: The dashboards scenario passes when the open dashboards keep this share of the throughput
#: and add at most this share to the daemon's CPU per request (medians of the rounds).
DASHBOARDS_THROUGHPUT = 0.97
DASHBOARDS_CPU = 0.03
#: The benchmark's API key: every limit set, none reached.
BENCH_KEY = {
    "Name": "bench",
    "RequestsPerMinute": 100_000_000,
    "TokensPerMinute": 1_000_000_000,
    "MaxConcurrentRequests": 100_000,
}


@dataclass(frozen=True)
class Plan:
    """Sizes of every scenario; ``--smoke`` shrinks them all."""

    smoke: bool
    scenarios: frozenset[str]
    duration: float
    connections: int
    workers: tuple[int, ...]
    stream_count: int
    stream_concurrency: int
    stream_tokens: int
    stream_tps: float
    hold_streams: int
    hold_seconds: float
    hold_tps: float
    hold_ramp: float
    scale: tuple[int, ...]
    health_timeout: float
    #: Alternating nginx / OllamaFlow measurements of the throughput target (0: none).
    pairs: int = 0
    #: Streams of the live feed held open in the dashboards scenario.
    dashboards: int = 100


@dataclass
class Backends:
    """The backends of the run: simulators always, the static nginx when nginx is installed."""

    fast_sim: int
    stream_sim: int
    hold_sim: int
    hold_sim_child: Child
    static_ports: list[int]
    chosen: int = 0  # port of the faster of the static nginx and the fast simulator
    chosen_name: str = ""


class Bench:
    def __init__(self, plan: Plan, children: Children, tools: Tools) -> None:
        self.plan = plan
        self.children = children
        self.tools = tools
        self.rows: list[Row] = []
        self._nginx_small: int | None = None  # the reference proxy of the small requests
        self._feeds = 0  # bench/dashboards.py processes started (each logs to its own file)

    # --- backends -------------------------------------------------------------------------

    def start_backends(self) -> Backends:
        p = self.plan
        fast, stream, hold = free_ports(3)
        zero = ["--ttft", "0", "--load-time", "0", "--no-host-check", "--models", "llama3"]
        parallel = str(max(4096, p.hold_streams * 2))
        sims = [
            ("sim-fast", fast, ["--tokens", "20", "--tokens-per-second", "0"]),
            ("sim-stream", stream, ["--tokens", str(p.stream_tokens),
                                    "--tokens-per-second", str(p.stream_tps)]),
            ("sim-hold", hold, ["--tokens", str(round(p.hold_seconds * p.hold_tps)),
                                "--tokens-per-second", str(p.hold_tps)]),
        ]  # fmt: skip
        common = ["--num-parallel", parallel, "--max-queue", parallel, *zero]
        started = [
            self.children.start(name, self._sim_argv(port, [*common, *extra]), cwd=REPO)
            for name, port, extra in sims
        ]
        static_ports: list[int] = []
        if self.tools.nginx:
            static_ports = free_ports(max(self.plan.scale, default=1))
            prefix = self.children.workdir / "nginx-static"
            config = nginx.write_config(prefix, nginx.static_config(prefix, static_ports))
            child = self.children.start(
                "nginx-static", nginx.command(self.tools.nginx, prefix, config)
            )
            child.wait_port(static_ports[0])
        for child, (_, port, _) in zip(started, sims, strict=True):
            child.wait_port(port)
        return Backends(fast, stream, hold, started[2], static_ports)

    def _sim_argv(self, port: int, options: list[str]) -> list[str]:
        return [self.tools.twistd, "-n", "--pidfile=", "ollamaflow-sim", "--port", str(port),
                *options]  # fmt: skip

    def choose_backend(self, backends: Backends) -> None:
        """Measure both candidate backends directly; the faster one backs the proxies."""
        candidates = [("sim", backends.fast_sim)]
        if backends.static_ports:
            candidates.insert(0, ("static nginx", backends.static_ports[0]))
        best = -1.0
        for name, port in candidates:
            rows = self.small_rows(f"direct: {name}", port)
            rps = next((r.rps for r in rows if r.scenario == self._chat_many), None) or 0.0
            if rps > best:
                best, backends.chosen, backends.chosen_name = rps, port, name
        for row in self.rows:
            if row.target == f"direct: {backends.chosen_name}":
                row.notes.append("backend used")

    # --- scenario 1: small requests -------------------------------------------------------

    @property
    def _chat_many(self) -> str:
        return f"chat c={self.plan.connections}"

    def small_rows(self, target: str, port: int, label: str = "") -> list[Row]:
        cases = [
            ("chat c=1", CHAT, 1),
            (self._chat_many, CHAT, self.plan.connections),
            ("tags c=1", TAGS, 1),
            (f"tags c={self.plan.connections}", TAGS, self.plan.connections),
        ]
        out = []
        for scenario, request, connections in cases:
            row = Row(scenario, target)
            self._measure(row, port, request, connections, label)
            out.append(row)
            self.rows.append(row)
        return out

    def _measure(
        self, row: Row, port: int, request: Request, connections: int, label: str = ""
    ) -> None:
        try:
            if not self.plan.smoke:  # fills connection pools, loads the model
                self.tools.load.run(port, request, connections, 1.0)
            result = self.tools.load.run(port, request, connections, self.plan.duration)
        except BenchError as e:
            row.error = str(e)
            return
        row.rps, row.p50_ms, row.p99_ms = result["rps"], result["p50_ms"], result["p99_ms"]
        row.data = result
        bad = result["errors"] + result["non_2xx"]
        if bad:
            row.error = f"{result['errors']} errors, {result['non_2xx']} non-2xx"
        if label:
            row.notes.append(label)

    def nginx_proxy(self, name: str, upstream_port: int) -> int:
        """Start the reference nginx proxy in front of ``upstream_port``; returns its port."""
        assert self.tools.nginx
        port = free_ports(1)[0]
        prefix = self.children.workdir / name
        config = nginx.write_config(prefix, nginx.proxy_config(prefix, port, [upstream_port]))
        self.children.start(name, nginx.command(self.tools.nginx, prefix, config)).wait_port(port)
        return port

    def scenario_serverpath(self, backends: Backends) -> None:
        """One small request through OllamaFlow's server path, h11 and twisted.web, in memory
        (bench/serverpath.py, run with the Python OllamaFlow is installed in)."""
        python = Path(self.tools.twistd).parent / "python"
        seconds = 0.2 if self.plan.smoke else 3.0
        argv = [str(python if python.exists() else sys.executable), str(HERE / "serverpath.py")]
        result = _run_json([*argv, "--json", "--seconds", str(seconds)], 20 * seconds + 60)
        costs = result["us_per_request"]
        ours = costs["ollamaflow"]
        for name, us in costs.items():
            row = Row("server path in memory", name, rps=1e6 / us, data={"us_per_request": us})
            row.notes.append(f"{us:.1f} us per request, {us / ours:.1f}x ours")
            self.rows.append(row)

    def scenario_small(self, backends: Backends) -> None:
        if self.tools.nginx:
            port = self._nginx_small = self.nginx_proxy("nginx-proxy", backends.chosen)
            self.small_rows("nginx proxy", port)
        else:
            self.rows.append(Row("chat/tags", "nginx proxy", notes=["nginx: not installed"]))
        for workers in self.plan.workers:
            target = f"ollamaflow w={workers}"
            if workers != 1 and not self.tools.workers_supported:
                note = "daemon has no Workers setting yet"
                self.rows.append(Row("chat/tags", target, error=note))
                continue
            try:
                self._small_flow(target, workers, backends.chosen)
            except BenchError as e:
                self.rows.append(Row("chat/tags", target, error=str(e)))

    def _small_flow(self, target: str, workers: int, backend_port: int) -> None:
        with self.daemon(f"ollamaflow-w{workers}", workers) as daemon:
            if not self._ready(daemon, [BackendSpec("b1", backend_port)], "chat/tags", target):
                return
            label = "" if daemon.wait_models(10) else "inventory empty: tags lists none"
            self.small_rows(target, daemon.port, label)
            pids = process_tree(daemon.pid)
            self.rows[-1].notes.append(f"{len(pids)} daemon process(es)")
            if workers == 1 and self._nginx_small is not None and self.plan.pairs:
                self._pairs(daemon.port, self._nginx_small)

    def _pairs(self, flow_port: int, nginx_port: int) -> None:
        """The throughput target measured fairly on a machine whose speed drifts: nginx and
        OllamaFlow alternate, and each pair gives one ratio; the row keeps their median."""
        row = Row(f"{self._chat_many} paired", "ollamaflow w=1 / nginx")
        self.rows.append(row)
        ratios = []
        connections = self.plan.connections
        try:
            for _ in range(self.plan.pairs):
                ours = self.tools.load.run(flow_port, CHAT, connections, self.plan.duration)
                theirs = self.tools.load.run(nginx_port, CHAT, connections, self.plan.duration)
                if ours["rps"] and theirs["rps"]:
                    ratios.append(ours["rps"] / theirs["rps"])
        except BenchError as e:
            row.error = str(e)
            return
        if ratios:
            median = _median(ratios)
            row.data = {"ratios": ratios, "median": median}
            row.notes.append(f"median {median:.1%} of nginx over {_listed(ratios, 'pairs')}")

    # --- scenario 2: streaming latency ----------------------------------------------------

    def scenario_stream(self, backends: Backends) -> None:
        targets: list[tuple[str, Callable[[], AbstractContextManager[int]]]] = [
            ("direct: sim", lambda: nullcontext(backends.stream_sim)),
        ]
        if self.tools.nginx:
            port = self.nginx_proxy("nginx-stream", backends.stream_sim)
            targets.append(("nginx proxy", lambda: nullcontext(port)))
        targets.append(("ollamaflow w=1", lambda: self._flow_port(backends.stream_sim)))
        direct: dict[str, float | None] = {}
        for target, serving in targets:
            ttfb, gap = Row("stream TTFB", target), Row("stream chunk gap", target)
            self.rows += [ttfb, gap]
            try:
                with serving() as port:
                    result = self._stream_latency(port)
            except BenchError as e:
                ttfb.error = gap.error = str(e)
                continue
            self._stream_rows(result, ttfb, gap, direct)

    @contextmanager
    def _flow_port(self, backend_port: int) -> Iterator[int]:
        """A daemon in front of one healthy backend, for the duration of the ``with``."""
        with self.daemon("ollamaflow-stream", 1) as daemon:
            self._one_backend(daemon, backend_port)
            yield daemon.port

    def _one_backend(self, daemon: Daemon, backend_port: int) -> None:
        """``frontend1`` in front of one backend ``b1``, healthy (else BenchError)."""
        daemon.configure([BackendSpec("b1", backend_port)])
        daemon.wait_healthy(["b1"], self.plan.health_timeout)

    def _stream_latency(self, port: int) -> dict:
        p = self.plan
        # Clients start one after another, spread over one stream's length: a new stream
        # arrives on its own, as from independent clients, not in a burst of --concurrency.
        stagger = p.stream_tokens / p.stream_tps / p.stream_concurrency
        argv = [sys.executable, str(HERE / "streams.py"), "latency", "--port", str(port),
                "--streams", str(p.stream_count), "--concurrency", str(p.stream_concurrency),
                "--tokens", str(p.stream_tokens), "--timeout", "30",
                "--stagger", f"{stagger:.4f}"]  # fmt: skip
        rounds = -(-p.stream_count // p.stream_concurrency)
        result = _run_json(argv, rounds * (p.stream_tokens / p.stream_tps + 30) + 30)
        if result["errors"]:
            raise BenchError(f"{result['errors']} failed streams: {result['problems']}")
        return result

    @staticmethod
    def _stream_rows(result: dict, ttfb: Row, gap: Row, direct: dict[str, float | None]) -> None:
        ttfb.p50_ms, ttfb.p99_ms = result["ttfb_p50_ms"], result["ttfb_p99_ms"]
        gap.p50_ms, gap.p99_ms = result["gap_p50_ms"], result["gap_p99_ms"]
        ttfb.data = gap.data = result
        ttfb.notes.append(f"{result['streams']} streams")
        gap.notes.append(f"{result['gaps']} gaps")
        if not direct:
            direct.update(ttfb=ttfb.p50_ms, gap=gap.p50_ms)
            return
        for row, key in ((ttfb, "ttfb"), (gap, "gap")):
            base = direct.get(key)
            if base is not None and row.p50_ms is not None:
                row.data = {**result, "p50_added_ms": row.p50_ms - base}
                row.notes.append(f"{row.p50_ms - base:+.3f} ms p50 vs direct")

    # --- scenario 3: many streams held ----------------------------------------------------

    def scenario_hold(self, backends: Backends) -> None:
        p = self.plan
        row = Row(f"{p.hold_streams} streams {p.hold_seconds:g} s", "ollamaflow w=1")
        self.rows.append(row)
        try:
            with self.daemon("ollamaflow-hold", 1) as daemon:
                if self._ready_row(daemon, [BackendSpec("b1", backends.hold_sim)], row):
                    self._hold(daemon, backends, row)
        except BenchError as e:
            row.error = str(e)

    def _hold(self, daemon: Daemon, backends: Backends, row: Row) -> None:
        p = self.plan
        argv = [sys.executable, str(HERE / "streams.py"), "hold", "--port", str(daemon.port),
                "--streams", str(p.hold_streams), "--ramp", str(p.hold_ramp),
                "--timeout", str(p.hold_seconds + 60)]  # fmt: skip
        out = self.children.workdir / "hold.json"
        daemon_cpu = cpu_seconds(process_tree(daemon.pid))
        sim_cpu = cpu_seconds([backends.hold_sim_child.pid])
        rss_before = rss_kb(process_tree(daemon.pid))
        peak = rss_before
        deadline = time.monotonic() + p.hold_ramp + p.hold_seconds + 120
        with out.open("w") as sink:
            client = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                      start_new_session=True)  # fmt: skip
            try:
                while client.poll() is None and time.monotonic() < deadline:
                    peak = max(peak, rss_kb(process_tree(daemon.pid)))
                    time.sleep(0.1)
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
        if client.returncode != 0:
            raise BenchError(
                f"streams.py hold exited {client.returncode}: {out.read_text()[-300:]}"
            )
        result = json.loads(out.read_text().strip().splitlines()[-1])
        used = cpu_seconds(process_tree(daemon.pid)) - daemon_cpu
        peak_mb = max(peak, peak_rss_kb(daemon.pid)) / 1024
        row.data = {
            **result,
            "daemon_peak_rss_mb": round(peak_mb, 1),
            "daemon_rss_before_mb": round(rss_before / 1024, 1),
            "daemon_cpu_seconds": round(used, 2),
            "sim_cpu_seconds": round(cpu_seconds([backends.hold_sim_child.pid]) - sim_cpu, 2),
        }
        row.notes += [
            f"errors {result['errors']}",
            f"peak RSS {peak_mb:.0f} MB",
            f"CPU {used:.1f} s",
            f"{result['peak_open']} open at once",
        ]
        if result["errors"]:
            row.error = f"{result['errors']} failed streams: {result['problems']}"

    # --- scenario 4: control-plane scale --------------------------------------------------

    def scenario_scale(self, backends: Backends) -> None:
        """One daemon holds every backend, and one frontend per size (told apart by Host);
        the sizes take turns for ``pairs`` rounds, so the machine's drift hits them alike."""
        p = self.plan
        ports = backends.static_ports or [backends.fast_sim]
        shared = [] if backends.static_ports else ["all records share one simulator port"]
        rows = {
            count: Row(
                f"chat c={p.connections} {count} backends", "ollamaflow w=1", notes=list(shared)
            )
            for count in p.scale
        }
        self.rows += rows.values()
        specs = [BackendSpec(f"b{i + 1}", ports[i % len(ports)]) for i in range(max(p.scale))]
        requests = {c: replace(CHAT, host=f"scale{c}.bench") for c in p.scale}
        runs: dict[int, list[dict]] = {c: [] for c in p.scale}
        with self.daemon("ollamaflow-scale", 1) as daemon:
            first = rows[p.scale[0]]
            if not self._ready_row(daemon, specs, first):
                for row in rows.values():
                    row.error = first.error
                return
            try:
                for count in p.scale:
                    names = [s.identifier for s in specs[:count]]
                    daemon.frontend(f"scale{count}", f"scale{count}.bench", names)
                    if not p.smoke:  # fills connection pools
                        self.tools.load.run(daemon.port, requests[count], p.connections, 1.0)
                for _ in range(max(1, p.pairs)):
                    for count in p.scale:
                        run = self.tools.load.run(
                            daemon.port, requests[count], p.connections, p.duration / 2
                        )
                        runs[count].append(run)
            except BenchError as e:
                for row in rows.values():
                    row.error = str(e)
                return
        for count, row in rows.items():
            _median_row(row, runs[count])
        low, high = min(p.scale), max(p.scale)
        if low != high:
            pairs = zip(runs[low], runs[high], strict=True)
            ratios = [b["rps"] / a["rps"] for a, b in pairs if a["rps"]] or [0.0]
            median = _median(ratios)
            rows[high].data["ratios_to_" + str(low)] = ratios
            rows[high].data["median_ratio"] = median
            rows[high].notes.append(
                f"{median:.1%} of {low} backend(s), median of {_listed(ratios, 'rounds')}"
            )

    # --- scenario 5: the cost of API keys -------------------------------------------------

    def scenario_keys(self, backends: Backends) -> None:
        """One daemon, two frontends on the same backend: ``open`` (no key) and ``keyed``
        (``RequireApiKey``, a key with limits set but not reached); they take turns for
        ``pairs`` rounds and each round gives one throughput ratio keyed/open."""
        rows = {
            "open": Row(self._chat_many, "keys: open"),
            "keyed": Row(self._chat_many, "keys: required, limits set"),
        }
        with self._variants("ollamaflow-keys", rows) as daemon:
            requests, key_id = self._keys_setup(daemon, backends.chosen)
            runs = self._alternating(
                {name: partial(self._cpu_run, daemon, r) for name, r in requests.items()}
            )
            counted = daemon.key_requests(key_id)
            _versus(rows, runs, "keys'")
            _keys_counted(rows["keyed"], runs["keyed"], counted)

    def _keys_setup(self, daemon: Daemon, backend_port: int) -> tuple[dict[str, Request], str]:
        """The two frontends and the key; the keyed frontend must refuse a request without the
        key (401) and answer one with it (200), else the rows would measure nothing."""
        self._one_backend(daemon, backend_port)
        daemon.frontend("open", "open.bench", ["b1"])
        daemon.frontend("keyed", "keyed.bench", ["b1"], {"RequireApiKey": True})
        key_id, secret = daemon.api_key(BENCH_KEY)
        requests = {
            "open": replace(CHAT, host="open.bench"),
            "keyed": replace(CHAT, host="keyed.bench", authorization=f"Bearer {secret}"),
        }
        daemon.wait_models(10)
        expected = [
            ("open.bench without a key", requests["open"], 200),
            ("keyed.bench without a key", replace(requests["keyed"], authorization=None), 401),
            ("keyed.bench with the key", requests["keyed"], 200),
        ]
        for what, request, status in expected:
            headers = {"Host": request.host or ""}
            if request.authorization:
                headers["Authorization"] = request.authorization
            got = daemon.status(request.method, request.path, request.body, headers)
            if got != status:
                raise BenchError(f"{what}: {request.path} answered {got}, expected {status}")
        return requests, key_id

    @contextmanager
    def _variants(self, name: str, rows: dict[str, Row]) -> Iterator[Daemon]:
        """A one-worker daemon for variants taking turns, one row each (added to the table);
        a BenchError ends the ``with`` block, and every row says why."""
        self.rows += rows.values()
        try:
            with self.daemon(name, 1) as daemon:
                yield daemon
        except BenchError as e:
            for row in rows.values():
                row.error = str(e)

    def _alternating(self, variants: dict[str, Callable[[float], dict]]) -> dict[str, list[dict]]:
        """``pairs`` rounds (at least one) of one run of each variant (called with the seconds
        to run); the order flips every round, so a drift of the machine's speed favours none."""
        p = self.plan
        if not p.smoke:  # fills connection pools
            for measure in variants.values():
                measure(1.0)
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        order = list(variants)
        for _ in range(max(1, p.pairs)):
            for name in order:
                runs[name].append(variants[name](p.duration / 2))
            order.reverse()
        return runs

    def _cpu_run(self, daemon: Daemon, request: Request, duration: float) -> dict:
        """One load run, with the daemon's CPU time per request and its share of a core (less
        moved by other load on the machine than the throughput is)."""
        pids = process_tree(daemon.pid)
        before = cpu_seconds(pids)
        run = self.tools.load.run(daemon.port, request, self.plan.connections, duration)
        used = cpu_seconds(pids) - before
        done, seconds = run["requests"], run["seconds"]
        run["daemon_cpu_us_per_request"] = round(used / done * 1e6, 1) if done else None
        run["daemon_cpu_share"] = round(used / seconds, 2) if seconds else None
        return run

    # --- scenario 6: open dashboards ------------------------------------------------------

    def scenario_dashboards(self, backends: Backends) -> None:
        """One daemon; the same small chat with no dashboard open (``closed``) and with
        ``dashboards`` streams of ``GET /v1.0/events`` held open (``open``), in turns for
        ``pairs`` rounds, each round giving one throughput ratio open/closed. Both run beside
        bench/dashboards.py, started and stopped alike (with no stream for ``closed``): the
        variants differ by the open streams alone."""
        count = self.plan.dashboards
        rows = {
            "closed": Row(self._chat_many, "dashboards: none"),
            "open": Row(self._chat_many, f"dashboards: {count} open"),
        }
        with self._variants("ollamaflow-dashboards", rows) as daemon:
            self._one_backend(daemon, backends.chosen)
            daemon.wait_models(10)
            runs = self._alternating(
                {
                    "closed": partial(self._dashboards_run, daemon, 0),
                    "open": partial(self._dashboards_run, daemon, count),
                }
            )
            _versus(rows, runs, "dashboards'")
            rows["closed"].notes.append("bench/dashboards.py running, no stream open")
            _feed_notes(rows["open"], runs["open"], count)

    def _dashboards_run(self, daemon: Daemon, count: int, duration: float) -> dict:
        """One load run while bench/dashboards.py holds ``count`` streams of the live feed open
        (all of them answered first), with what the streams received meanwhile."""
        self._feeds += 1
        argv = [sys.executable, str(HERE / "dashboards.py"), "--count", str(count),
                "--url", f"http://127.0.0.1:{daemon.port}", "--token", daemon.token]  # fmt: skip
        child = self.children.start(f"dashboards-{self._feeds}", argv)
        try:
            ready = _json_line(child, "ready", 30.0)
            if ready["open"] != count:
                raise BenchError(f"{ready['open']} of {count} dashboards opened: {ready['failed']}")
            run = self._cpu_run(daemon, CHAT, duration)
        finally:
            self.children.stop(child)
        feed = _json_line(child, "bytes_per_second", 0.0)
        if feed["open"] != count:
            raise BenchError(f"{count - feed['open']} dashboards ended early: {feed['failed']}")
        run["dashboards"] = {**feed, "first_bytes": ready["first_bytes"],
                             "seconds_to_ready": ready["seconds_to_ready"]}  # fmt: skip
        return run

    # --- the daemon -----------------------------------------------------------------------

    @contextmanager
    def daemon(self, name: str, workers: int) -> Iterator[Daemon]:
        started = Daemon(self.children, self.tools.twistd, REPO, name, workers)
        try:
            yield started
        finally:
            started.stop()

    def _ready(self, daemon: Daemon, specs: list[BackendSpec], scenario: str, target: str) -> bool:
        row = Row(scenario, target)
        if self._ready_row(daemon, specs, row):
            return True
        self.rows.append(row)
        return False

    def _ready_row(self, daemon: Daemon, specs: list[BackendSpec], row: Row) -> bool:
        """Configure ``specs`` and wait until all are healthy; on failure the row says why."""
        try:
            daemon.configure(specs)
            daemon.wait_healthy([s.identifier for s in specs], self.plan.health_timeout)
        except BenchError as e:
            row.error = str(e)
            return False
        return True


@dataclass(frozen=True)
class Tools:
    twistd: str
    nginx: str | None
    load: LoadTool
    workers_supported: bool


def _median(values: list[float]) -> float:
    """The middle value (the upper one of an even count)."""
    return sorted(values)[len(values) // 2]


def _listed(ratios: list[float], what: str) -> str:
    """``5 rounds: 91.0%, 93.2%, ...``, for a row's notes."""
    return f"{len(ratios)} {what}: " + ", ".join(f"{r:.1%}" for r in ratios)


def _median_row(row: Row, runs: list[dict]) -> None:
    """Fill ``row`` from the run of median throughput (its latencies too), all runs kept."""
    _round_row(row, runs, sorted(runs, key=lambda r: r["rps"])[len(runs) // 2])


def _round_row(row: Row, runs: list[dict], shown: dict) -> None:
    """Fill ``row`` from ``shown``, one of ``runs`` (all kept); a bad answer in any is an error."""
    row.rps, row.p50_ms, row.p99_ms = shown["rps"], shown["p50_ms"], shown["p99_ms"]
    row.data = {**shown, "runs": runs}
    bad = sum(r["errors"] + r["non_2xx"] for r in runs)
    if bad:
        row.error = f"{bad} errors or non-2xx answers"


def _versus(rows: dict[str, Row], runs: dict[str, list[dict]], whose: str) -> None:
    """Two variants that took turns (``_alternating``), ``base`` first then ``other`` (the
    order of ``rows``): each row shows its last round (all rounds kept in its data), and the
    other's row the medians of the per-round ratios other/base of the throughput and of the
    daemon's CPU per request, and the A/A ratios: the throughput of the same variant in two
    rounds back to back (round i ends, and round i+1 begins, with ``other`` for an even i,
    ``base`` for an odd one), the machine's own noise."""
    for name, some in rows.items():
        _round_row(some, runs[name], runs[name][-1])
        count = len(runs[name])
        some.notes.append(f"last of {count} rounds" if count > 1 else "1 round")
    base, other = rows
    row = rows[other]
    pairs = list(zip(runs[base], runs[other], strict=True))
    ratios = [o["rps"] / b["rps"] for b, o in pairs if b["rps"]] or [0.0]
    median = _median(ratios)
    cpu_key = "daemon_cpu_us_per_request"
    cpu, share = _medians(runs, cpu_key), _medians(runs, "daemon_cpu_share")
    cpu_ratios = [o[cpu_key] / b[cpu_key] for b, o in pairs if b[cpu_key] and o[cpu_key]]
    change = _median(cpu_ratios) - 1 if cpu_ratios else None
    saturated = min(share.values()) >= SATURATED
    # A saturated daemon held under a core in a round: something else took the machine.
    shares = [min(b["daemon_cpu_share"] or 0.0, o["daemon_cpu_share"] or 0.0) for b, o in pairs]
    disturbed = sum(1 for x in shares if x < SATURATED) if saturated else 0
    twice = [runs[other if i % 2 == 0 else base][i : i + 2] for i in range(len(pairs) - 1)]
    same = [second["rps"] / first["rps"] for first, second in twice if first["rps"]]
    row.data.update(
        {
            f"ratios_to_{base}": ratios,
            "rounds": len(ratios),
            "median_ratio": median,
            "median_daemon_cpu_us_per_request": cpu,
            "daemon_cpu_ratios": cpu_ratios,
            "daemon_cpu_change": change,
            "median_daemon_cpu_share": share,
            "daemon_saturated": saturated,
            "disturbed_rounds": disturbed,
            "aa_ratios": same,
        }
    )
    row.notes += [
        f"{median:.1%} of {base}, median of {_listed(ratios, 'rounds')}",
        f"daemon CPU {cpu[other]:.0f} vs {cpu[base]:.0f} us per request"
        + ("" if change is None else f" ({change:+.1%}, median of the rounds' ratios)"),
    ]
    if same:
        row.notes.append("A/A (a variant twice in a row) " + _listed(same, "times"))
    if disturbed:
        row.notes.append(
            f"{disturbed} of {len(pairs)} rounds disturbed: the daemon got under"
            f" {SATURATED:.0%} of a core (something else ran on the machine)"
        )
    if not saturated:
        row.notes.append(
            f"daemon busy {share[base]:.0%} ({base}) and {share[other]:.0%} ({other}) of a core:"
            f" something else limits the throughput and hides part of the {whose} cost"
        )


def _keys_counted(keyed: Row, runs: list[dict], counted: int) -> None:
    """What the key counted: at least every answer measured through it."""
    keyed.data["key_requests"] = counted
    keyed.notes.append(f"{counted:,} requests counted on the key")
    measured = sum(r["requests"] for r in runs)
    if counted < measured and keyed.error is None:
        keyed.error = f"the key counted {counted} requests, the load generator {measured}"


def _feed_notes(row: Row, runs: list[dict], count: int) -> None:
    """What the open dashboards received while the load ran (medians over the rounds): proof
    that the feed flowed, and what it costs the dashboards' own process."""
    feeds = [r["dashboards"] for r in runs]
    rate = _median([f["bytes_per_second"] for f in feeds])
    events = _median([f["events_per_second"] for f in feeds])
    cpu = sum(f["cpu_seconds"] for f in feeds)
    lived = sum(f["seconds"] + f["seconds_to_ready"] for f in feeds)
    kinds: Counter[str] = Counter()
    for feed in feeds:
        kinds.update(feed["by_event"])
    row.data.update(
        feed_bytes_per_second=rate, feed_events_per_second=events, feed_events=dict(kinds)
    )
    row.notes += [
        f"feed {rate / 1e3:,.0f} kB/s, {events:,.0f} events/s to {count} dashboards"
        f" ({events / count:.1f} events/s each)",
        "events " + ", ".join(f"{name} {n:,}" for name, n in kinds.most_common()),
    ]
    if lived:
        row.notes.append(f"dashboards.py busy {cpu / lived:.0%} of a core")
    silent = [f for f in feeds if f["seconds"] >= 2 and not f["events"]]
    if silent and row.error is None:
        row.error = f"the feed sent nothing in {len(silent)} of {len(feeds)} rounds"


def _json_line(child: Child, key: str, timeout: float) -> dict:
    """The last JSON object with ``key`` that ``child`` printed (into its log), waiting up to
    ``timeout`` seconds for it while the child runs."""
    deadline = time.monotonic() + timeout
    while True:
        for line in reversed(child.log.read_text(errors="replace").splitlines()):
            try:
                found = json.loads(line) if line.startswith("{") else None
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict) and key in found:
                return found
        if not child.alive() or time.monotonic() >= deadline:
            raise BenchError(f"{child.name} printed no {key!r} line: {tail(child.log)}")
        time.sleep(0.02)


def _medians(runs: dict[str, list[dict]], key: str) -> dict[str, float]:
    """For each name of ``runs``, the median of its runs' ``key`` (None counting as 0)."""
    return {name: _median([r[key] or 0.0 for r in some]) for name, some in runs.items()}


def _run_json(argv: list[str], timeout: float) -> dict:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, start_new_session=True
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{Path(argv[1]).name} did not finish within {timeout:.0f} s") from e
    if done.returncode != 0:
        raise BenchError(f"{Path(argv[1]).name} exited {done.returncode}: {done.stderr[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def checks(rows: list[Row], plan: Plan) -> list[Check]:
    """The targets of issues 7 and 19 against this run's rows."""

    def find(scenario: str, target: str) -> Row | None:
        for r in rows:
            if r.scenario == scenario and r.target == target and r.error is None:
                return r
        return None

    direct = next((r.target for r in rows if "backend used" in r.notes), "direct: sim")
    c = plan.connections
    out: list[Check] = []
    paired = find(f"chat c={c} paired", "ollamaflow w=1 / nginx")
    if paired and "median" in paired.data:
        median = paired.data["median"]
        pairs = len(paired.data["ratios"])
        out.append(
            Check(f"chat c={c} throughput >= 10% of nginx, median of {pairs} alternating pairs",
                  f"{median:.1%}", median >= 0.10)
        )  # fmt: skip
    for kind in ("chat", "tags"):
        flow, ref = find(f"{kind} c={c}", "ollamaflow w=1"), find(f"{kind} c={c}", "nginx proxy")
        if flow and ref and flow.rps and ref.rps:
            share = flow.rps / ref.rps
            text = f"{share:.1%} ({flow.rps:,.0f} vs {ref.rps:,.0f} req/s)"
            out.append(Check(f"{kind} c={c} throughput >= 10% of nginx", text, share >= 0.10))
        else:
            out.append(Check(f"{kind} c={c} throughput >= 10% of nginx", "not measured", None))
    for kind in ("chat", "tags"):
        flow, base = find(f"{kind} c=1", "ollamaflow w=1"), find(f"{kind} c=1", direct)
        name = f"{kind} c=1 latency added <= 0.3 ms p50"
        if flow and base and flow.p50_ms is not None and base.p50_ms is not None:
            added = flow.p50_ms - base.p50_ms
            out.append(Check(name, f"{added:+.3f} ms", added <= 0.3))
        else:
            out.append(Check(name, "not measured", None))
    for scenario, label in (("stream TTFB", "TTFB"), ("stream chunk gap", "chunk gap")):
        row = find(scenario, "ollamaflow w=1")
        added = row.data.get("p50_added_ms") if row else None
        name = f"streaming adds <= 1 ms to {label} p50"
        measured = "not measured" if added is None else f"{added:+.3f} ms"
        out.append(Check(name, measured, None if added is None else added <= 1.0))
    hold = next((r for r in rows if r.scenario.endswith(f"streams {plan.hold_seconds:g} s")), None)
    data = hold.data if hold else {}
    name = f"{plan.hold_streams} streams: 0 errors, < 250 MB RSS"
    if "daemon_peak_rss_mb" in data:
        ok = data["errors"] == 0 and data["daemon_peak_rss_mb"] < 250
        out.append(Check(name, f"{data['errors']} errors, {data['daemon_peak_rss_mb']} MB", ok))
    else:
        out.append(Check(name, "not measured", None))
    if len(plan.scale) > 1:
        low, high = min(plan.scale), max(plan.scale)
        many = find(f"chat c={c} {high} backends", "ollamaflow w=1")
        name = f"{high} backends within 10% of {low}"
        if many and "median_ratio" in many.data:
            share = many.data["median_ratio"]
            rounds = len(many.data[f"ratios_to_{low}"])
            text = f"{share:.1%} of the throughput, median of {rounds} alternating rounds"
            out.append(Check(name, text, share >= 0.90))
        else:
            out.append(Check(name, "not measured", None))
    # Issue 19: a key required, with limits set, costs at most 5% of the throughput.
    out.append(
        _versus_check(
            rows, "keys: required, limits set", "API keys cost at most 5% of throughput",
            "the open frontend's", 0.95,
        )
    )  # fmt: skip
    # The live feed holds open dashboards without measurable cost to proxied requests.
    n = plan.dashboards
    name = (
        f"{n} open dashboards cost nothing measurable: >= {DASHBOARDS_THROUGHPUT:.0%} of"
        f" throughput, daemon CPU per request <= {DASHBOARDS_CPU:+.0%}"
    )
    out.append(
        _versus_check(
            rows, f"dashboards: {n} open", name, "the throughput with none open",
            DASHBOARDS_THROUGHPUT, DASHBOARDS_CPU,
        )
    )  # fmt: skip
    return out


def _versus_check(
    rows: list[Row], target: str, name: str, of: str, least: float, cpu: float | None = None
) -> Check:
    """The median throughput ratio of ``target``'s row (see ``_versus``) at least ``least``
    and, with ``cpu``, the daemon's CPU per request up by at most that share."""
    row = next((r for r in rows if r.target == target), None)
    if row is None or row.error is not None or "median_ratio" not in row.data:
        return Check(name, "not measured", None)
    share, change = row.data["median_ratio"], row.data["daemon_cpu_change"]
    text = f"{share:.1%} of {of}"
    passed = share >= least
    if cpu is not None:
        text += ", daemon CPU per request " + ("?" if change is None else f"{change:+.1%}")
        passed = passed and change is not None and change <= cpu
    text += f", median of {row.data['rounds']} alternating rounds"
    if row.data.get("daemon_saturated") is False:
        text += " (daemon not saturated: see the notes)"
    elif row.data.get("disturbed_rounds"):
        text += f" ({row.data['disturbed_rounds']} disturbed: see the notes)"
    return Check(name, text, passed)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


SCENARIOS = ("serverpath", "small", "stream", "hold", "scale", "keys", "dashboards")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(
        description="OllamaFlow benchmark (issue 7): see bench/README.md",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="every scenario, tiny (a few seconds; for CI)")
    add("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset to run")
    add("--duration", type=float, help="seconds per small-request measurement [8; smoke 0.5]")
    add("--connections", type=int, help="connections of the loaded small-request rows [64; 8]")
    add("--workers", type=_ints, help="daemon Workers values to measure [1,2; smoke 1]")
    add("--stream-count", type=int, help="streams measured per target [60; smoke 4]")
    add("--stream-concurrency", type=int, default=10, help="streams at once")
    add("--hold-streams", type=int, help="concurrent streams held [2000; smoke 20]")
    add("--hold-seconds", type=float, help="how long each held stream lasts [20; smoke 1]")
    add("--hold-tps", type=float, default=2.0, help="tokens/s of each held stream")
    add("--scale", type=_ints, help="backend counts of the scale scenario [1,10,100; smoke 1,10]")
    add("--pairs", type=int, help="alternating rounds of paired measurements [5; smoke 1]")
    add("--dashboards", type=int, default=100, help="live feeds held open (dashboards scenario)")
    add("--loadgen", choices=["auto", "wrk", "python"], default="auto", help="load generator")
    add("--no-nginx", action="store_true", help="leave nginx out even if installed")
    add("--twistd", help="twistd to run the daemon and simulators [next to this python]")
    add("--json", type=Path, default=HERE / "results" / "latest.json", help="results file")
    add("--keep-tmp", action="store_true", help="keep the temporary folder (logs, configs)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    scenarios = frozenset(s.strip() for s in args.scenarios.split(",") if s.strip())
    if not scenarios or not scenarios <= set(SCENARIOS):
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")

    def pick(value: object, full: object, tiny: object) -> object:
        return value if value is not None else (tiny if smoke else full)

    plan = Plan(
        smoke=smoke,
        scenarios=scenarios,
        duration=pick(args.duration, 8.0, 0.5),  # type: ignore[arg-type]
        connections=pick(args.connections, 64, 8),  # type: ignore[arg-type]
        workers=pick(args.workers, (1, 2), (1,)),  # type: ignore[arg-type]
        stream_count=pick(args.stream_count, 60, 4),  # type: ignore[arg-type]
        stream_concurrency=args.stream_concurrency,
        stream_tokens=10 if smoke else 100,
        stream_tps=50.0,
        hold_streams=pick(args.hold_streams, 2000, 20),  # type: ignore[arg-type]
        hold_seconds=pick(args.hold_seconds, 20.0, 1.0),  # type: ignore[arg-type]
        hold_tps=args.hold_tps,
        hold_ramp=0.2 if smoke else 2.0,
        scale=pick(args.scale, (1, 10, 100), (1, 10)),  # type: ignore[arg-type]
        health_timeout=10.0 if smoke else 30.0,
        pairs=pick(args.pairs, 5, 1),  # type: ignore[arg-type]
        dashboards=args.dashboards,
    )
    if not (0 < plan.duration <= 600 and 1 <= plan.connections <= 10000):
        parser.error("--duration must be 0..600 s and --connections 1..10000")
    if not (1 <= plan.hold_streams <= 10000 and 0 < plan.hold_seconds <= 600):
        parser.error("--hold-streams must be 1..10000 and --hold-seconds 0..600")
    if not 0 < plan.hold_tps <= 1000 or not 1 <= plan.stream_count <= 10000:
        parser.error("--hold-tps must be 0..1000 and --stream-count 1..10000")
    if not 1 <= plan.dashboards <= 500:  # the daemon's feed takes 500 listeners at most
        parser.error("--dashboards must be 1..500")
    return args, plan


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    exit_on_signals()
    began = time.monotonic()
    twistd = find_twistd(args.twistd)
    nginx_binary = None if args.no_nginx else nginx.find_nginx()
    wrk = None if args.loadgen == "python" else find_wrk()
    if args.loadgen == "wrk" and not wrk:
        raise SystemExit("bench: --loadgen wrk but wrk is not installed")
    nginx_note = "skipped (--no-nginx)" if args.no_nginx else "not installed, skipped"
    print("nginx:", nginx_binary or nginx_note, flush=True)
    print("wrk:", wrk or "not installed, using bench/loadgen.py", flush=True)
    nofile = raise_nofile_limit()
    python = Path(twistd).parent / "python"
    workers_ok = supports_workers(str(python if python.exists() else sys.executable), REPO)
    workdir = Path(tempfile.mkdtemp(prefix="ollamaflow-bench-"))
    tools = Tools(twistd, nginx_binary, LoadTool(wrk, workdir), workers_ok)
    machine = report.machine_info(twistd, nginx_binary, wrk)
    print("machine:", report.machine_line(machine), flush=True)
    children = Children(workdir)
    bench = Bench(plan, children, tools)
    failed = True
    try:
        run_scenarios(bench)
        failed = False
    finally:
        children.stop_all()
        result_checks = checks(bench.rows, plan)
        print()
        print(f"Machine: {report.machine_line(machine)}; load generator: {tools.load.name}")
        print()
        print(report.table(bench.rows))
        print()
        print("Targets (issues 7 and 19):")
        print(report.checks_table(result_checks))
        document = {
            "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - began, 1),
            "command": "python bench/run.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
            "machine": machine,
            "load_generator": tools.load.name,
            "nofile_limit": nofile,
            "plan": {k: sorted(v) if isinstance(v, frozenset) else v
                     for k, v in plan.__dict__.items()},
        }  # fmt: skip
        report.write_json(args.json, document, bench.rows, result_checks)
        print(f"\nwrote {args.json} in {time.monotonic() - began:.1f} s")
        if failed or args.keep_tmp or any(r.error for r in bench.rows):
            print(f"logs and configs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r.error for r in bench.rows) else 0


def run_scenarios(bench: Bench) -> None:
    print("starting backends ...", flush=True)
    backends = bench.start_backends()
    wanted = bench.plan.scenarios
    if "small" in wanted:
        print("small requests: choosing the backend ...", flush=True)
        bench.choose_backend(backends)
    elif backends.static_ports:  # not measured in this run: nginx is the faster one
        backends.chosen, backends.chosen_name = backends.static_ports[0], "static nginx"
    else:
        backends.chosen, backends.chosen_name = backends.fast_sim, "sim"
    steps = [
        ("serverpath", "server path in memory", bench.scenario_serverpath),
        ("small", "small requests", bench.scenario_small),
        ("stream", "streaming latency", bench.scenario_stream),
        ("hold", "concurrent streams", bench.scenario_hold),
        ("scale", "control-plane scale", bench.scenario_scale),
        ("keys", "API keys", bench.scenario_keys),
        ("dashboards", "open dashboards", bench.scenario_dashboards),
    ]
    for key, title, step in steps:
        if key in wanted:
            print(f"{title} ...", flush=True)
            try:
                step(backends)
            except BenchError as e:  # a step that could not go on; the others still run
                bench.rows.append(Row(title, "-", error=str(e)))


if __name__ == "__main__":
    sys.exit(main())
