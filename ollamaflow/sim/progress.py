"""Progress streams as Ollama's pull, push and create send them.

A model operation is a generator of steps: a `float` pauses, a dict is one progress object and a
`Failed` ends it. Ollama streams progress as NDJSON unless told `"stream": false`; an error before
any progress is an ordinary JSON error with its status, after some it is one more line (the
status stays 200). Without streaming only the last object is sent, or the error with its status
(500 unless the error carries another).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import attrs
from twisted.web.server import Request

from ollamaflow.sim.emitter import Script
from ollamaflow.sim.responses import JSON, dumps, line


@attrs.frozen
class Failed:
    """The error that ends a model operation, and the status it has when nothing was sent."""

    message: str
    status: int = 500


Step = float | dict[str, Any] | Failed
Steps = Generator[Step, None, object]
"""Progress steps; a generator may also return what it made."""


def stream_progress(request: Request, steps: Steps) -> Script:
    """Every progress object as a line; a failure as Ollama's streamResponse reports it."""
    started = False
    for step in steps:
        if isinstance(step, Failed):
            if started:
                yield line({"error": step.message})
            else:
                request.setResponseCode(step.status)
                request.setHeader(b"content-type", JSON)
                yield dumps({"error": step.message})
            return
        if isinstance(step, dict):
            started = True
            yield line(step)
        else:
            yield step


def last_progress(request: Request, steps: Steps) -> Script:
    """`stream: false`: the last progress object, or the failure with its status."""
    last: dict[str, Any] = {}
    for step in steps:
        if isinstance(step, Failed):
            request.setResponseCode(step.status)
            yield dumps({"error": step.message})
            return
        if isinstance(step, dict):
            last = step
        else:
            yield step
    yield dumps(last)


def paced(
    seconds: float, tick: float, status: str, digest: str, total: int
) -> Generator[float | dict[str, Any], None, None]:
    """Progress of `total` bytes over `seconds`, a line about every `tick` (Ollama: 60 ms),
    `completed` left out while it is 0 as Ollama's omitempty does."""
    ticks = 1
    if seconds > 0 and tick > 0:
        ticks = max(1, round(seconds / tick))
    yield {"status": status, "digest": digest, "total": total}
    for n in range(1, ticks + 1):
        if seconds > 0:
            yield seconds / ticks
        completed = total * n // ticks
        message: dict[str, Any] = {"status": status, "digest": digest, "total": total}
        if completed:
            message["completed"] = completed
        yield message
