"""The cost of one small proxied request on the backend side, in memory: OllamaFlow's backend
client sending a request on a pooled connection and reading its answer.

Each round sends the ``POST /api/chat`` the gateway forwards (its body in memory) on one pooled
in-memory connection and feeds back a small JSON answer in one read (``Content-Length``) or a
streamed one in chunks; the body is read by a protocol as the relay reads it. No sockets, no
reactor: what is left is serializing the request, parsing the answer and the pool's work.

    python bench/clientpath.py            # a table, about 10 s
    python bench/clientpath.py --smoke    # a second
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from report import best_microseconds, calls
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ollamaflow.records import Backend
from ollamaflow.upstream.client import BackendClient
from ollamaflow.upstream.connection import Connection

BACKEND = Backend(identifier="b", hostname="10.0.0.1", port=11434)
WHERE = (BACKEND.hostname, BACKEND.port, BACKEND.ssl)
BODY = b'{"model":"llama3","messages":[{"role":"user","content":"hi"}],"stream":false}'
FIELDS = [
    (b"Host", b"10.0.0.1:11434"),
    (b"User-Agent", b"ollama-python/0.6.0"),
    (b"Accept", b"application/json"),
    (b"Content-Type", b"application/json"),
    (b"X-Forwarded-For", b"127.0.0.1"),
]
ANSWER = b'{"model":"llama3","message":{"role":"assistant","content":"hello"},"done":true}'
SMALL = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Date: Mon, 30 Nov 2026 08:00:00 GMT\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
)
TOKEN = b'{"model":"llama3","message":{"role":"assistant","content":"tok"},"done":false}\n'
STREAM = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    b"Date: Mon, 30 Nov 2026 08:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n",
    *[b"%x\r\n%s\r\n" % (len(TOKEN), TOKEN)] * 20,
    b"0\r\n\r\n",
]


class _Transport:
    """The least a connection's transport must do: take writes, pause and resume."""

    disconnecting = False

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: list[bytes]) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.disconnecting = True


class _Read(Protocol):
    """Reads a body as the relay does: every chunk, then the end."""

    def __init__(self) -> None:
        self.size = 0
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.ended = True


def client_path(answer: list[bytes]) -> Callable[[], None]:
    """One request and its answer through the client, on one pooled in-memory connection."""
    client = BackendClient(Clock(), 5.0)
    connection = Connection(client.pool, WHERE)
    connection.makeConnection(_Transport())
    client.pool.dialled(WHERE)
    client.pool.release(connection)
    readers: list[_Read] = []

    def responded(response: Any) -> None:
        reader = _Read()
        readers.append(reader)
        response.deliverBody(reader)

    def failed(failure: Failure) -> None:
        raise RuntimeError(failure.getErrorMessage())

    def one() -> None:
        client.send(BACKEND, b"POST", b"/api/chat", FIELDS, BODY, responded, failed)
        for piece in answer:
            connection.dataReceived(piece)
        reader = readers.pop()
        assert reader.ended and reader.size, "the answer was read whole"

    return one


CASES: dict[str, Callable[[], Callable[[], None]]] = {
    "small answer": lambda: client_path([SMALL]),
    "20-chunk stream": lambda: client_path(STREAM),
}


def measure(one: Callable[[], None], seconds: float) -> float:
    """CPU microseconds per call, best of ten rounds of ``seconds`` / 10 each (CPU time: other
    processes on the machine move it less than wall time)."""
    return best_microseconds(one, seconds, rounds=10, batch=200, clock=time.process_time)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a second, for CI")
    args = parser.parse_args(argv)
    seconds = 0.5 if args.smoke else 5.0
    for name, make in CASES.items():
        one = make()
        print(f"{name:18} {measure(one, seconds):8.2f} us per request, {calls(one)} calls")


if __name__ == "__main__":
    main()
