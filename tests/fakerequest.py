"""A client request as the gateway uses it (the ``ClientRequest`` protocol), in memory: it
records what it is answered, and a test can make its client leave."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure


@attrs.define
class Request:
    """A client request as the exchange uses it; records what it is answered."""

    method: bytes = b"POST"
    path: bytes = b"/api/chat"
    uri: bytes = b"/api/chat"
    body: bytes = b'{"model": "llama3"}'
    client_host: str = "10.0.0.1"
    secure: bool = False
    headers: list[tuple[bytes, bytes]] = attrs.field(factory=lambda: [(b"Host", b"flow")])
    code: int = 200
    phrase: bytes | None = None
    out: dict[bytes, list[bytes]] = attrs.field(factory=dict)
    written: list[bytes] = attrs.field(factory=list)
    started: bool = False
    finished: bool = False
    disconnected: bool = False
    aborted: bool = False
    persistent: bool = True
    fail_writes: bool = False
    producer: Any = None
    watchers: list[tuple[Callable[[], object], Callable[[Failure], object]]] = attrs.field(
        factory=list
    )
    content: io.BytesIO = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.content = io.BytesIO(self.body)

    def header(self, name: bytes) -> bytes | None:
        for field, value in self.headers:
            if field.lower() == name:
                return value
        return None

    def setResponseCode(self, code: int, phrase: bytes | None = None) -> None:
        self.code, self.phrase = code, phrase

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.out[name.lower()] = [value]

    def addHeader(self, name: bytes, value: bytes) -> None:
        self.out.setdefault(name.lower(), []).append(value)

    def write(self, data: bytes) -> None:
        assert not self.finished
        if self.fail_writes:
            raise RuntimeError("bug")
        self.started = True
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True
        for done, _ in self.watchers:
            done()

    def watch(self, done: Callable[[], object], lost: Callable[[Failure], object]) -> None:
        self.watchers.append((done, lost))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def abort_connection(self) -> None:
        self.aborted = True
        self.leave()

    def leave(self) -> None:
        """The client goes away."""
        if self.disconnected or self.finished:
            return
        self.disconnected = True
        for _, lost in self.watchers:
            lost(Failure(ConnectionRefusedError("gone")))

    @property
    def body_out(self) -> bytes:
        return b"".join(self.written)
