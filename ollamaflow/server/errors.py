"""The error responses the server writes itself, before any handler answers a request."""

from __future__ import annotations

from twisted.web.http import RESPONSES

from ollamaflow.http1.rules import BadMessage, split_target
from ollamaflow.server.target import PathError, normalize_target


def error_response(status: int, body: bytes, date: bytes, fields: bytes = b"") -> bytes:
    """A whole JSON error response that ends the connection (``fields``: more, each ending
    in CRLF)."""
    return (
        b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%sConnection: close\r\n\r\n%s"
        % (status, RESPONSES.get(status, b"Error"), date, len(body), fields, body)
    )


def error_path(target: bytes) -> bytes:
    """The path whose dialect an error about a request is in, from its target as received:
    normalised if it can be, else as sent (``//v1.0/...`` is still the admin API's)."""
    try:
        origin = split_target(target)[0]
    except BadMessage:
        return b"/"
    try:
        return normalize_target(origin)[1]
    except PathError:
        return b"/" + origin.partition(b"?")[0].lstrip(b"/")
