"""The request path every layer after the parser sees: percent-decoded and normalised.

Ollama (Go, gin) routes on the fully decoded path, so ``/api/%63hat`` is its chat and
``/api%2Fchat`` too. Routing to the admin API, the gateway's per-path policy and what it
forwards must therefore see the path Ollama will act on, not the bytes the client chose: decode
every escape, merge repeated slashes, remove dot segments (RFC 3986 5.2.4), then re-encode what a
path segment cannot hold literally, so the result is a valid origin-form path again. Pure
functions of bytes, without the reactor.
"""

from __future__ import annotations

import re
from urllib.parse import quote_from_bytes, unquote_to_bytes

#: A ``%`` not followed by two hex digits.
_MALFORMED = re.compile(rb"%(?![0-9A-Fa-f]{2})")
#: C0 controls and DEL.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
#: Kept literally besides the unreserved characters (which ``quote`` always keeps): the
#: separator, sub-delims, ``:`` and ``@`` (RFC 3986 3.3, pchar).
_SAFE = "/!$&'()*+,;=:@"
_DOTS = (b".", b"..")
#: A path segment's characters as the parser lets them through (visible ASCII) less "%", "/"
#: and "?"; its first character not "." either.
_FIRST = rb"[\x21-\x24\x26-\x2d\x30-\x3e\x40-\x7e]"
_REST = rb"[\x21-\x24\x26-\x2e\x30-\x3e\x40-\x7e]*+"

#: An origin-form target of visible ASCII whose path holds no ``%``, ``//`` or ``/.``, so that
#: :func:`normalize_target` would return it as it is: a parser that checks the target with a
#: regular expression anyway can use this one and skip the call on the common path.
PLAIN_TARGET = re.compile(
    rb"/(?:%s%s(?:/%s%s)*+/?)?(?:\?[\x21-\x7e]*+)?\Z" % (_FIRST, _REST, _FIRST, _REST)
)


class PathError(ValueError):
    """A request path that cannot be served: a malformed escape, bytes that are not UTF-8 or
    are control characters once decoded, or a ``..`` that climbs above the root."""


def normalize_target(target: bytes) -> tuple[bytes, bytes]:
    """An origin-form target (``/path?query``) as ``(uri, path)``: the normalised path, and it
    followed by the query exactly as received. Raises :class:`PathError`."""
    path, mark, query = target.partition(b"?")
    if b"%" not in path and b"//" not in path and b"/." not in path:
        return target, path
    path = _normalize(path)
    return path + mark + query, path


def _normalize(path: bytes) -> bytes:
    """The slow path: decode and check, merge slashes, remove dot segments, re-encode."""
    if b"%" in path:
        if _MALFORMED.search(path):
            raise PathError("a malformed percent-escape in the request path")
        path = unquote_to_bytes(path)
        try:
            path.decode("utf-8")
        except UnicodeDecodeError:
            raise PathError("the request path is not UTF-8 once percent-decoded") from None
        if _CONTROL.search(path):
            raise PathError("a control character in the request path")
    segments = path.split(b"/")
    kept: list[bytes] = []
    for segment in segments:
        if not segment or segment == b".":
            continue  # empty segments merge repeated slashes
        if segment == b"..":
            if not kept:
                raise PathError("the request path climbs above the root")
            kept.pop()
        else:
            kept.append(segment)
    normal = b"/" + b"/".join(kept)
    if kept and (not segments[-1] or segments[-1] in _DOTS):
        normal += b"/"  # "/a/", "/a/." and "/a/b/.." end in a slash
    return quote_from_bytes(normal, safe=_SAFE).encode("ascii")
