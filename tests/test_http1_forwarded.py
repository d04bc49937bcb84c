"""The accepted requests of the client corpus end to end (issue 15): the exact bytes a backend
receives for each. Whatever framing the client chose (chunks, extensions, trailers, upper-case
codings, an upgrade offer), the backend gets one plain message: a Content-Length body, no
hop-by-hop field or field its ``Connection`` names, its own ``Host`` and the forwarding fields,
everything else as the client sent it, in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from harness import Collect, Http, start_daemon, until
from listening import listen_local, port_number, stop_listening
from test_http1_requests import ACCEPTED, Case, Seen
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory

from ollamaflow.daemon import Daemon
from ollamaflow.http1.rules import HOP_BY_HOP, connection_tokens

#: Paths no route of the gateway knows, of the same length (a body may hold a request): they
#: are forwarded as they are (the corpus's /api/chat bodies are not JSON, and /api/tags is
#: answered from the inventory).
_PATHS = {b"/api/chat": b"/xyz/chat", b"/api/tags": b"/xyz/tags"}
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def _moved(data: bytes) -> bytes:
    for old, new in _PATHS.items():
        data = data.replace(old, new)
    return data


class _Raw(Protocol):
    """Keeps each request's bytes exactly as received; answers each with ``{}``."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.seen.append(head + b"\r\n\r\n" + rest[:length])
            self.buffer = rest[length:]
            assert self.transport is not None
            self.transport.write(_ANSWER)


@attrs.define
class Rig:
    daemon: Daemon
    port: IListeningPort
    seen: list[bytes]

    @property
    def backend_host(self) -> bytes:
        return b"127.0.0.1:%d" % port_number(self.port)

    def forwarded(self) -> list[bytes]:
        return [r for r in self.seen if not r.startswith((b"GET / ", b"GET /api/"))]


@pytest_twisted.async_yield_fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    seen: list[bytes] = []
    port = listen_local(ServerFactory.forProtocol(lambda: _Raw(seen)))
    daemon = await start_daemon(Path(tmp_path_factory.mktemp("forwarded")))
    admin = Http.to(daemon)
    record = {"Identifier": "raw", "Hostname": "127.0.0.1", "Port": port_number(port)}
    assert (await admin.put("/v1.0/backends", record)).status == 201
    frontend = {"Backends": ["raw"], "BlockHttp10": False}
    assert (await admin.put("/v1.0/frontends/frontend1", frontend)).status == 200
    await until(lambda: daemon.runtime.state("raw").healthy, what="the raw backend is healthy")
    yield Rig(daemon, port, seen)
    await daemon.stopService()
    await stop_listening(port)


def expected(seen: Seen, backend_host: bytes) -> bytes:
    """What the README promises a backend gets for what the gateway got."""
    fields = seen.fields
    named: frozenset[bytes] = frozenset()
    for name, value in fields:
        if name.lower() == b"connection":
            named |= connection_tokens(value)
    dropped = HOP_BY_HOP | named | {b"host", b"content-length"}
    lines = [b"%s %s HTTP/1.1" % (seen.method, _moved(seen.uri))]
    if seen.body or seen.method in (b"POST", b"PUT"):
        lines.append(b"Content-Length: %d" % len(seen.body))
    lines += [b"%s: %s" % (n, v) for n, v in fields if n.lower() not in dropped]
    lines.append(b"X-Forwarded-For: 127.0.0.1")
    if seen.host is not None:
        lines.append(b"X-Forwarded-Host: " + seen.host)
    lines += [b"X-Forwarded-Proto: http", b"Host: " + backend_host]
    return b"\r\n".join(lines) + b"\r\n\r\n" + _moved(seen.body)


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda case: case.name)
@pytest_twisted.ensureDeferred
async def test_an_accepted_request_reaches_the_backend_as_one_plain_message(
    rig: Rig, case: Case
) -> None:
    before = len(rig.forwarded())
    client = Collect(_moved(case.request))
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", rig.daemon.address.port)
    await connectProtocol(endpoint, client)
    await until(lambda: client.data.count(b" 200 OK\r\n") >= len(case.seen), what=case.name)
    assert client.transport is not None
    client.transport.loseConnection()
    got = rig.forwarded()[before:]
    assert got == [expected(seen, rig.backend_host) for seen in case.seen]
