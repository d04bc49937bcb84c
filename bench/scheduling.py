"""Why load-aware scheduling: RoundRobin against LeastOutstanding + the queue, same workload.

A mixed workload on simulators that behave like Ollama (one slot per model, requests beyond it
wait silently inside the server): many short embeddings and fewer long generations over two
chat models, arriving at random (seeded) times. The same arrivals are replayed through a
frontend balancing RoundRobin without gateway limits (OllamaFlow 1.2's behaviour) and through one
balancing LeastOutstanding with per-backend slots and the queue. Prints p50/p99 latency,
throughput, failures and the peak queue depth of each:

    python bench/scheduling.py                  # eight backends, about three minutes
    python bench/scheduling.py --backends 3     # the same load per backend on three
    python bench/scheduling.py --smoke          # a few seconds (CI)
    python bench/scheduling.py --ideal 20       # no processes: the ideal of both, 20 seeds

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
import time
from dataclasses import dataclass
from pathlib import Path

from flow import BackendSpec, Daemon
from httpwire import percentile
from procs import Children, free_ports

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


def run(args: argparse.Namespace) -> int:
    twistd = str(Path(sys.executable).with_name("twistd"))
    repo = Path(__file__).resolve().parent.parent
    workdir = Path(tempfile.mkdtemp(prefix="ollamaflow-sched-"))
    children = Children(workdir)
    rows = []
    try:
        ports = free_ports(args.backends)
        for i, port in enumerate(ports):
            argv = [
                twistd, "-n", "--pidfile=", "ollamaflow-sim", "--port", str(port),
                "--models", SIM_MODELS, "--tokens", "120", "--num-parallel", "1",
                "--max-queue", "4096",
                "--tokens-per-second", str(args.tps), "--ttft", str(TTFT), "--load-time", "0",
                "--keep-alive=-1", "--no-host-check",
            ]  # fmt: skip
            children.start(f"sim{i}", argv).wait_port(port)
        specs = [BackendSpec(f"sim{i}", p) for i, p in enumerate(ports)]
        daemon = Daemon(children, twistd, repo, "ollamaflow", 1)
        daemon.configure(specs)
        daemon.wait_healthy([s.identifier for s in specs], timeout=20)
        daemon.wait_models(timeout=20)
        arrivals = workload(args.seed, args.seconds, args.rate, TOKENS, args.tps)
        policies = {
            "RoundRobin (1.2)": {
                "LoadBalancing": "RoundRobin",
                "MaxParallelRequests": 100000,
                "ModelParallelRequests": 0,
            },
            "LeastOutstanding + queue": {
                "LoadBalancing": "LeastOutstanding",
                "MaxParallelRequests": args.slots,
                # As the simulators: one request at a time per model (OLLAMA_NUM_PARALLEL=1).
                "ModelParallelRequests": 1,
            },
        }
        for name, policy in policies.items():
            for spec in specs:
                daemon.admin(
                    "PUT",
                    f"/v1.0/backends/{spec.identifier}",
                    {"Hostname": "127.0.0.1", "Port": spec.port,
                     "MaxParallelRequests": policy["MaxParallelRequests"],
                     "ModelParallelRequests": policy["ModelParallelRequests"],
                     "RateLimitRequestsThreshold": 100000},
                )  # fmt: skip
            daemon.admin(
                "PUT",
                "/v1.0/frontends/frontend1",
                {"Backends": [s.identifier for s in specs],
                 "LoadBalancing": policy["LoadBalancing"], "MaxQueueDepth": 10000,
                 "QueueTimeoutMs": int(args.timeout * 1000), "TimeoutMs": 0},
            )  # fmt: skip
            daemon.wait_healthy([s.identifier for s in specs], timeout=20)
            started = time.monotonic()
            results = asyncio.run(replay(daemon.port, arrivals, args.timeout))
            elapsed = time.monotonic() - started
            _, health = daemon.admin("GET", "/v1.0/health")
            queues = health.get("Queues", []) if isinstance(health, dict) else []
            peak = max((q.get("PeakQueueDepth", 0) for q in queues), default=0)
            rows.append(summarize(name, results, elapsed, peak))
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
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
    out = repo / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "scheduling.json").write_text(json.dumps(rows, indent=2))
    return 1 if any(r["failed"] for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backends", type=int, default=8)
    parser.add_argument(
        "--load", type=float, default=0.7, help="share of generation slots busy on average"
    )
    parser.add_argument("--rate", type=float, help="requests per second [from --load]")
    parser.add_argument("--slots", type=int, default=3, help="MaxParallelRequests per backend")
    parser.add_argument("--tps", type=float, default=60.0, help="tokens/s of a generation")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--ideal", type=int, metavar="SEEDS", help="print the ideal gain over SEEDS seeds only"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.backends, args.tps = 3.0, 3, 400.0
        args.rate = 6.0
    if args.rate is None:
        args.rate = rate_for(args.load, args.backends, args.tps)
    return ideal_report(args) if args.ideal else run(args)


if __name__ == "__main__":
    sys.exit(main())
