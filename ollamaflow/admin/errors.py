"""Admin API errors: always JSON ``{"Error", "Message", "StatusCode", "Description"}``."""

from __future__ import annotations

import json

from twisted.web.iweb import IRequest

_KINDS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Your request was invalid."),
    401: ("AuthenticationFailed", "Your authentication material was not accepted."),
    404: ("NotFound", "The requested object was not found."),
    405: ("MethodNotAllowed", "The method is not allowed on this resource."),
    409: ("Conflict", "The operation conflicts with an existing object."),
    413: ("TooLarge", "The request body is too large."),
    429: ("SlowDown", "Too many requests; slow down."),
    500: ("InternalError", "An internal error was encountered."),
    502: ("BadGateway", "An upstream server failed."),
    503: ("Unavailable", "The service is temporarily unavailable."),
}


class ApiError(Exception):
    """An error answer of the admin API; ``description`` is the detail for the operator."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


def error_body(status: int, description: str) -> bytes:
    kind, message = _KINDS.get(status, ("Error", "The request failed."))
    payload = {"Error": kind, "Message": message, "StatusCode": status, "Description": description}
    return json.dumps(payload).encode()


def write_error(request: IRequest, status: int, description: str) -> bytes:
    """Set the status and JSON headers on ``request`` and return the error body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return error_body(status, description)
