"""Header handling at the proxy boundary: hop-by-hop fields stripped both ways (RFC 9110
§7.6.1), forwarding fields added, the backend's own credentials applied.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers
from twisted.web.server import Request

from ollamaflow.records import Backend

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Never copied to the backend: the agent writes its own Host and Content-Length.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length"}
_NOT_RETURNED = HOP_BY_HOP | {b"content-length"}


def _connection_named(headers: Headers) -> set[bytes]:
    named: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", ()):
        named.update(token.strip().lower() for token in value.split(b","))
    return named


def _copy(source: Headers, drop: frozenset[bytes] | set[bytes]) -> Headers:
    if source.hasHeader(b"connection"):
        drop = drop | _connection_named(source)
    out = Headers()
    for name, values in source.getAllRawHeaders():
        if name.lower() not in drop:
            out.setRawHeaders(name, list(values))
    return out


def to_backend(
    client: Headers, backend: Backend, *, client_ip: str, host: bytes | None, proto: bytes
) -> Headers:
    """The headers a backend sees: the client's, minus hop-by-hop, plus X-Forwarded-*."""
    out = _copy(client, _NOT_FORWARDED)
    previous = client.getRawHeaders(b"x-forwarded-for")
    forwarded_for = client_ip.encode()
    if previous:
        forwarded_for = b", ".join([*previous, forwarded_for])
    out.setRawHeaders(b"X-Forwarded-For", [forwarded_for])
    if host is not None:
        out.setRawHeaders(b"X-Forwarded-Host", [host])
    out.setRawHeaders(b"X-Forwarded-Proto", [proto])
    if backend.bearer_token:
        out.setRawHeaders(b"Authorization", [b"Bearer " + backend.bearer_token.encode()])
    for name, value in backend.headers.items():
        out.setRawHeaders(name.encode(), [value.encode()])
    return out


def forwarded(request: Request, backend: Backend) -> Headers:
    """The headers a backend sees for a client request, its own ``Host`` included."""
    out = to_backend(
        request.requestHeaders,
        backend,
        client_ip=str(request.getClientAddress().host),
        host=request.getHeader(b"host"),
        proto=b"https" if request.isSecure() else b"http",
    )
    out.setRawHeaders(b"Host", [host_header(backend)])
    return out


def to_client(backend_headers: Headers, response_headers: Headers) -> None:
    """Copy a backend's response headers onto the client's response, minus hop-by-hop."""
    for name, values in _copy(backend_headers, _NOT_RETURNED).getAllRawHeaders():
        response_headers.setRawHeaders(name, list(values))


def host_header(backend: Backend) -> bytes:
    """The ``Host`` a backend expects: its own host and port (Ollama refuses foreign ones)."""
    host = f"[{backend.hostname}]" if ":" in backend.hostname else backend.hostname
    return f"{host}:{backend.port}".encode("idna")
