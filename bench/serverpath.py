"""The cost of serving one small request, in memory: OllamaFlow's server path against h11 and
twisted.web.

Each server gets the same keep-alive ``POST /api/chat`` (the shape an Ollama client sends) over
one in-memory connection and answers a fixed small JSON body; no sockets, no reactor, no
backend. What is left is the HTTP/1.1 work itself — parse the head and body, route, frame and
write the answer — which is where the case for a lean server of our own is made or lost.

    python bench/serverpath.py            # a table, about 10 s
    python bench/serverpath.py --smoke    # a second, for CI
    python bench/serverpath.py --json     # one JSON line (bench/run.py reads it)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import h11
from report import best_microseconds
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site

from ollamaflow.frontdoor import FrontDoor, Root
from ollamaflow.server.acceptor import Acceptor
from ollamaflow.server.interfaces import ClientRequest

BODY = json.dumps(
    {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
).encode()
REQUEST = (
    b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:43411\r\nUser-Agent: ollama-python/0.6.0\r\n"
    b"Accept: application/json\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
ANSWER = b'{"model":"llama3","message":{"role":"assistant","content":"hello"},"done":true}'
PEER = IPv4Address("TCP", "127.0.0.1", 50000)


class _Answering:
    """The gateway's place: answers every request with the fixed body."""

    def render(self, request: ClientRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return ANSWER


class _Page(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return ANSWER


def ollamaflow_server() -> Callable[[], None]:
    """One request through OllamaFlow's HTTPConnection, as the gateway sees it."""
    front_door = FrontDoor(_Answering(), Root(_Page()), lambda host: 1 << 20)
    connection = Acceptor(front_door, Clock()).buildProtocol(PEER)
    assert connection is not None
    transport = StringTransport(peerAddress=PEER)
    connection.makeConnection(transport)

    def one() -> None:
        connection.dataReceived(REQUEST)
        transport.clear()

    return one


def twisted_web_server() -> Callable[[], None]:
    """One request through twisted.web's HTTPChannel and Site, with a resource answering."""
    site = Site(_Page())
    site.log = lambda request: None  # type: ignore[method-assign]
    channel = site.buildProtocol(PEER)
    assert channel is not None
    transport = StringTransport(peerAddress=PEER)
    channel.makeConnection(transport)

    def one() -> None:
        channel.dataReceived(REQUEST)
        transport.clear()

    return one


def h11_server() -> Callable[[], None]:
    """One request through h11's server Connection, the answer framed by h11 too."""
    connection = h11.Connection(h11.SERVER)
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))]

    def one() -> None:
        connection.receive_data(REQUEST)
        while True:
            event = connection.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            if event is h11.NEED_DATA:
                raise RuntimeError("h11 wants more of a complete request")
        out = connection.send(h11.Response(status_code=200, headers=headers))
        out += connection.send(h11.Data(data=ANSWER))
        out += connection.send(h11.EndOfMessage())
        assert out
        connection.start_next_cycle()

    return one


SERVERS: dict[str, Callable[[], Callable[[], None]]] = {
    "ollamaflow": ollamaflow_server,
    "h11": h11_server,
    "twisted.web": twisted_web_server,
}


def per_request_us(make: Callable[[], Callable[[], None]], seconds: float) -> float:
    """The best of five rounds of ``seconds``/5 each, in microseconds per request."""
    return best_microseconds(make(), seconds, rounds=5, batch=100, clock=time.perf_counter)


def measure(seconds: float) -> dict[str, float]:
    return {name: round(per_request_us(make, seconds), 2) for name, make in SERVERS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="a second in all, for CI")
    parser.add_argument("--seconds", type=float, default=3.0, help="per server [3; smoke 0.2]")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args(argv)
    results = measure(0.2 if args.smoke else args.seconds)
    if args.json:
        print(json.dumps({"us_per_request": results, "request_bytes": len(REQUEST)}))
        return 0
    ours = results["ollamaflow"]
    print(f"one small keep-alive POST /api/chat ({len(REQUEST)} bytes) and its answer, in memory")
    print(f"{'server':14}{'us/request':>12}{'requests/s':>14}{'vs ollamaflow':>16}")
    for name, us in results.items():
        print(f"{name:14}{us:12.2f}{1e6 / us:14,.0f}{us / ours:15.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
