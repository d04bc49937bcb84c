"""Our own HTTP load generator, used when ``wrk`` is not installed.

``python bench/loadgen.py --port P --path /api/tags --connections 64 --duration 5`` keeps
``--connections`` keep-alive HTTP/1.1 connections busy (one request in flight on each, a new one
as soon as the answer is complete) for ``--duration`` seconds and prints one JSON object:
requests, errors, requests/s and latency percentiles in milliseconds.

It is an asyncio client on raw protocols (no HTTP library), run as its own process so that it
gets a core of its own. It tops out at some tens of thousands of small requests per second on
one core: rows faster than that are capped by it, which the run's notes say.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from httpwire import ProtocolError, ResponseParser, build_request, percentile


class LoadConnection(asyncio.Protocol):
    """One keep-alive connection sending the same request back to back until the deadline."""

    def __init__(self, request: bytes, deadline: float, stats: Stats) -> None:
        self.request = request
        self.deadline = deadline
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0
        self.status = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.parser = ResponseParser(self._head, self._body, self._done)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.monotonic() >= self.deadline:
            self.transport.close()
            return
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except ProtocolError:
            self.stats.errors += 1
            assert self.transport is not None
            self.transport.close()

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.status = status

    def _body(self, data: bytes) -> None:
        pass

    def _done(self) -> None:
        elapsed = time.perf_counter_ns() - self.sent_at
        if 200 <= self.status < 300:
            self.stats.latencies_ns.append(elapsed)
        else:
            self.stats.non_2xx += 1
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.parser.state != "head" or time.monotonic() < self.deadline:
            self.stats.errors += 1  # closed mid-response, or by the server before the end
        if not self.closed.done():
            self.closed.set_result(None)


class Stats:
    def __init__(self) -> None:
        self.latencies_ns: list[int] = []
        self.errors = 0
        self.non_2xx = 0


def with_header(request: bytes, name: str, value: str) -> bytes:
    """``request`` with one more header field, right after its request line."""
    line, rest = request.split(b"\r\n", 1)
    return line + f"\r\n{name}: {value}\r\n".encode() + rest


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    body = args.body.encode()
    request = build_request(args.method, args.host or f"127.0.0.1:{args.port}", args.path, body)
    if args.authorization:
        request = with_header(request, "Authorization", args.authorization)
    stats = Stats()
    started = time.monotonic()
    deadline = started + args.duration
    connections: list[LoadConnection] = []
    for _ in range(args.connections):
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: LoadConnection(request, deadline, stats), "127.0.0.1", args.port
                ),
                5,
            )
        except (OSError, TimeoutError):
            stats.errors += 1
            continue
        connections.append(protocol)
    if connections:
        waits = [c.closed for c in connections]
        await asyncio.wait(waits, timeout=max(0.0, deadline - time.monotonic()) + args.timeout)
        for c in connections:
            if c.transport is not None and not c.closed.done():
                stats.errors += 1  # still waiting for an answer after the grace period
                c.transport.abort()
    elapsed = time.monotonic() - started
    ordered = sorted(stats.latencies_ns)
    p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
    return {
        "tool": "bench/loadgen.py",
        "requests": len(ordered),
        "errors": stats.errors,
        "non_2xx": stats.non_2xx,
        "seconds": round(elapsed, 3),
        "rps": round(len(ordered) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": None if p50 is None else p50 / 1e6,
        "p99_ms": None if p99 is None else p99 / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--path", default="/", help="request path")
    parser.add_argument("--host", help="Host header [127.0.0.1:PORT]")
    parser.add_argument("--authorization", help="Authorization header, e.g. 'Bearer ofk_...'")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="", help="request body (JSON)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=5.0, help="grace after the end, s")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 10000 or not 0 < args.duration <= 3600:
        parser.error("--connections must be 1..10000 and --duration 0..3600")
    if any(c in (args.authorization or "") for c in "\r\n"):
        parser.error("--authorization: no line breaks")
    json.dump(asyncio.run(run(args)), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
