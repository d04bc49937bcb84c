"""What llhttp leaves to its user, shared by both directions: the limits on a message head,
and the error a message that breaks a rule is answered with.

llhttp checks the syntax strictly (line endings, tokens, field values, chunk framing,
Content-Length against Transfer-Encoding); it does not bound how large a head may grow, nor
judge what a target or a ``Host`` means. Those are here.
"""

from __future__ import annotations

import re

#: Start line plus header fields of one message; larger is refused (431 for a request).
MAX_HEAD = 64 * 1024
#: Header fields in one message head.
MAX_FIELDS = 256


class BadMessage(Exception):
    """A message that cannot be served: ``status`` is the answer a client gets (400, 413, 431,
    501, 505); a backend's broken response is reported with the same class."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


#: Fields that describe one connection, not the message (RFC 9110 7.6.1): never passed on by a
#: proxy, either way, and neither are the fields a ``Connection`` field names.
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
#: A field name (RFC 9110 5.6.2).
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lower-cased tokens of a ``Connection`` field value (``close``, ``keep-alive``, or the
    names of hop-by-hop fields)."""
    return frozenset(t for t in (p.strip(b" \t").lower() for p in value.split(b",")) if t)


#: ``Host`` and an absolute-form authority: a DNS name or IPv4 address (reg-name characters), or
#: a bracketed IPv6 literal, then an optional port. No userinfo, whitespace or control bytes.
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+(?:%25[0-9A-Za-z._~-]+)?\]|[0-9A-Za-z._~!$&'()*+,;=%-]+)(?::[0-9]*)?\Z"
)
#: Origin-form: an absolute path of visible ASCII, then an optional query.
_ORIGIN = re.compile(rb"/[\x21-\x7e]*\Z")
#: Absolute-form for http and https: the authority, then the path and query (both optional).
_ABSOLUTE = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?#]*)([/?][\x21-\x7e]*)?\Z")


def valid_host(value: bytes) -> bool:
    """Whether a ``Host`` field value is ``host[:port]`` (empty is allowed: RFC 9112 3.2)."""
    return not value or _HOST.match(value) is not None


def split_target(target: bytes) -> tuple[bytes, bytes | None]:
    """A request target as its origin form and the authority it names, if any: ``/path?query``
    as it is, else as :func:`absolute_target`."""
    if _ORIGIN.match(target) is not None:
        return target, None
    return absolute_target(target)


def absolute_target(target: bytes) -> tuple[bytes, bytes]:
    """An absolute-form target ``http(s)://authority/path?query`` as ``/path?query`` (``/`` when
    the path is empty) and its authority. Any other form (``*``, authority-form, a relative
    path, another scheme, userinfo, an invalid host) raises :class:`BadMessage` 400."""
    absolute = _ABSOLUTE.match(target)
    if absolute is None or not absolute.group(1) or not valid_host(absolute.group(1)):
        raise BadMessage(400, "invalid request target")
    rest = absolute.group(2) or b"/"
    return (b"/" + rest if rest[:1] == b"?" else rest), absolute.group(1)
