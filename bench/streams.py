"""Streaming clients: how a token stream looks from the client, and many streams held at once.

``python bench/streams.py latency --port P --streams 40 --concurrency 10`` runs ``--streams``
streaming ``POST /api/chat`` requests, ``--concurrency`` at a time, each on a keep-alive
connection of its worker (``--stagger S`` starts worker i after i*S seconds, so that streams
begin one by one rather than in bursts), and reports time to the first byte of the response,
time to the first token (NDJSON line) and the gaps between consecutive tokens as they arrive,
p50/p99 in ms.

``python bench/streams.py hold --port P --streams 2000 --ramp 2`` opens ``--streams`` streams
(spread over ``--ramp`` seconds so the listen backlog is not flooded), keeps them all open until
each has ended, and reports how many completed (status 200, a final ``"done": true`` line) and
every failure by kind. The open-file limit is raised to the hard limit first.

Both print one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter

from httpwire import ProtocolError, ResponseParser, build_request, percentile


class StreamResult:
    def __init__(self) -> None:
        self.status = 0
        self.ttfb_ns: int | None = None
        self.first_token_ns: int | None = None
        self.line_times_ns: list[int] = []
        self.done_seen = False
        self.error: str | None = None


class StreamConnection(asyncio.Protocol):
    """A keep-alive connection that runs one streaming request at a time and times its lines."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(self._head, self._body, self._done)
        self.result = StreamResult()
        self.sent_at = 0
        self.now = 0
        self.partial = b""
        self.finished: asyncio.Future[StreamResult] | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def request(self, data: bytes) -> asyncio.Future[StreamResult]:
        assert self.transport is not None
        self.result = StreamResult()
        self.partial = b""
        self.finished = asyncio.get_running_loop().create_future()
        self.sent_at = time.perf_counter_ns()
        self.transport.write(data)
        return self.finished

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        if self.result.ttfb_ns is None:
            self.result.ttfb_ns = now - self.sent_at
        self.now = now
        try:
            self.parser.feed(data)
        except ProtocolError as e:
            self._fail(f"protocol: {e}")

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.result.status = status

    def _body(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            if self.result.first_token_ns is None:
                self.result.first_token_ns = self.now - self.sent_at
            self.result.line_times_ns.append(self.now)
            if b'"done":true' in line.replace(b" ", b""):
                self.result.done_seen = True

    def _done(self) -> None:
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(self.result)

    def _fail(self, error: str) -> None:
        self.result.error = error
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(self.result)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.parser.connection_closed():
            return
        self._fail(f"connection lost: {exc or 'closed by peer'}")
        if not self.lost.done():
            self.lost.set_result(None)


async def _connect(port: int, seconds: float) -> StreamConnection:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(seconds):
        _, protocol = await loop.create_connection(StreamConnection, "127.0.0.1", port)
    return protocol


def _chat_body(tokens: int | None) -> bytes:
    body: dict[str, object] = {
        "model": "llama3",
        "messages": [{"role": "user", "content": "benchmark"}],
        "stream": True,
    }
    if tokens is not None:
        body["options"] = {"num_predict": tokens}
    return json.dumps(body).encode()


def _problem(result: StreamResult) -> str | None:
    if result.error is not None:
        return result.error
    if result.status != 200:
        return f"status {result.status}"
    if not result.done_seen:
        return "stream ended without done:true"
    return None


def _ms(value: float | None) -> float | None:
    return None if value is None else value / 1e6


async def latency(args: argparse.Namespace) -> dict[str, object]:
    host = f"127.0.0.1:{args.port}"
    request = build_request("POST", host, "/api/chat", _chat_body(args.tokens))
    # One untimed round first: loads the model and fills the proxies' connection pools.
    warmup = build_request("POST", host, "/api/chat", _chat_body(2))
    await _streams(args, warmup, min(args.concurrency, args.streams))
    started = time.monotonic()
    results, problems = await _streams(args, request, args.streams, args.stagger)
    ttfb = sorted(r.ttfb_ns for r in results if r.ttfb_ns is not None)
    first = sorted(r.first_token_ns for r in results if r.first_token_ns is not None)
    gaps = sorted(
        later - earlier
        for r in results
        for earlier, later in zip(r.line_times_ns, r.line_times_ns[1:], strict=False)
    )
    return {
        "streams": len(results),
        "errors": sum(problems.values()),
        "problems": dict(problems),
        "seconds": round(time.monotonic() - started, 3),
        "gaps": len(gaps),
        "ttfb_p50_ms": _ms(percentile(ttfb, 0.5)),
        "ttfb_p99_ms": _ms(percentile(ttfb, 0.99)),
        "first_token_p50_ms": _ms(percentile(first, 0.5)),
        "first_token_p99_ms": _ms(percentile(first, 0.99)),
        "gap_p50_ms": _ms(percentile(gaps, 0.5)),
        "gap_p99_ms": _ms(percentile(gaps, 0.99)),
    }


async def _streams(
    args: argparse.Namespace, request: bytes, count: int, stagger: float = 0.0
) -> tuple[list[StreamResult], Counter[str]]:
    """Run ``count`` streams, ``--concurrency`` at a time, each worker on one keep-alive
    connection (a new one after a failure); returns the good results and the failures.
    Worker ``i`` starts ``i * stagger`` seconds late, so streams do not all begin at once."""
    results: list[StreamResult] = []
    problems: Counter[str] = Counter()
    queue = list(range(count))

    async def worker(index: int) -> None:
        await asyncio.sleep(index * stagger)
        connection: StreamConnection | None = None
        while queue:
            queue.pop()
            try:
                if connection is None or connection.lost.done():
                    connection = await _connect(args.port, args.timeout)
                result = await asyncio.wait_for(connection.request(request), args.timeout)
            except (OSError, TimeoutError) as e:
                problems[type(e).__name__] += 1
                if connection is not None and connection.transport is not None:
                    connection.transport.abort()
                connection = None
                continue
            problem = _problem(result)
            if problem is None:
                results.append(result)
            else:
                problems[problem] += 1
                connection = None
        if connection is not None and connection.transport is not None:
            connection.transport.close()

    await asyncio.gather(*(worker(i) for i in range(min(args.concurrency, count))))
    return results, problems


async def hold(args: argparse.Namespace) -> dict[str, object]:
    host = f"127.0.0.1:{args.port}"
    request = build_request("POST", host, "/api/chat", _chat_body(args.tokens))
    await _streams(args, build_request("POST", host, "/api/chat", _chat_body(1)), 1)  # warm-up
    problems: Counter[str] = Counter()
    open_now = 0
    peak_open = 0
    completed = 0
    durations: list[float] = []

    async def one(delay: float) -> None:
        nonlocal open_now, peak_open, completed
        await asyncio.sleep(delay)
        connection: StreamConnection | None = None
        try:
            connection = await _connect(args.port, args.timeout)
            open_now += 1
            peak_open = max(peak_open, open_now)
            began = time.monotonic()
            result = await asyncio.wait_for(connection.request(request), args.timeout)
        except (OSError, TimeoutError) as e:
            problems[type(e).__name__] += 1
            return
        finally:
            if connection is not None and connection.transport is not None:
                open_now -= 1
                connection.transport.close()
        problem = _problem(result)
        if problem is None:
            completed += 1
            durations.append(time.monotonic() - began)
        else:
            problems[problem] += 1

    started = time.monotonic()
    step = args.ramp / args.streams
    await asyncio.gather(*(one(i * step) for i in range(args.streams)))
    durations.sort()
    return {
        "streams": args.streams,
        "completed": completed,
        "errors": sum(problems.values()),
        "problems": dict(problems),
        "peak_open": peak_open,
        "seconds": round(time.monotonic() - started, 3),
        "stream_seconds_p50": percentile(durations, 0.5),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["latency", "hold"])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--streams", type=int, default=20, help="how many streams in all")
    parser.add_argument("--concurrency", type=int, default=10, help="latency: streams at once")
    parser.add_argument("--tokens", type=int, default=None, help="num_predict for each stream")
    parser.add_argument(
        "--stagger", type=float, default=0.0, help="latency: seconds between workers' starts"
    )
    parser.add_argument("--ramp", type=float, default=2.0, help="hold: seconds to open them all")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for one stream")
    args = parser.parse_args(argv)
    if not 1 <= args.streams <= 20000 or not 1 <= args.concurrency <= 20000:
        parser.error("--streams and --concurrency must be 1..20000")
    _raise_nofile()
    mode = latency if args.mode == "latency" else hold
    json.dump(asyncio.run(mode(args)), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
