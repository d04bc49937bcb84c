"""The simulator's `reset_head` fault over real sockets: part of a head, then a TCP reset."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import attrs
import pytest_twisted
import treq
from harness import Collect
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from ollamaflow.sim import RunningSimulator, SimConfig
from ollamaflow.sim.server import RESET_HEAD
from ollamaflow.sim.tap import Options

Start = Callable[..., Awaitable[RunningSimulator]]


@attrs.frozen
class Ending:
    """What a raw client received on one connection, and how the connection ended."""

    data: bytes
    reason: Failure

    @property
    def reset(self) -> bool:
        """Ended by a reset (ConnectionLost), not by an orderly close (ConnectionDone)."""
        return self.reason.check(ConnectionLost) is not None and not self.reason.check(
            ConnectionDone
        )


async def raw(sim: RunningSimulator, method: str, path: str, body: bytes = b"") -> Ending:
    """One request on a raw connection; what came back until the connection ended."""
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    proto = Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", sim.port), proto)
    assert proto.transport is not None
    proto.transport.write(request)
    await proto.done
    assert proto.reason is not None
    return Ending(proto.data, proto.reason)


async def control(sim: RunningSimulator, method: str, path: str, body: object = None) -> dict:
    """A `/_sim/` request through treq: its JSON answer (asserting 200)."""
    data = None if body is None else json.dumps(body).encode()
    response = await treq.request(method, sim.url + path, data=data, persistent=False)
    assert response.code == 200
    decoded: dict = json.loads(await treq.content(response))
    return decoded


@pytest_twisted.ensureDeferred
async def test_reset_head_cuts_every_api_request_mid_head(simulators: Start) -> None:
    sim = await simulators()
    knobs = await control(sim, "POST", "/_sim/config", {"reset_head": True})
    assert knobs["reset_head"] is True
    chat = json.dumps({"model": "llama3", "messages": [], "stream": True}).encode()
    for method, path, body in [
        ("GET", "/", b""),  # the daemon's health check
        ("POST", "/api/chat", chat),
        ("POST", "/v1/embeddings", b'{"model": "all-minilm", "input": "x"}'),
        ("GET", "/nowhere", b""),
    ]:
        ending = await raw(sim, method, path, body)
        assert ending.data == RESET_HEAD, path
        assert ending.reset, (path, ending.reason)
    assert sim.counters.reset_heads == 4
    assert sim.counters.in_flight == 0
    assert sim.counters.requests == {"/": 1, "/api/chat": 1, "/v1/embeddings": 1, "other": 1}
    assert sim.counters.statuses == {}


@pytest_twisted.ensureDeferred
async def test_control_requests_still_work_while_resetting(simulators: Start) -> None:
    sim = await simulators()
    await sim.configure(reset_head=True)
    state = await control(sim, "GET", "/_sim/state")
    assert state["config"]["reset_head"] is True
    assert (await raw(sim, "GET", "/api/tags")).data == RESET_HEAD
    assert (await control(sim, "GET", "/_sim/state"))["counters"]["reset_heads"] == 1
    await control(sim, "POST", "/_sim/config", {"reset_head": False})
    response = await treq.get(sim.url + "/", persistent=False)
    assert (response.code, await treq.content(response)) == (200, b"Ollama is running")
    ending = await raw(sim, "GET", "/api/version")
    assert ending.data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert sim.counters.reset_heads == 1


@pytest_twisted.ensureDeferred
async def test_reset_head_knob_is_a_bool(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(reset_head=True))
    response = await treq.post(
        sim.url + "/_sim/config", data=b'{"reset_head": 1}', persistent=False
    )
    assert response.code == 400
    assert "reset_head" in json.loads(await treq.content(response))["error"]
    assert sim.config.reset_head is True
    assert (await raw(sim, "GET", "/")).reset


def test_reset_head_from_the_command_line() -> None:
    options = Options()
    options.parseOptions(["--fault=reset_head"])
    assert options.config.reset_head and not options.config.hang
    assert not Options().config.reset_head
