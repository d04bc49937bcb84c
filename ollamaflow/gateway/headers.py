"""Header handling at the proxy boundary: hop-by-hop fields stripped both ways (RFC 9110
§7.6.1), forwarding fields added, the backend's own credentials applied.
"""

from __future__ import annotations

import functools

from twisted.web.http_headers import Headers

from ollamaflow.apikeys import is_api_key
from ollamaflow.credentials import Tokens
from ollamaflow.http1.rules import HOP_BY_HOP, connection_tokens
from ollamaflow.records import Backend
from ollamaflow.server.interfaces import ClientRequest

#: Never copied to the backend: the agent writes its own Host and Content-Length.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length"}


Fields = list[tuple[bytes, bytes]]


def _clean(value: str) -> bytes:
    """An operator's header value, with line breaks that would end the field made spaces."""
    return value.encode().replace(b"\r", b" ").replace(b"\n", b" ")


def to_backend(
    client: Fields,
    backend: Backend,
    *,
    client_ip: str,
    host: bytes | None,
    proto: bytes,
    connection: bytes | None = None,
    withheld: Tokens | None = None,
) -> Fields:
    """The header fields a backend sees: the client's (as parsed, in order), minus hop-by-hop,
    plus X-Forwarded-*. ``connection``: the client's Connection fields, if already known;
    ``withheld``: tokens of ours (admin, metrics) whose ``Authorization`` is never passed on,
    as an API key of ours never is."""
    drop: frozenset[bytes] | set[bytes] = _NOT_FORWARDED
    if connection is None:
        connection = b",".join(v for n, v in client if n.lower() == b"connection")
    if connection:
        drop = drop | connection_tokens(connection)
    out: Fields = []
    previous: list[bytes] = []
    for name, value in client:
        lower = name.lower()
        if lower == b"x-forwarded-for":
            previous.append(value)
        elif lower == b"authorization" and (
            is_api_key(value) or (withheld and withheld.match(value))
        ):
            continue
        elif lower not in drop and not (
            lower == b"x-forwarded-proto" or (host is not None and lower == b"x-forwarded-host")
        ):
            out.append((name, value))
    forwarded_for = b", ".join([*previous, client_ip.encode()])
    out.append((b"X-Forwarded-For", forwarded_for))
    if host is not None:
        out.append((b"X-Forwarded-Host", host))
    out.append((b"X-Forwarded-Proto", proto))
    if backend.bearer_token or backend.headers:
        replaced = {name.lower().encode() for name in backend.headers}
        if backend.bearer_token:
            replaced.add(b"authorization")
        out = [(n, v) for n, v in out if n.lower() not in replaced]
    if backend.bearer_token:
        out.append((b"Authorization", b"Bearer " + _clean(backend.bearer_token)))
    for field, text in backend.headers.items():
        out.append((field.encode(), _clean(text)))
    return out


def forwarded(request: ClientRequest, backend: Backend, withheld: Tokens | None = None) -> Fields:
    """The header fields a backend sees for a client request, its own ``Host`` included."""
    out = to_backend(
        request.headers,
        backend,
        client_ip=request.client_host,
        host=request.header(b"host"),
        proto=b"https" if request.secure else b"http",
        connection=request.header(b"connection") or b"",
        withheld=withheld,
    )
    out.append((b"Host", host_header(backend)))
    return out


def as_headers(fields: Fields) -> Headers:
    """The same fields as a twisted.web ``Headers`` (for treq)."""
    headers = Headers()
    for name, value in fields:
        headers.addRawHeader(name, value)
    return headers


def to_client(backend_headers: Headers, request: ClientRequest) -> None:
    """Copy a backend's response header fields onto the client's response. The backend client
    has already dropped hop-by-hop fields and those the response's ``Connection`` names."""
    for name, values in backend_headers.getAllRawHeaders():
        for value in values:
            request.addHeader(name, value)


def host_header(backend: Backend) -> bytes:
    """The ``Host`` a backend expects: its own host and port (Ollama refuses foreign ones)."""
    return _host_header(backend.hostname, backend.port)


@functools.lru_cache(maxsize=4096)
def _host_header(hostname: str, port: int) -> bytes:
    if ":" in hostname:  # an IPv6 address
        return b"[%s]:%d" % (hostname.encode("ascii"), port)
    host = hostname.encode("ascii") if hostname.isascii() else hostname.encode("idna")
    return b"%s:%d" % (host, port)
