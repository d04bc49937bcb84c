"""A minimal incremental HTTP/1.1 response parser for the benchmark's own clients.

Only what a benchmark against our servers needs: a status line, headers, then a body framed by
``Content-Length`` or chunked transfer coding (or, without either, ended by the connection).
Body bytes are handed over as they arrive, so callers can time each piece.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class ProtocolError(Exception):
    """The response is not HTTP/1.1 as we can read it."""


def build_request(
    method: str, host: str, path: str, body: bytes = b"", content_type: str = "application/json"
) -> bytes:
    """One keep-alive HTTP/1.1 request, ready to write."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: ollamaflow-bench"]
    if body or method in ("POST", "PUT"):
        head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ResponseParser:
    """Feed bytes with ``feed``; callbacks report the head, body pieces and the end.

    ``on_head(status, headers)``, ``on_body(data)`` and ``on_done()`` run in order for each
    response; ``feed`` returns bytes left over after a complete response (pipelining is not used,
    so normally nothing).
    """

    def __init__(
        self,
        on_head: Callable[[int, dict[str, str]], None],
        on_body: Callable[[bytes], None],
        on_done: Callable[[], None],
    ) -> None:
        self.on_head = on_head
        self.on_body = on_body
        self.on_done = on_done
        self.reset()

    def reset(self) -> None:
        self.buffer = b""
        self.state = "head"
        self.remaining = 0  # body bytes left (length framing) or in the current chunk
        self.until_close = False

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        while self.buffer:
            if self.state == "head":
                if not self._head():
                    break
            elif self.state == "length":
                self._length()
            elif self.state == "chunk-size":
                if not self._chunk_size():
                    break
            elif self.state == "chunk-data":
                self._chunk_data()
            elif self.state == "chunk-end":
                if not self._chunk_end():
                    break
            elif self.state == "trailer":
                if not self._trailer():
                    break
            elif self.state == "close":
                self.on_body(self.buffer)
                self.buffer = b""
            else:  # "done"
                break
            if self.state == "done":
                rest, self.buffer = self.buffer, b""
                self.state = "head"
                self.on_done()
                return rest
        return b""

    def connection_closed(self) -> bool:
        """The peer closed; True when that completed a close-delimited response."""
        if self.state == "close":
            self.state = "head"
            self.on_done()
            return True
        return False

    def _head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 65536:
                raise ProtocolError("response head over 64 KiB")
            return False
        lines = self.buffer[:end].decode("latin-1").split("\r\n")
        self.buffer = self.buffer[end + 4 :]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.on_head(status, headers)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = "chunk-size"
        elif "content-length" in headers:
            self.remaining = int(headers["content-length"])
            self.state = "length" if self.remaining else "done"
        elif status in (204, 304) or 100 <= status < 200:
            self.state = "done"
        else:
            self.state = "close"
        return True

    def _length(self) -> None:
        piece = self.buffer[: self.remaining]
        self.buffer = self.buffer[len(piece) :]
        self.remaining -= len(piece)
        self.on_body(piece)
        if not self.remaining:
            self.state = "done"

    def _chunk_size(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        size = int(self.buffer[:end].split(b";", 1)[0], 16)
        self.buffer = self.buffer[end + 2 :]
        self.remaining = size
        self.state = "chunk-data" if size else "trailer"
        return True

    def _chunk_data(self) -> None:
        piece = self.buffer[: self.remaining]
        self.buffer = self.buffer[len(piece) :]
        self.remaining -= len(piece)
        if piece:
            self.on_body(piece)
        if not self.remaining:
            self.state = "chunk-end"

    def _chunk_end(self) -> bool:
        if len(self.buffer) < 2:
            return False
        if self.buffer[:2] != b"\r\n":
            raise ProtocolError("chunk not followed by CRLF")
        self.buffer = self.buffer[2:]
        self.state = "chunk-size"
        return True

    def _trailer(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        self.buffer = self.buffer[end + 2 :]
        if end == 0:
            self.state = "done"
        return True


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of already sorted values; None for no values."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]
