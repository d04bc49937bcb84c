"""Wire formats shared by the routes: JSON bodies, NDJSON lines, SSE events and HTTP errors."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request

JSON = b"application/json; charset=utf-8"
NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"
TEXT = b"text/plain; charset=utf-8"
SSE_DONE = b"data: [DONE]\n\n"

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8, as Go's encoder writes it."""
    return _encode(obj).encode()


def line(obj: Any) -> bytes:
    """One NDJSON message."""
    return _encode(obj).encode() + b"\n"


def event(obj: Any) -> bytes:
    """One SSE `data:` event."""
    return b"data: " + _encode(obj).encode() + b"\n\n"


def json_response(request: Request, obj: Any, status: int = 200) -> bytes:
    """Set status and JSON content type; return the body for `render` (Twisted adds the length)."""
    if status != 200:
        request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return dumps(obj)


def empty_response(request: Request) -> bytes:
    """A 200 with an empty body and no content type, as delete and copy answer."""
    request.defaultContentType = None
    return b""


class HTTPError(Exception):
    """An error answer; the route's flavour decides its JSON shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def native_error(message: str) -> dict[str, Any]:
    """Ollama's error shape."""
    return {"error": message}


def openai_error(status: int, message: str) -> dict[str, Any]:
    """Ollama's OpenAI-compatible error shape."""
    if status == 400:
        kind = "invalid_request_error"
    elif status == 404:
        kind = "not_found_error"
    else:
        kind = "api_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def model_not_found(name: str) -> HTTPError:
    """The 404 clients rely on to decide to pull."""
    return HTTPError(404, f"model '{name}' not found")
