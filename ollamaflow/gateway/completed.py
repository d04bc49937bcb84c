"""What one proxied request came to: the record the access log and the metrics are made from."""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import attrs

#: How much of a completion's response is kept to read its usage from the final message.
TAIL_BYTES = 4096
#: How much of a body is kept when a frontend or backend asks for bodies to be logged (and of
#: a request head, for ``LogRequestFull``: ``requesthead.LOGGED_HEAD_BYTES``); a marker says
#: how many bytes more there were.
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
    #: Prompt tokens the backend reported (Ollama ``prompt_eval_count``, OpenAI
    #: ``usage.prompt_tokens``).
    prompt_eval_count: int | None = None
    #: The API key the request was made with (its Identifier), ``admin`` for an admin token,
    #: ``anonymous`` for none.
    api_key: str = "anonymous"
    request_body: str | None = None
    response_body: str | None = None
    #: The client's request line and header fields, credentials redacted (``LogRequestFull``).
    request_head: str | None = None
    #: The backends a request answered for the whole frontend reached (a fan-out, or the
    #: catalog answered from their inventories); ``backend`` is None then.
    backends: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        """An error status, or not answered in full: what usage and metrics count as errors."""
        return self.status >= 400 or self.outcome != "ok"

    @property
    def tokens_per_second(self) -> float | None:
        if not self.eval_count or not self.eval_duration_ns:
            return None
        return self.eval_count / (self.eval_duration_ns / 1e9)


def logged_text(kept: bytes, total: int, encoding: str = "utf-8") -> str:
    """What the access log shows of a body (or head) of ``total`` bytes of which the first
    were ``kept``: decoded (bad bytes replaced), then a marker if the rest was left out."""
    text = kept.decode(encoding, "replace")
    if total > len(kept):
        text += f"...[{total - len(kept)} more bytes]"
    return text


_EVAL_COUNT = re.compile(rb'"eval_count"\s*:\s*(\d+)')
_EVAL_DURATION = re.compile(rb'"eval_duration"\s*:\s*(\d+)')
_PROMPT_EVAL_COUNT = re.compile(rb'"prompt_eval_count"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')


def _last(pattern: re.Pattern[bytes], text: bytes) -> int | None:
    found = pattern.findall(text)
    return int(found[-1]) if found else None


class Usage(NamedTuple):
    """What a backend reported using for one request."""

    completion_tokens: int | None
    duration_ns: int | None
    prompt_tokens: int | None


def usage(tail: bytes) -> Usage:
    """Tokens generated, their duration (ns) and prompt tokens, from the end of a response.

    Ollama's final message carries ``eval_count``/``eval_duration``/``prompt_eval_count``;
    OpenAI-style answers carry ``usage.completion_tokens``/``prompt_tokens`` (no duration).
    The numbers are picked out of the last bytes with a pattern: parsing the JSON of every
    answer would cost more than the rest of the bookkeeping together.
    """
    prompt = _last(_PROMPT_EVAL_COUNT, tail)
    count = _last(_EVAL_COUNT, tail)
    if count is not None or prompt is not None:
        return Usage(count, _last(_EVAL_DURATION, tail), prompt)
    return Usage(_last(_COMPLETION_TOKENS, tail), None, _last(_PROMPT_TOKENS, tail))


class RequestIds:
    """Random UUIDs (version 4) as strings, from one ``urandom`` call per 256 of them: a UUID
    object and a system call per request would cost more than routing it."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(16 * 256), 0
        self._at = at + 16
        h = self._pool[at : at + 16].hex()
        variant = "89ab"[int(h[16], 16) & 3]
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"
