"""Cross-origin requests from browsers (CORS): which origins may call, and the headers that say so.

A browser sends ``Origin`` with a script's cross-origin request, asks first with an ``OPTIONS``
preflight when the request is not a simple one (JSON, ``Authorization``), and lets the script
read a response only when it names the script's origin. Client traffic is open to Ollama's own
default origins (``OLLAMA_ORIGINS``: localhost, 127.0.0.1 and 0.0.0.0 on any port, ``app://``,
``file://``, ``tauri://``, ``vscode-webview://``) plus the configured ones; the admin API to the
configured admin origins, any by default as in OllamaFlow 1.2. Credentials are bearer tokens,
never cookies, so ``Access-Control-Allow-Credentials`` is never sent and ``*`` is a valid answer.

Every ``OPTIONS`` is answered here (never forwarded, never asked for a token); an origin not
allowed is answered 403 with an empty body, as Ollama does. Plain functions of the request's
head, without the reactor; whatever the client sent is bounded before it is looked at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

#: Ollama's default origins (``envconfig.AllowedOrigins``), ``*`` standing for any characters.
OLLAMA_ORIGINS: tuple[str, ...] = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
)

#: The characters of an origin after ``scheme://``: a host (a name, an address, ``[v6]``) and
#: a port; no ``/``, ``,``, ``?``, ``#``, ``@`` or space.
_AUTHORITY = r"[A-Za-z0-9._~%!$&'()*+;=:\[\]-]*"
#: An entry of an origin list in the settings: ``*`` (any origin), ``null`` (what a browser
#: sends from a sandboxed or ``file:`` page), or ``scheme://host[:port]`` where ``*`` matches
#: any characters; no path, not even ``/``, since an Origin never has one.
ORIGIN_ENTRY = r"\*|null|[A-Za-z*][A-Za-z0-9+.*-]*://" + _AUTHORITY
#: The longest entry, and the longest ``Origin`` looked at (a host name is 253 at most).
MAX_ORIGIN = 512
#: An ``Origin`` as browsers serialize it: ``null`` or ``scheme://host[:port]``. Anything else
#: (a list, a path, spaces) is no origin we allow.
_ORIGIN = re.compile(rb"null|[A-Za-z][A-Za-z0-9+.-]*://" + _AUTHORITY.encode())

#: Access-Control-Request-Headers: at most this many bytes and this many names.
MAX_REQUEST_HEADERS_VALUE = 4096
MAX_REQUESTED_HEADERS = 64
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")

Fields = tuple[tuple[bytes, bytes], ...]

#: What every ``OPTIONS`` answer says is served here.
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, DELETE, OPTIONS"
ALLOW: Fields = ((b"Allow", ALLOWED_METHODS),)
#: Response fields a script may read besides the safelisted ones.
EXPOSED = b"X-OllamaFlow-Request, X-OllamaFlow-Backend, Retry-After"
#: How long a browser may reuse a preflight's answer (Chromium caps it at two hours).
MAX_AGE = b"7200"


@attrs.frozen
class Glob:
    """An origin pattern where ``*`` matches any characters (none included), matched without
    regular expressions: the pieces between stars are found left to right, in linear time."""

    parts: tuple[bytes, ...]

    @classmethod
    def of(cls, entry: str) -> Glob:
        return cls(tuple(entry.lower().encode("ascii").split(b"*")))

    def match(self, origin: bytes) -> bool:
        """Whether ``origin`` (in lower case) fits."""
        parts = self.parts
        first, last = parts[0], parts[-1]
        if len(parts) == 1:
            return origin == first
        end = len(origin) - len(last)
        if end < len(first) or not origin.startswith(first) or not origin.endswith(last):
            return False
        position = len(first)
        for part in parts[1:-1]:
            found = origin.find(part, position, end)
            if found < 0:
                return False
            position = found + len(part)
        return True


@attrs.frozen
class Origins:
    """A list of allowed origins: exact ones, patterns with ``*``, or any (``*`` alone)."""

    any: bool
    exact: frozenset[bytes]
    globs: tuple[Glob, ...]

    @classmethod
    def of(cls, entries: Iterable[str]) -> Origins:
        """From settings entries (already checked against :data:`ORIGIN_ENTRY`)."""
        entries = list(entries)
        exact = frozenset(e.lower().encode("ascii") for e in entries if "*" not in e)
        globs = tuple(Glob.of(e) for e in entries if "*" in e and e != "*")
        return cls("*" in entries, exact, globs)

    def allow_origin(self, origin: bytes) -> bytes | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``: ``*`` when any origin is
        allowed, the origin itself when it is in the list; None when it is not allowed."""
        if self.any:
            return b"*"
        if len(origin) > MAX_ORIGIN or not _ORIGIN.fullmatch(origin):
            return None
        lower = origin.lower()
        if lower in self.exact or any(glob.match(lower) for glob in self.globs):
            return origin
        return None


def same_origin(origin: bytes, host: bytes | None, secure: bool) -> bool:
    """Whether ``origin`` is the server's own (a page it served): not a cross-origin request."""
    if host is None:
        return False
    return origin.lower() == (b"https://" if secure else b"http://") + host.lower()


@attrs.frozen
class Decision:
    """What the listener does with a request: answer it now with ``status`` (an empty body,
    or an error saying ``error``), or serve it (``status`` None); ``fields`` go on the
    response either way."""

    fields: Fields = ()
    status: int | None = None
    error: str = ""


#: Nothing to do: a request without ``Origin``, or from the server's own.
SERVE = Decision()
#: An ``OPTIONS`` that is no preflight (HAProxy's health check, a curl): what is served here.
OPTIONS_ANSWER = Decision(ALLOW, 200)


def _varies(allow: bytes, *fields: bytes) -> Fields:
    """``Vary`` for an answer that depends on the request's ``Origin`` (and ``fields``)."""
    if allow == b"*" and not fields:
        return ()
    names = ([] if allow == b"*" else [b"Origin"]) + list(fields)
    return ((b"Vary", b", ".join(names)),)


def response_fields(allow: bytes) -> Fields:
    """The fields of an actual response to an allowed cross-origin request."""
    return (
        (b"Access-Control-Allow-Origin", allow),
        (b"Access-Control-Expose-Headers", EXPOSED),
        *_varies(allow),
    )


def requested_headers(value: bytes | None) -> bytes | str:
    """The ``Access-Control-Request-Headers`` names as an ``Allow-Headers`` value (lower case,
    ``, ``-separated; empty for none); a str says why the value is refused."""
    if value is None:
        return b""
    if len(value) > MAX_REQUEST_HEADERS_VALUE:
        return f"Access-Control-Request-Headers is longer than {MAX_REQUEST_HEADERS_VALUE} bytes"
    names = [name.strip(b" \t").lower() for name in value.split(b",")]
    names = [name for name in names if name]
    if len(names) > MAX_REQUESTED_HEADERS:
        return f"Access-Control-Request-Headers names more than {MAX_REQUESTED_HEADERS} fields"
    if not all(_TOKEN.fullmatch(name) for name in names):
        return "Access-Control-Request-Headers is not a list of header field names"
    return b", ".join(names)


def preflight(allow: bytes, method: bytes, headers: bytes | None, private: bool) -> Decision:
    """The answer to an allowed origin's preflight: the methods, the request's own header
    names echoed back, and for how long the browser may keep it; ``private``: Chrome asks
    whether a page may reach a private network, and it may, its origin being allowed."""
    if not _METHOD.fullmatch(method):
        return Decision(status=400, error="Access-Control-Request-Method is not a method name")
    echoed = requested_headers(headers)
    if isinstance(echoed, str):
        return Decision(status=400, error=echoed)
    fields: list[tuple[bytes, bytes]] = [
        *ALLOW,
        (b"Access-Control-Allow-Origin", allow),
        (b"Access-Control-Allow-Methods", ALLOWED_METHODS),
    ]
    if echoed:
        fields.append((b"Access-Control-Allow-Headers", echoed))
    if private:
        fields.append((b"Access-Control-Allow-Private-Network", b"true"))
    fields.append((b"Access-Control-Max-Age", MAX_AGE))
    fields += _varies(allow, b"Access-Control-Request-Headers")
    return Decision(tuple(fields), 200)


def decide(
    origins: Origins,
    method: bytes,
    origin: bytes | None,
    fields: dict[bytes, bytes],
    secure: bool,
) -> Decision:
    """What to do with a request that has an ``Origin`` or is an ``OPTIONS``, under the
    ``origins`` of its path (the admin API's or the clients'). ``fields``: the request's header
    fields by lower-case name."""
    options = method == b"OPTIONS"
    if origin is None or same_origin(origin, fields.get(b"host"), secure):
        return OPTIONS_ANSWER if options else SERVE
    allow = origins.allow_origin(origin)
    if allow is None:
        return Decision(((b"Vary", b"Origin"),), 403)
    if not options:
        return Decision(response_fields(allow))
    method_asked = fields.get(b"access-control-request-method")
    if method_asked is None:  # a cross-origin OPTIONS that is not a preflight
        return Decision((*ALLOW, *response_fields(allow)), 200)
    private = fields.get(b"access-control-request-private-network", b"").lower() == b"true"
    return preflight(allow, method_asked, fields.get(b"access-control-request-headers"), private)


@attrs.frozen
class Policy:
    """The origins allowed for client traffic and for the admin API (``Cors`` settings)."""

    client: Origins
    admin: Origins

    @classmethod
    def of(cls, allowed: Iterable[str] = (), admin: Iterable[str] = ("*",)) -> Policy:
        """Ollama's default origins plus ``allowed`` for clients; ``admin`` for the admin API."""
        return cls(Origins.of((*OLLAMA_ORIGINS, *allowed)), Origins.of(admin))


#: The defaults: Ollama's origins for client traffic, any origin for the admin API.
DEFAULT_POLICY = Policy.of()
