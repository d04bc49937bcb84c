"""Reading Server-Sent Events in tests: a parser of the text, and a body protocol that keeps
the events of a live stream as they arrive."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure


def parse_events(text: bytes) -> tuple[list[tuple[str, Any]], int, bytes]:
    """The whole events in ``text`` as ``(name, data)``, the comments seen, and what is left
    of an event not yet whole."""
    events: list[tuple[str, Any]] = []
    comments = 0
    *blocks, rest = text.split(b"\n\n")
    for block in blocks:
        name, data = "message", []
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                comments += 1
            elif line.startswith(b"event: "):
                name = line[len(b"event: ") :].decode()
            elif line.startswith(b"data: "):
                data.append(line[len(b"data: ") :])
        if data:
            events.append((name, json.loads(b"\n".join(data))))
    return events, comments, rest


class EventReader(Protocol):
    """A response body read as Server-Sent Events; ``done`` fires when the stream ends."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.comments = 0
        self._rest = b""
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        events, comments, self._rest = parse_events(self._rest + data)
        self.events += events
        self.comments += comments

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)

    def latest(self, name: str) -> Any:
        """The data of the latest event called ``name``, or None."""
        for found, data in reversed(self.events):
            if found == name:
                return data
        return None

    def named(self, name: str) -> list[Any]:
        return [data for found, data in self.events if found == name]
