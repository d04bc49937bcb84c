"""Why load-aware scheduling: the same workload replayed through each balancing policy.

Two workloads on simulators that behave like Ollama (per-model slots, requests beyond them wait
silently inside the server), both seeded and identical for every policy:

``mixed`` (the default): many short embeddings and fewer long generations over two chat
models, one slot per model, every model loaded everywhere. RoundRobin without gateway limits
(OllamaFlow 1.2's behaviour) against LeastOutstanding with per-backend slots and the queue:
p50/p99 latency, throughput, failures and the peak queue depth of each.

``placement`` (issue 21, ``placement.py``): six chat models on boxes whose VRAM holds two, Zipf
popularity, 40% multi-turn chats whose later turns reuse the slot's prompt cache. RoundRobin,
LeastOutstanding, ModelAware (when this checkout has it) and an ideal replay with perfect
knowledge: time to first token, model loads, evictions, cache hits and throughput.

    python bench/scheduling.py                  # mixed: eight backends, about three minutes
    python bench/scheduling.py --backends 3     # the same load per backend on three
    python bench/scheduling.py --ideal 20       # no processes: the ideal of both, 20 seeds
    python bench/scheduling.py --workload placement     # about seven minutes
    python bench/scheduling.py --workload placement --ideal 5   # the ideal only, 5 seeds
    python bench/scheduling.py --smoke          # both workloads, tiny (CI)

The arrival rate follows the fleet: ``--load`` is the share of the generation slots busy on
average, so every fleet size sees the same load per backend. The gain grows with the fleet:
round robin leaves each box to queue its own arrivals, while the shared queue pools every
box's slots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import placement
from flow import BackendSpec, Daemon
from httpwire import percentile
from procs import BenchError, Children, free_ports

SIM_MODELS = "llama3,mistral,all-minilm"


@dataclass(frozen=True)
class Arrival:
    at: float
    path: str
    body: bytes
    kind: str
    model: str
    #: What the request costs its model's slot on a simulator.
    service: float


#: The share of arrivals that are generations (the rest are embeddings), and their models.
GENERATION_SHARE = 0.3
CHAT_MODELS = ("llama3", "mistral")
TOKENS = (40, 120)
TTFT = 0.02


def rate_for(load: float, backends: int, tps: float) -> float:
    """Arrivals per second that keep ``load`` of the generation slots (one per chat model per
    backend) busy on average."""
    service = TTFT + sum(TOKENS) / 2 / tps
    return load * backends * len(CHAT_MODELS) / (GENERATION_SHARE * service)


def workload(
    seed: int, seconds: float, rate: float, tokens: tuple[int, int], tps: float
) -> list[Arrival]:
    """Poisson arrivals: 70% embeddings, 30% generations of 40-120 tokens on two models."""
    rng = random.Random(seed)
    out: list[Arrival] = []
    now = 0.0
    while True:
        now += rng.expovariate(rate)
        if now >= seconds:
            return out
        if rng.random() >= GENERATION_SHARE:
            body = {"model": "all-minilm", "input": f"text {len(out)}"}
            encoded = json.dumps(body).encode()
            out.append(Arrival(now, "/api/embed", encoded, "embed", "all-minilm", TTFT))
        else:
            model = rng.choice(CHAT_MODELS)
            count = rng.randint(*tokens)
            body = {
                "model": model,
                "prompt": f"story {len(out)}",
                "stream": False,
                "options": {"num_predict": count},
            }
            encoded = json.dumps(body).encode()
            service = TTFT + count / tps
            out.append(Arrival(now, "/api/generate", encoded, "generate", model, service))


def ideal(arrivals: list[Arrival], backends: int, pooled: bool) -> list[float]:
    """Latencies with no overhead at all: round robin (each box queues its own share behind
    each model's slot) or one pooled FIFO queue (the first slot of the model to free)."""
    free: dict[tuple[int, str], float] = {}
    out = []
    for i, a in enumerate(arrivals):
        if pooled:
            box = min(range(backends), key=lambda b: free.get((b, a.model), 0.0))
        else:
            box = i % backends
        done = max(a.at, free.get((box, a.model), 0.0)) + a.service
        free[(box, a.model)] = done
        out.append(done - a.at)
    return out


def ideal_report(args: argparse.Namespace) -> int:
    """The p99 gain of the pooled queue over round robin, with no process at all, over seeds."""
    gains = []
    for seed in range(args.seed, args.seed + args.ideal):
        arrivals = workload(seed, args.seconds, args.rate, TOKENS, args.tps)
        p99 = [
            percentile(sorted(ideal(arrivals, args.backends, pooled)), 0.99) or 1.0
            for pooled in (False, True)
        ]
        gains.append(p99[0] / p99[1])
    gains.sort()
    print(
        f"ideal p99 gain of one pooled queue over round robin, {args.backends} backends, "
        f"{args.rate:.1f} requests/s, {args.seconds:.0f} s, seeds {args.seed}..{seed}: "
        f"median {percentile(gains, 0.5):.2f}x, lowest {gains[0]:.2f}x, highest {gains[-1]:.2f}x"
    )
    return 0


async def post(port: int, arrival: Arrival, limit: float) -> tuple[str, float, int]:
    """One request on its own connection: (kind, seconds, status; 0 = connection failed)."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), limit)
        head = (
            f"POST {arrival.path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(arrival.body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head + arrival.body)
        raw = await asyncio.wait_for(reader.read(), limit)
        writer.close()
        status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.") else 0
    except (TimeoutError, OSError, ValueError, IndexError):
        status = 0
    return arrival.kind, time.monotonic() - started, status


async def replay(port: int, arrivals: list[Arrival], limit: float) -> list[tuple[str, float, int]]:
    started = time.monotonic()

    async def at(arrival: Arrival) -> tuple[str, float, int]:
        await asyncio.sleep(max(0.0, arrival.at - (time.monotonic() - started)))
        return await post(port, arrival, limit)

    return await asyncio.gather(*(at(a) for a in arrivals))


def summarize(name: str, results: list[tuple[str, float, int]], seconds: float, peak: int) -> dict:
    latencies = sorted(r[1] for r in results)
    failed = sum(1 for r in results if r[2] != 200)
    row = {
        "policy": name,
        "requests": len(results),
        "failed": failed,
        "throughput": len(results) / seconds,
        "p50_ms": 1000 * (percentile(latencies, 0.5) or 0),
        "p99_ms": 1000 * (percentile(latencies, 0.99) or 0),
        "peak_queue": peak,
    }
    for kind in ("embed", "generate"):
        own = sorted(r[1] for r in results if r[0] == kind)
        row[f"{kind}_p99_ms"] = 1000 * (percentile(own, 0.99) or 0)
    return row


# -- the fleet: simulators, a daemon, a policy (both workloads) --------------------------------


@dataclass(frozen=True)
class Policy:
    """How a frontend balances, and the slots its backends get in the gateway."""

    name: str
    balancing: str
    max_parallel: int
    model_parallel: int
    backend_extra: dict[str, object] = field(default_factory=dict)


def start_sims(children: Children, twistd: str, count: int, options: Sequence[str]) -> list[int]:
    """``count`` simulators, each its own process on a free port; their ports."""
    ports = free_ports(count)
    for i, port in enumerate(ports):
        argv = [twistd, "-n", "--pidfile=", "ollamaflow-sim", "--port", str(port),
                "--no-host-check", *options]  # fmt: skip
        children.start(f"sim{i}", argv).wait_port(port)
    return ports


def sim_call(port: int, method: str, path: str, body: object | None = None) -> tuple[int, object]:
    """One ``/_sim/`` control request: (status, JSON answer)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ValueError) as e:
        raise BenchError(f"simulator {port} {method} {path}: {e}") from e


def start_daemon(
    children: Children, twistd: str, repo: Path, name: str, specs: list[BackendSpec]
) -> Daemon:
    """A daemon whose ``frontend1`` lists ``specs``, every backend healthy and its models read."""
    daemon = Daemon(children, twistd, repo, name, 1)
    daemon.configure(specs)
    daemon.wait_healthy([s.identifier for s in specs], timeout=20)
    daemon.wait_models(timeout=20)
    return daemon


def apply_policy(daemon: Daemon, specs: list[BackendSpec], policy: Policy, timeout: float) -> str:
    """Set the frontend's balancing and every backend's slots; '' when applied, else why the
    daemon refused (a policy or field this checkout does not have)."""
    status, body = daemon.admin(
        "PUT",
        "/v1.0/frontends/frontend1",
        {"Backends": [s.identifier for s in specs],
         "LoadBalancing": policy.balancing, "MaxQueueDepth": 10000,
         "QueueTimeoutMs": int(timeout * 1000), "TimeoutMs": 0},
    )  # fmt: skip
    if status not in (200, 201):
        return f"LoadBalancing {policy.balancing!r} refused ({status}): {_reason(body)}"
    for spec in specs:
        status, body = daemon.admin(
            "PUT",
            f"/v1.0/backends/{spec.identifier}",
            {"Hostname": "127.0.0.1", "Port": spec.port,
             "MaxParallelRequests": policy.max_parallel,
             "ModelParallelRequests": policy.model_parallel,
             "RateLimitRequestsThreshold": 100000, **policy.backend_extra},
        )  # fmt: skip
        if status not in (200, 201):
            return f"backend {spec.identifier} refused ({status}): {_reason(body)}"
    daemon.wait_healthy([s.identifier for s in specs], timeout=20)
    return ""


def _reason(body: object) -> str:
    """The daemon's explanation of a refusal, short."""
    if isinstance(body, dict):
        body = body.get("Description") or body.get("Message") or body
    return str(body)[:100]


def peak_queue(daemon: Daemon) -> int:
    _, health = daemon.admin("GET", "/v1.0/health")
    queues = health.get("Queues", []) if isinstance(health, dict) else []
    return max((q.get("PeakQueueDepth", 0) for q in queues), default=0)


def with_fleet(run: Callable[[Children, str, Path], int]) -> int:
    """Run ``run(children, twistd, repo)``; every child is killed at the end, whatever happens."""
    twistd = str(Path(sys.executable).with_name("twistd"))
    repo = Path(__file__).resolve().parent.parent
    workdir = Path(tempfile.mkdtemp(prefix="ollamaflow-sched-"))
    children = Children(workdir)
    try:
        return run(children, twistd, repo)
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def write_result(name: str, document: object) -> None:
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / name).write_text(json.dumps(document, indent=2))


# -- the mixed workload -------------------------------------------------------------------------


def mixed_policies(slots: int) -> list[Policy]:
    return [
        Policy("RoundRobin (1.2)", "RoundRobin", 100000, 0),
        # As the simulators: one request at a time per model (OLLAMA_NUM_PARALLEL=1).
        Policy("LeastOutstanding + queue", "LeastOutstanding", slots, 1),
    ]


def run_mixed(args: argparse.Namespace) -> int:
    """Both policies in turn on one daemon in front of ``--backends`` simulators."""
    arrivals = workload(args.seed, args.seconds, args.rate, TOKENS, args.tps)
    rows: list[dict] = []

    def measure(children: Children, twistd: str, repo: Path) -> int:
        options = ["--models", SIM_MODELS, "--tokens", "120", "--num-parallel", "1",
                   "--max-queue", "4096", "--tokens-per-second", str(args.tps),
                   "--ttft", str(TTFT), "--load-time", "0", "--keep-alive=-1"]  # fmt: skip
        ports = start_sims(children, twistd, args.backends, options)
        specs = [BackendSpec(f"sim{i}", p) for i, p in enumerate(ports)]
        daemon = start_daemon(children, twistd, repo, "ollamaflow", specs)
        for policy in mixed_policies(args.slots):
            refused = apply_policy(daemon, specs, policy, args.timeout)
            if refused:
                raise BenchError(f"{policy.name}: {refused}")
            started = time.monotonic()
            results = asyncio.run(replay(daemon.port, arrivals, args.timeout))
            elapsed = time.monotonic() - started
            rows.append(summarize(policy.name, results, elapsed, peak_queue(daemon)))
        return 0

    with_fleet(measure)
    print(
        f"{len(arrivals)} requests over {args.seconds:.0f} s on {args.backends} simulated "
        f"backends (seed {args.seed}; {args.rate:.1f} requests/s, {args.load:.0%} of the "
        f"generation slots busy; 1 slot per model; generations at {args.tps} tokens/s)"
    )
    header = (
        f"{'policy':26} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'embed p99':>10} "
        f"{'gen p99':>8} {'failed':>6} {'max queue':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['policy']:26} {r['throughput']:7.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{r['embed_p99_ms']:10.1f} {r['generate_p99_ms']:8.1f} {r['failed']:6d} "
            f"{r['peak_queue']:9d}"
        )
    if len(rows) == 2 and rows[1]["p99_ms"]:
        print(f"p99: {rows[0]['p99_ms'] / rows[1]['p99_ms']:.1f}x better with LeastOutstanding")
    write_result("scheduling.json", rows)
    return 1 if any(r["failed"] for r in rows) else 0


# -- the placement workload (issue 21) ----------------------------------------------------------

IDEAL = "ideal (cold start)"
PRELOADED = "ideal (preloaded)"
BASELINE = "LeastOutstanding + queue"
CANDIDATE = "ModelAware"
#: The simulators' counters a row adds up.
COUNTERS = ("loads", "evictions", "cache_hits", "cached_prompt_tokens", "evaluated_prompt_tokens")


def placement_policies(setup: placement.Setup) -> list[Policy]:
    """RoundRobin as 1.2 (no gateway slots), LeastOutstanding as configured today (a slot per
    model's parallel request on each of the models a box holds, the queue), ModelAware the
    same plus each box's VRAM."""
    slots = setup.per_box * setup.num_parallel
    vram: dict[str, object] = {"VramBytes": setup.vram_bytes()}
    return [
        Policy("RoundRobin (1.2)", "RoundRobin", 100000, 0),
        Policy(BASELINE, "LeastOutstanding", slots, setup.num_parallel),
        Policy(CANDIDATE, "ModelAware", slots, setup.num_parallel, vram),
    ]


def configure_sims(ports: list[int], setup: placement.Setup) -> str:
    """Set the placement knobs on every simulator; '' when done, else what it refused."""
    for port in ports:
        status, body = sim_call(port, "POST", "/_sim/config", setup.sim_knobs())
        if status != 200:
            return f"the simulator refused its knobs ({status}: {str(body)[:160]})"
    return ""


def reset_sims(ports: list[int], timeout: float = 30.0) -> None:
    """Unload every model and zero the counters: each policy starts from the same cold fleet."""
    for port in ports:
        sim_call(port, "POST", "/_sim/unload")
    deadline = time.monotonic() + timeout
    while any(_sim_state(port).get("loaded") for port in ports):
        if time.monotonic() > deadline:
            raise BenchError(f"simulators still have models loaded after {timeout:.0f} s")
        time.sleep(0.1)
    for port in ports:
        sim_call(port, "POST", "/_sim/reset")


def _sim_state(port: int) -> dict:
    status, state = sim_call(port, "GET", "/_sim/state")
    if status != 200 or not isinstance(state, dict):
        raise BenchError(f"simulator {port}: GET /_sim/state answered {status}")
    return state


def sim_counters(ports: list[int]) -> dict[str, int]:
    """The placement counters summed over the simulators (a counter none has is left out)."""
    total: dict[str, int] = {}
    for port in ports:
        counters = _sim_state(port).get("counters", {})
        for name in COUNTERS:
            if isinstance(counters.get(name), int):
                total[name] = total.get(name, 0) + counters[name]
    return total


def measure_placement(
    setup: placement.Setup,
    conversations: list[placement.Conversation],
    args: argparse.Namespace,
) -> list[placement.Row]:
    """Each policy in turn, each on a fresh daemon in front of the same cold simulators."""
    rows: list[placement.Row] = []

    def measure(children: Children, twistd: str, repo: Path) -> int:
        models = ",".join(setup.models)
        options = ["--models", models, "--max-queue", "4096", "--keep-alive=-1"]
        ports = start_sims(children, twistd, setup.backends, options)
        refused = configure_sims(ports, setup)
        if refused:
            rows.append(placement.Row("(every policy)", note=f"not measured: {refused}"))
            return 0
        specs = [BackendSpec(f"sim{i}", p) for i, p in enumerate(ports)]
        for i, policy in enumerate(placement_policies(setup)):
            if args.policies and not any(p in policy.name.lower() for p in args.policies):
                continue
            reset_sims(ports)
            daemon = start_daemon(children, twistd, repo, f"ollamaflow{i}", specs)
            rows.append(_measure_policy(daemon, specs, ports, policy, conversations, args))
            daemon.stop()
        return 0

    with_fleet(measure)
    return rows


def _measure_policy(
    daemon: Daemon,
    specs: list[BackendSpec],
    ports: list[int],
    policy: Policy,
    conversations: list[placement.Conversation],
    args: argparse.Namespace,
) -> placement.Row:
    refused = apply_policy(daemon, specs, policy, args.timeout)
    if refused:
        return placement.Row(policy.name, note=f"not available: {refused}")
    started = time.monotonic()
    watch = Residency(ports, started)
    watch.start()
    try:
        results = asyncio.run(placement.replay(daemon.port, conversations, args.timeout))
    finally:
        watch.stop()
    print(f"  {policy.name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    row = placement.summarize(policy.name, results, sim_counters(ports))
    row.residency = watch.changes
    if args.timeline:
        print(placement.timeline(row, [f"sim{i}" for i in range(len(ports))]))
    return row


class Residency(threading.Thread):
    """Polls what each simulator holds in VRAM while a replay runs: the changes, with the
    seconds since ``started`` (where models lived over time, for ``--timeline``)."""

    def __init__(self, ports: list[int], started: float, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.ports, self.started, self.every = ports, started, every
        self.changes: list[tuple[float, str, list[str]]] = []
        self._stopped = threading.Event()

    def run(self) -> None:
        held: dict[int, list[str]] = {}
        while not self._stopped.wait(self.every):
            for i, port in enumerate(self.ports):
                try:
                    loaded = sorted(_sim_state(port).get("loaded") or [])
                except BenchError:
                    continue
                if held.get(port) != loaded:
                    held[port] = loaded
                    at = round(time.monotonic() - self.started, 2)
                    self.changes.append((at, f"sim{i}", loaded))

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def placement_setup(args: argparse.Namespace) -> placement.Setup:
    """The workload's settings: the defaults, ``--smoke``'s, and the options given."""
    base = placement.smoke_setup(args.seed) if args.smoke else placement.Setup(seed=args.seed)
    changes = {
        name: getattr(args, name)
        for name in ("backends", "seconds", "load")
        if getattr(args, name) is not None
    }
    setup = replace(base, **changes)
    if setup.backends * setup.per_box < len(setup.models):
        raise SystemExit(f"--backends: at least {-(-len(setup.models) // setup.per_box)}")
    return setup


def run_placement(args: argparse.Namespace) -> int:
    """The live replays and the ideal ones, the table, the goals and the JSON."""
    setup = placement_setup(args)
    conversations = placement.workload(setup)
    print(placement.describe(setup, conversations), flush=True)
    live = measure_placement(setup, conversations, args)
    cold = placement.ideal(setup, conversations, preloaded=False)
    warm = placement.ideal(setup, conversations, preloaded=True)
    rows = [*live, placement.ideal_row(IDEAL, cold), placement.ideal_row(PRELOADED, warm)]
    print(placement.table(rows))
    by_name = {r.policy: r for r in rows}
    checks = placement.goals(by_name, CANDIDATE, BASELINE, IDEAL)
    print(placement.goals_text(f"goals (issue 21): {CANDIDATE}", checks))
    print(placement.versus(by_name.get(BASELINE), by_name[IDEAL]))
    for r in live:
        for error, count in r.errors.items():
            print(f"  {r.policy}: {count} x {error}")
    document = placement.document(setup, conversations, rows, checks)
    write_result("scheduling-placement.json", document)
    return 0


def placement_ideal_report(args: argparse.Namespace) -> int:
    """The ideal replay only, over ``--ideal`` seeds: no processes."""
    rows = []
    for seed in range(args.seed, args.seed + args.ideal):
        setup = replace(placement_setup(args), seed=seed)
        conversations = placement.workload(setup)
        run = placement.ideal(setup, conversations, preloaded=False)
        rows.append(placement.ideal_row(f"ideal, seed {seed}", run))
    print(placement.table(rows))
    return 0


# -- the command --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds each, for CI")
    parser.add_argument(
        "--workload",
        choices=("mixed", "placement", "both"),
        help="which workload [mixed; with --smoke: both]",
    )
    parser.add_argument("--seconds", type=float, help="seconds of arrivals [60]")
    parser.add_argument("--backends", type=int)
    parser.add_argument(
        "--load", type=float, help="share of the generation slots busy [mixed 0.7, placement 0.5]"
    )
    parser.add_argument("--rate", type=float, help="mixed: requests per second [from --load]")
    parser.add_argument("--slots", type=int, default=3, help="mixed: MaxParallelRequests")
    parser.add_argument("--tps", type=float, default=60.0, help="mixed: tokens/s of a generation")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--ideal", type=int, metavar="SEEDS", help="print the ideal over SEEDS seeds only"
    )
    parser.add_argument(
        "--timeline", action="store_true", help="placement: where models lived, over time"
    )
    parser.add_argument(
        "--policies",
        type=lambda text: [p.strip().lower() for p in text.split(",") if p.strip()],
        help="placement: only these (roundrobin,leastoutstanding,modelaware)",
    )
    args = parser.parse_args(argv)
    workloads = {"mixed": ["mixed"], "placement": ["placement"], "both": ["mixed", "placement"]}
    chosen = workloads[args.workload or ("both" if args.smoke else "mixed")]
    status = 0
    for name in chosen:
        try:
            if name == "mixed":
                status |= mixed_main(argparse.Namespace(**vars(args)))
            else:
                status |= placement_ideal_report(args) if args.ideal else run_placement(args)
        except BenchError as e:
            print(f"ERROR: {name}: {e}", file=sys.stderr)
            status = 1
    return status


def mixed_main(args: argparse.Namespace) -> int:
    """The mixed workload with its defaults filled in."""
    args.seconds = 60.0 if args.seconds is None else args.seconds
    args.backends = 8 if args.backends is None else args.backends
    args.load = 0.7 if args.load is None else args.load
    if args.smoke:
        args.seconds, args.backends, args.tps = 3.0, 3, 400.0
        args.rate = 6.0
    if args.rate is None:
        args.rate = rate_for(args.load, args.backends, args.tps)
    return ideal_report(args) if args.ideal else run_mixed(args)


if __name__ == "__main__":
    sys.exit(main())
