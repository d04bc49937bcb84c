"""A finished request's record (:class:`Completed`) for observer tests: a small chat answered
by ``gpu1`` for ``frontend1``, any field replaced by keyword."""

from __future__ import annotations

from typing import Any

from ollamaflow.gateway.completed import Completed


def completed(**kw: Any) -> Completed:
    fields: dict[str, Any] = {
        "request_id": "r1",
        "client": "10.0.0.7",
        "frontend": "frontend1",
        "backend": "gpu1",
        "method": "POST",
        "path": "/api/chat",
        "model": "llama3:latest",
        "status": 200,
        "outcome": "ok",
        "bytes": 1234,
        "queued": 0.0,
        "ttfb": 0.0421,
        "duration": 1.5,
        "retries": 0,
        **kw,
    }
    return Completed(**fields)
