"""A simulator on a `task.Clock` without sockets: requests go through the real HTTP channel over
in-memory transports, so tests see what a client would see on the wire, at the simulated instant
it would see it."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ollamaflow.sim.config import SimConfig
from ollamaflow.sim.control import ControlAPI
from ollamaflow.sim.server import SimResource, SimSite
from ollamaflow.sim.state import SimState

START = 1_700_000_000.0


class Sim:
    """A simulator on a Clock, without sockets."""

    def __init__(self, **knobs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.state = SimState.create(self.clock, SimConfig(**knobs), ("llama3", "all-minilm"))
        resource = SimResource(self.state, ControlAPI(self.state), loopback=True)
        self.site = SimSite(resource, reactor=self.clock)

    def advance(self, seconds: float, step: float = 0.001) -> None:
        """Advance in small steps (a Clock runs chained timers late when advanced at once), and a
        hair more than `seconds` so float error at epoch scale does not matter."""
        target = self.clock.seconds() + seconds + 1e-5
        while self.clock.seconds() + step < target:
            self.clock.advance(step)
        self.clock.advance(max(0.0, target - self.clock.seconds()))

    def connect(self) -> Conn:
        return Conn(self.site)

    def request(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> Conn:
        conn = self.connect()
        conn.send(method, path, body, raw=raw)
        return conn

    def sim_state(self) -> dict[str, Any]:
        """`/_sim/state` as a client reads it."""
        state: dict[str, Any] = self.request("GET", "/_sim/state").json()
        return state

    def ps(self) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = self.request("GET", "/api/ps").json()["models"]
        return models


class Conn:
    """One client connection; decodes what the server wrote so far."""

    def __init__(self, site: SimSite) -> None:
        self.transport = StringTransport()
        self.proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.proto.makeConnection(self.transport)

    def send(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> None:
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost:11434\r\nContent-Length: {len(data)}"
        self.proto.dataReceived(head.encode() + b"\r\n\r\n" + data)

    def raw(self) -> bytes:
        return self.transport.value()

    def status(self) -> int:
        return int(self.raw().split(b" ", 2)[1])

    def headers(self) -> bytes:
        return self.raw().split(b"\r\n\r\n", 1)[0].lower()

    def body(self) -> bytes:
        head, _, rest = self.raw().partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" not in head.lower():
            return rest
        out = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        return out

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body().splitlines() if line]

    def json(self) -> Any:
        return json.loads(self.body())

    def hang_up(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))
