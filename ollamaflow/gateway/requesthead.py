"""``LogRequestFull``: the client's request head (method, target, header fields) for the access
log, with credentials redacted and cut at :data:`LOGGED_HEAD_BYTES`.

Redacted (the value replaced by ``[redacted]``, an ``Authorization`` scheme kept):

- a header field or query parameter whose name looks like a credential (:func:`secret_name`:
  ``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``X-Api-Key``, ``Api-Key``, and any
  name holding ``auth``, ``cookie``, ``token``, ``secret``, ``password``, ``api-key``,
  ``apikey`` or ``api_key``, or named ``key``);
- any value holding one of the secrets we know (:func:`known_secrets`): the admin and metrics
  tokens, every backend's ``BearerToken``, and the values of backends' ``Headers`` and
  ``Querystring`` parameters whose names look like credentials.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ollamaflow.credentials import Tokens
from ollamaflow.gateway.completed import LOGGED_BODY_BYTES, logged_text
from ollamaflow.records import Backend, Frontend
from ollamaflow.server.interfaces import ClientRequest

#: The most of a request head the access log keeps: the bodies' bound. (The HTTP parser takes
#: heads of 64 KiB at most already; this bound holds whatever it takes.)
LOGGED_HEAD_BYTES = LOGGED_BODY_BYTES
REDACTED = b"[redacted]"
_WORDS = (b"auth", b"cookie", b"token", b"secret", b"password", b"api-key", b"apikey", b"api_key")
_SCHEMES = frozenset({b"bearer", b"basic", b"digest", b"token", b"apikey", b"negotiate"})

Fields = Iterable[tuple[bytes, bytes]]


def secret_name(name: bytes) -> bool:
    """Whether a header field or query parameter of this name carries a credential."""
    lower = name.lower()
    return lower == b"key" or any(word in lower for word in _WORDS)


def known_secrets(withheld: Tokens, backends: Iterable[Backend]) -> tuple[bytes, ...]:
    """Values that must never reach a log: our tokens, and the backends' credentials."""
    found = list(withheld.values)
    for backend in backends:
        if backend.bearer_token:
            found.append(backend.bearer_token.encode())
        found.extend(v.encode() for n, v in backend.headers.items() if secret_name(n.encode()))
        for parameter in (backend.querystring or "").split("&"):
            name, _, value = parameter.partition("=")
            if value and secret_name(name.encode()):
                found.append(value.encode())
    return tuple(s for s in found if s)


def _redacted(value: bytes) -> bytes:
    """``value`` hidden, its authentication scheme (``Bearer``...) kept when it has one."""
    scheme, space, _ = value.strip().partition(b" ")
    if space and scheme.lower() in _SCHEMES:
        return scheme + b" " + REDACTED
    return REDACTED


def _holds(value: bytes, secrets: tuple[bytes, ...]) -> bool:
    return any(secret in value for secret in secrets)


def redacted_target(target: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """The request target with the values of credential-like query parameters hidden."""
    path, mark, query = target.partition(b"?")
    if not mark:
        return REDACTED if _holds(target, secrets) else target
    parameters = []
    for parameter in query.split(b"&"):
        name, equals, _ = parameter.partition(b"=")
        if secret_name(name) or _holds(parameter, secrets):
            parameter = name + b"=" + REDACTED if equals else REDACTED
        parameters.append(parameter)
    if _holds(path, secrets):
        path = REDACTED
    return path + b"?" + b"&".join(parameters)


def request_head(
    method: bytes, target: bytes, version: bytes, fields: Fields, secrets: tuple[bytes, ...]
) -> str:
    """The head as HTTP/1.1 writes it, a line per field joined by ``\\n``, credentials
    redacted, at most :data:`LOGGED_HEAD_BYTES` bytes (then a marker of how many more)."""
    lines = [b"%s %s %s" % (method, redacted_target(target, secrets), version)]
    for name, value in fields:
        if secret_name(name) or _holds(value, secrets):
            value = _redacted(value)
        lines.append(name + b": " + value)
    head = b"\n".join(lines)
    return logged_text(head[:LOGGED_HEAD_BYTES], len(head), "latin-1")


def logged_head(
    request: ClientRequest,
    frontend: Frontend | None,
    tried: Iterable[str],
    withheld: Tokens,
    backends: Mapping[str, Backend],
) -> str | None:
    """The client's request head for the access log when ``frontend`` or a backend ``tried``
    (identifiers, looked up in ``backends``: the catalog's) sets ``LogRequestFull``; else None.
    """
    asked = frontend is not None and frontend.log_request_full
    if not asked:
        for identifier in tried:
            backend = backends.get(identifier)
            if backend is not None and backend.log_request_full:
                asked = True
                break
    if not asked:
        return None
    secrets = known_secrets(withheld, backends.values())
    return request_head(request.method, request.uri, request.clientproto, request.headers, secrets)
