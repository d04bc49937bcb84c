"""The admin API's one Klein app, which every route module registers on, and the JSON in and out
that its routes share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TypeVar

from klein import Klein
from twisted.web.iweb import IRequest

from ollamaflow.admin.errors import ApiError
from ollamaflow.fielderrors import FieldError
from ollamaflow.jsonlimits import InvalidJson, loads_for_fields
from ollamaflow.records import ApiKey, Backend, Frontend, parse_record

#: Every ``/v1.0/`` route, whichever module declares it (see :class:`AdminApi`).
routes = Klein()

#: Unknown keys named in one answer; the rest are counted.
_UNKNOWN_NAMED = 10


def answer(request: IRequest, data: object, status: int = 200) -> bytes:
    """``data`` as the JSON body of a ``status`` answer."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(data).encode()


def read_json(request: IRequest) -> object:
    """The body as JSON, with the numbers the fields judge kept as written (NaN, Infinity,
    huge integers) so that the error names the field; 400 if it is not JSON in UTF-8 or
    nests deeper than the limit."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        raise ApiError(400, "the request has no body; a JSON object is expected")
    try:
        return loads_for_fields(raw)
    except InvalidJson as e:
        raise ApiError(400, str(e)) from e


def unknown_fields(unknown: list[str]) -> str:
    """The 400's description for keys no field answers to."""
    named = ", ".join(unknown[:_UNKNOWN_NAMED])
    more = len(unknown) - _UNKNOWN_NAMED
    tail = f" and {more} more" if more > 0 else ""
    return f"unknown field{'s' if len(unknown) > 1 else ''}: {named}{tail}"


R = TypeVar("R", Frontend, Backend, ApiKey)


def parsed(cls: type[R], data: object, identifier: str | None = None) -> R:
    """An admin-supplied record, every field checked: a 400 naming the field or the unknown
    keys. ``identifier`` (the URL's, or one generated) wins over the body's."""
    if identifier is not None and isinstance(data, dict):
        data = {k: v for k, v in data.items() if k.lower() != "identifier"}
        data["Identifier"] = identifier
    try:
        record, unknown = parse_record(cls, data)
    except FieldError as e:
        raise ApiError(400, str(e)) from e
    if unknown:
        raise ApiError(400, unknown_fields(unknown))
    return record


def query_values(request: IRequest, name: bytes) -> Sequence[bytes]:
    """Every value of query parameter ``name``, in order (none when absent)."""
    values: Sequence[bytes] = (request.args or {}).get(name, [])
    return values
