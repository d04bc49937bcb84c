"""Open dashboards: ``--count`` streams of the daemon's live feed, read and thrown away.

    python bench/dashboards.py --url http://127.0.0.1:PORT --token TOKEN --count 100

Opens ``--count`` connections, each ``GET /v1.0/events`` (``Authorization: Bearer TOKEN``;
a ``--url`` without a path means that one), waits until every stream has its first event (the
``hello`` and the state that follows it) or has failed, and prints one JSON line
``{"ready": true, ...}``. Then it reads every stream until SIGINT or SIGTERM (or ``--seconds``
after ready) and prints one JSON line: what arrived since ready (bytes on the wire, events, by
name, per second), how many streams are still open, why the others ended, and its own CPU time.
The exit code is 1 when a stream failed, 0 otherwise. ``--count 0`` opens none and does the
rest alike: the control of a comparison, a process started, waited for and stopped the same way.

One process, one thread, non-blocking sockets and ``selectors``: it de-chunks the responses and
counts events without decoding them, so 100 dashboards take a few percent of a core at most and
leave the machine (2 cores: the daemon, the load generator, the backend) to what is measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from types import FrameType
from urllib.parse import urlsplit

from httpwire import ProtocolError, ResponseParser, build_request
from loadgen import with_header

EVENTS_PATH = "/v1.0/events"


class Tally:
    """What every stream received, added up; ``reset`` at ready."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes = 0
        self.events: Counter[str] = Counter()
        self.began = time.monotonic()


class Stream:
    """One open dashboard: the response parsed as it arrives, its events counted."""

    def __init__(self, sock: socket.socket, tally: Tally) -> None:
        self.sock = sock
        self.tally = tally
        self.parser = ResponseParser(self._head, self._body, self._done)
        self.tail = b""  # the start of an event not complete yet
        self.started = False  # its first event arrived
        self.error: str | None = None

    def _head(self, status: int, headers: dict[str, str]) -> None:
        kind = headers.get("content-type", "")
        if status != 200 or not kind.startswith("text/event-stream"):
            self.error = f"status {status} {kind}".rstrip()

    def _body(self, piece: bytes) -> None:
        data = self.tail + piece if self.tail else piece
        end = data.rfind(b"\n\n")
        if end < 0:
            self.tail = data
            return
        self.tail = data[end + 2 :]
        for event in data[:end].split(b"\n\n"):
            if event.startswith(b"event: "):
                line = event.find(b"\n")
                self.tally.events[event[7:line].decode(errors="replace")] += 1
            elif event.startswith(b":"):
                self.tally.events["(comment)"] += 1
        self.started = True

    def _done(self) -> None:
        self.error = self.error or "the response ended"

    def read(self) -> None:
        """Read what the socket has; on an error or the end, ``error`` says why."""
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
            return
        if not data:
            self.error = self.error or "closed by the daemon"
            return
        self.tally.bytes += len(data)
        try:
            self.parser.feed(data)
        except ProtocolError as e:
            self.error = f"bad response: {e}"


class Dashboards:
    """Every stream, and the loop reading them."""

    def __init__(self, url: str, token: str, count: int, timeout: float) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        path = parts.path if parts.path not in ("", "/") else EVENTS_PATH
        request = build_request("GET", f"{host}:{port}", path)
        request = with_header(request, "Accept", "text/event-stream")
        request = with_header(request, "Authorization", f"Bearer {token}")
        self.tally = Tally()
        self.selector = selectors.DefaultSelector()
        self.streams: list[Stream] = []
        self.failed: Counter[str] = Counter()
        for _ in range(count):
            sock = socket.create_connection((host, port), timeout)
            sock.sendall(request)
            sock.setblocking(False)
            stream = Stream(sock, self.tally)
            self.streams.append(stream)
            self.selector.register(sock, selectors.EVENT_READ, stream)

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            stream: Stream = key.data
            stream.read()
            if stream.error is not None:
                self._close(stream)

    def _close(self, stream: Stream) -> None:
        self.selector.unregister(stream.sock)
        stream.sock.close()
        self.failed[stream.error or "?"] += 1

    @property
    def open(self) -> int:
        return sum(1 for s in self.streams if s.error is None)

    def ready(self) -> bool:
        return all(s.started or s.error is not None for s in self.streams)

    def summary(self) -> dict[str, object]:
        seconds = time.monotonic() - self.tally.began
        events = sum(self.tally.events.values())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "dashboards": len(self.streams),
            "open": self.open,
            "failed": dict(self.failed),
            "seconds": round(seconds, 3),
            "bytes": self.tally.bytes,
            "events": events,
            "by_event": dict(self.tally.events),
            "bytes_per_second": round(self.tally.bytes / seconds, 1) if seconds else 0.0,
            "events_per_second": round(events / seconds, 1) if seconds else 0.0,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        }


def run(args: argparse.Namespace) -> int:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    began = time.monotonic()
    dashboards = Dashboards(args.url, args.token, args.count, args.timeout)
    while not stopping and not dashboards.ready() and time.monotonic() < began + args.timeout:
        dashboards.poll(0.1)
    first = dashboards.tally.bytes
    ready = {
        "ready": True,
        "open": dashboards.open,
        "failed": dict(dashboards.failed),
        "first_bytes": first,
        "seconds_to_ready": round(time.monotonic() - began, 3),
    }
    print(json.dumps(ready), flush=True)
    dashboards.tally.reset()
    end = time.monotonic() + args.seconds if args.seconds else float("inf")
    while not stopping and time.monotonic() < end:
        dashboards.poll(min(0.2, max(0.0, end - time.monotonic())))
    print(json.dumps({**dashboards.summary(), "first_bytes": first}), flush=True)
    return 0 if dashboards.open == args.count else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--url", required=True, help=f"the daemon, http://HOST:PORT (path {EVENTS_PATH})")
    add("--token", required=True, help="an admin bearer token of the daemon")
    add("--count", type=int, default=100, help="dashboards to hold open (0: none)")
    add("--seconds", type=float, default=0.0, help="stop this long after ready [0: on a signal]")
    add("--timeout", type=float, default=20.0, help="seconds to connect and get first events")
    args = parser.parse_args(argv)
    if not 0 <= args.count <= 10000:
        parser.error("--count must be 0..10000")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
