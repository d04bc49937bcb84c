"""What one proxied request came to: the record the access log and the metrics are made from."""

from __future__ import annotations

import json

import attrs

#: How much of a completion's response is kept to read its usage from the final message.
TAIL_BYTES = 4096
#: How much of a body is kept when a frontend or backend asks for bodies to be logged.
LOGGED_BODY_BYTES = 65536


@attrs.frozen
class Completed:
    """One client request, from arrival to its last byte (or its abort)."""

    request_id: str
    client: str
    frontend: str
    backend: str | None
    method: str
    path: str
    model: str | None
    status: int
    #: ok (complete), aborted (the backend broke off), client_gone, or refused (answered by
    #: the gateway itself: no candidate, queue full, timeout...).
    outcome: str
    bytes: int
    queued: float
    ttfb: float | None
    duration: float
    retries: int
    eval_count: int | None = None
    eval_duration_ns: int | None = None
    request_body: str | None = None
    response_body: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        if not self.eval_count or not self.eval_duration_ns:
            return None
        return self.eval_count / (self.eval_duration_ns / 1e9)


def usage(tail: bytes) -> tuple[int | None, int | None]:
    """Tokens generated and their duration (ns) from the end of a completion's response.

    Ollama's final message carries ``eval_count``/``eval_duration``; OpenAI-style answers carry
    ``usage.completion_tokens`` (no duration). Only the last line or SSE event is parsed.
    """
    if b"eval_count" not in tail and b"completion_tokens" not in tail:
        return None, None
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if not line.startswith(b"{"):
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        if "eval_count" in message:
            count, duration = message.get("eval_count"), message.get("eval_duration")
            return (
                count if isinstance(count, int) else None,
                duration if isinstance(duration, int) else None,
            )
        used = message.get("usage")
        if isinstance(used, dict) and isinstance(used.get("completion_tokens"), int):
            return used["completion_tokens"], None
    return None, None
