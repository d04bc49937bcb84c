"""Errors the gateway itself answers, in the dialect of the client that asked."""

from __future__ import annotations

import json

from ollamaflow.server.interfaces import ClientRequest

#: How much of a client's string an error message quotes back.
QUOTED = 200


def quoted(value: str) -> str:
    """A client's string quoted in a message: in quotes, cut to :data:`QUOTED` characters."""
    if len(value) <= QUOTED:
        return f"'{value}'"
    return f"'{value[:QUOTED]}...' ({len(value)} characters)"


def openai_error_type(status: int) -> str:
    """The ``type`` of an OpenAI-style error, as Ollama's OpenAI layer names them (and a
    rate-limit type for 429, which Ollama never answers)."""
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "api_error"


def error_body(path: bytes, status: int, message: str) -> bytes:
    """OpenAI's error shape under ``/v1/``, Ollama's ``{"error": ...}`` everywhere else."""
    if path.startswith(b"/v1/"):
        kind = openai_error_type(status)
        return json.dumps(
            {"error": {"message": message, "type": kind, "param": None, "code": None}}
        ).encode()
    return json.dumps({"error": message}).encode()


def refuse(
    request: ClientRequest, status: int, message: str, *, retry_after: int | None = None
) -> bytes:
    """Set the status and headers of a gateway error on ``request`` and return its body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    if retry_after is not None:
        request.setHeader(b"Retry-After", b"%d" % retry_after)
    return error_body(request.path, status, message)


def finish_json(request: ClientRequest, status: int, document: object) -> None:
    """Answer ``document`` as JSON with ``status`` and finish the request."""
    body = json.dumps(document).encode()
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()
