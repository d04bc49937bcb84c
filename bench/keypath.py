"""The cost of an API key on one proxied request, in memory: the daemon's whole path (the HTTP
server, routing, who asks, the key's limits, the exchange, the relay, the usage ledger and the
metrics) with a backend client that answers at once. No sockets, no reactor, no other process
to share the CPU with, so the difference between the rows is the keys' own work.

    python bench/keypath.py            # a table, about 15 s
    python bench/keypath.py --smoke    # a second or two
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import attrs
from report import best_microseconds, calls
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from ollamaflow.apikeys import hash_secret, new_secret
from ollamaflow.catalog import Catalog, Registry
from ollamaflow.frontdoor import FrontDoor, Root
from ollamaflow.gateway.proxy import Gateway
from ollamaflow.gateway.scheduler import Scheduler
from ollamaflow.metrics import Metrics
from ollamaflow.ratelimits.local import LocalLimits
from ollamaflow.records import ApiKey, Backend, Frontend
from ollamaflow.runtime import Runtime
from ollamaflow.server.acceptor import Acceptor
from ollamaflow.store.rows import Snapshot
from ollamaflow.usage import UsageLedger
from ollamaflow.utctime import utc_clock

BODY = b'{"model":"llama3","messages":[{"role":"user","content":"hi"}],"stream":false}'
ANSWER = (
    b'{"model":"llama3","message":{"role":"assistant","content":"hello"},"done":true,'
    b'"prompt_eval_count":1,"eval_count":20,"eval_duration":1000000}'
)
PEER = IPv4Address("TCP", "127.0.0.1", 50000)
SECRET = new_secret()
#: Limits set, and never reached by a benchmark.
LIMITED = ApiKey(
    identifier="limited",
    requests_per_minute=10**9,
    tokens_per_minute=2**31 - 1,
    max_concurrent_requests=10**6,
    secret_hash=hash_secret(SECRET),
)
UNLIMITED_SECRET = new_secret()
UNLIMITED = ApiKey(identifier="unlimited", secret_hash=hash_secret(UNLIMITED_SECRET))


class _BodyTransport:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@attrs.define
class _Response:
    """A backend's whole answer, delivered in one piece when read."""

    version: tuple[bytes, int, int] = (b"HTTP", 1, 1)
    code: int = 200
    phrase: bytes = b"OK"
    headers: Headers = attrs.field(
        factory=lambda: Headers({b"content-type": [b"application/json; charset=utf-8"]})
    )
    length: int = len(ANSWER)

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(_BodyTransport())
        protocol.dataReceived(ANSWER)
        protocol.connectionLost(Failure(ResponseDone()))


@attrs.define
class _Attempt:
    fired: bool = False

    def cancel(self) -> None:
        pass


@attrs.define
class _Upstream:
    """Takes each request and keeps its answer for :meth:`answer`."""

    waiting: list[Callable[[Any], object]] = attrs.field(factory=list)

    def send(self, backend: Any, method: bytes, target: bytes, fields: Any, body: Any,
             on_response: Callable[[Any], object], on_failure: Any) -> _Attempt:  # fmt: skip
        self.waiting.append(on_response)
        return _Attempt()

    def answer(self) -> None:
        self.waiting.pop()(_Response())

    def forget(self, keep: object) -> None:
        pass

    async def close(self) -> None:
        pass


class _NoUsageStore:
    async def add_usage(self, rows: Any) -> None:
        pass

    async def read_usage(self, key_id: str, since: Any, limit: int) -> list[Any]:
        return []


def gateway_path(host: bytes, authorization: bytes | None) -> Callable[[], None]:
    """One keep-alive chat request through the server and the gateway, answered by the fake
    backend, start to end."""
    clock = Clock()
    clock.advance(1_800_000_000)
    backend = Backend(identifier="b", max_parallel_requests=10**6,
                      rate_limit_requests_threshold=10**6)  # fmt: skip
    snapshot = Snapshot(
        1,
        frontends=(
            Frontend(identifier="open", hostname="open.bench", backends=("b",)),
            Frontend(
                identifier="keyed", hostname="keyed.bench", backends=("b",), require_api_key=True
            ),
        ),
        backends=(backend,),
        api_keys=(LIMITED, UNLIMITED),
    )
    registry = Registry(store=_NoUsageStore(), catalog=Catalog.build(snapshot))  # type: ignore[arg-type]
    runtime = Runtime()
    runtime.state("b").succeeded(utc_clock(clock.seconds)(), threshold=1)
    upstream = _Upstream()
    gateway = Gateway(
        registry=registry,
        runtime=runtime,
        reactor=clock,
        upstream=upstream,
        scheduler=Scheduler(clock, runtime),
        http=None,  # type: ignore[arg-type]
        observers=[UsageLedger(_NoUsageStore(), clock), Metrics(known_model=lambda m: m)],
        limiter=LocalLimits(clock),
    )
    front_door = FrontDoor(gateway, Root(Resource()), gateway.body_limit)
    connection = Acceptor(front_door, clock).buildProtocol(PEER)
    assert connection is not None
    transport = StringTransport(peerAddress=PEER)
    connection.makeConnection(transport)
    head = [b"POST /api/chat HTTP/1.1", b"Host: " + host, b"User-Agent: openai-python/1.0",
            b"Content-Type: application/json", b"Content-Length: %d" % len(BODY)]  # fmt: skip
    if authorization is not None:
        head.append(b"Authorization: " + authorization)
    request = b"\r\n".join(head) + b"\r\n\r\n" + BODY

    def one() -> None:
        connection.dataReceived(request)
        upstream.answer()
        answered = transport.value()
        assert answered.startswith(b"HTTP/1.1 200 "), answered[:200]
        transport.clear()

    return one


CASES: dict[str, Callable[[], Callable[[], None]]] = {
    "no key (open frontend)": lambda: gateway_path(b"open.bench", None),
    "key required, no limits": lambda: gateway_path(
        b"keyed.bench", b"Bearer " + UNLIMITED_SECRET.encode()
    ),
    "key required, limits set": lambda: gateway_path(b"keyed.bench", b"Bearer " + SECRET.encode()),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a second or two, for CI")
    parser.add_argument("--seconds", type=float, help="seconds per case [4; smoke 0.2]")
    args = parser.parse_args(argv)
    seconds = args.seconds or (0.2 if args.smoke else 4.0)
    rows = []
    for name, make in CASES.items():
        one = make()
        us = best_microseconds(one, seconds, rounds=10, batch=100, clock=time.process_time)
        rows.append((name, us, calls(one)))
    base_us, base_calls = rows[0][1], rows[0][2]
    print(f"{'request':<28} {'us/request':>10} {'vs no key':>10} {'calls':>6} {'vs no key':>10}")
    for name, us, count in rows:
        print(f"{name:<28} {us:>10.1f} {us / base_us - 1:>+10.1%} {count:>6} "
              f"{count / base_calls - 1:>+10.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
