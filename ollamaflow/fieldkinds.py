"""The kinds of a record's fields: how each value is checked on the way in (bounded, and
refused with a :class:`~ollamaflow.fielderrors.FieldError` naming what was allowed) and written
on the way out. :mod:`ollamaflow.jsonfields` puts them to work on whole records."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol

import attrs

from ollamaflow.fielderrors import CONTROLS, FieldError, key_text, valid_text
from ollamaflow.jsonlimits import MAX_DEPTH
from ollamaflow.utctime import format_utc

_INT32_MAX = 2**31 - 1


class Kind(Protocol):
    """How one field's value is checked on the way in and written on the way out."""

    @property
    def allowed(self) -> str: ...

    def parse(self, value: object, path: str, unknown: list[str]) -> Any: ...

    def dump(self, value: Any) -> object: ...


@attrs.frozen
class Int:
    lo: int = 0
    hi: int = _INT32_MAX

    @property
    def allowed(self) -> str:
        return f"an integer from {self.lo} to {self.hi}"

    def parse(self, value: object, path: str, unknown: list[str]) -> int:
        number = int(value) if isinstance(value, float) and value.is_integer() else value
        if (
            not isinstance(number, int)
            or isinstance(number, bool)
            or not self.lo <= number <= self.hi
        ):
            raise FieldError(path, value, self.allowed)
        return number

    def dump(self, value: int) -> object:
        return value


@attrs.frozen
class Bool:
    allowed: str = "true or false"

    def parse(self, value: object, path: str, unknown: list[str]) -> bool:
        if not isinstance(value, bool):
            raise FieldError(path, value, self.allowed)
        return value

    def dump(self, value: bool) -> object:
        return value


@attrs.frozen
class Str:
    """A string of valid Unicode without control characters (unless ``controls``) and at most
    ``max_length`` characters; ``pattern`` (a full match) narrows it, ``strip_prefix`` is
    trimmed first."""

    allowed: str = "a non-empty string"
    pattern: str = r"(?s).+"
    max_length: int = 4096
    strip_prefix: str = ""
    #: Whether C0, DEL and C1 control characters may appear (free text, a password).
    controls: bool = False

    def parse(self, value: object, path: str, unknown: list[str]) -> str:
        if not isinstance(value, str):
            raise FieldError(path, value, self.allowed)
        if not valid_text(value):
            raise FieldError(path, value, f"{self.allowed}, in valid Unicode (no lone surrogates)")
        if self.strip_prefix and value.startswith(self.strip_prefix):
            value = value[len(self.strip_prefix) :]
        if len(value) > self.max_length:
            raise FieldError(path, value, f"{self.allowed}, at most {self.max_length} characters")
        if not self.controls and CONTROLS.search(value):
            raise FieldError(path, value, f"{self.allowed}, without control characters")
        if not re.fullmatch(self.pattern, value):
            raise FieldError(path, value, self.allowed)
        return value

    def dump(self, value: str) -> object:
        return value


IDENTIFIER = Str(
    allowed="1-256 characters without spaces, '/', '?' or '#', other than '.' and '..'",
    pattern=r"(?!\.\.?\Z)[^\s/?#]+",
    max_length=256,
)

#: Items in a list, unless its kind says otherwise.
MAX_ITEMS = 1024


@attrs.frozen
class StrList:
    """A JSON array of strings, kept as a tuple; duplicates refused when ``unique``."""

    item: Str = Str()
    unique: bool = True
    max_items: int = MAX_ITEMS

    @property
    def allowed(self) -> str:
        distinct = "distinct " if self.unique else ""
        return f"an array of at most {self.max_items} {distinct}strings ({self.item.allowed})"

    def parse(self, value: object, path: str, unknown: list[str]) -> tuple[str, ...]:
        if not isinstance(value, list) or len(value) > self.max_items:
            raise FieldError(path, value, self.allowed)
        items = tuple(self.item.parse(v, f"{path}[{i}]", unknown) for i, v in enumerate(value))
        if self.unique and len(set(items)) != len(items):
            raise FieldError(path, value, self.allowed)
        return items

    def dump(self, value: tuple[str, ...]) -> object:
        return list(value)


#: Header fields the gateway writes itself (framing, routing, hop-by-hop): an operator's
#: copy would contradict them, or smuggle a second message into the connection.
GATEWAY_HEADERS = (
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Upgrade",
    "Proxy-Authenticate",
    "Proxy-Authorization",
)
_GATEWAY_HEADERS = frozenset(h.lower() for h in GATEWAY_HEADERS)
#: RFC 9110 §5.6.2: a token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: RFC 9110 §5.5: visible ASCII, obs-text (any non-ASCII character, sent as UTF-8), space
#: and tab; no CR, LF, NUL or other control (C1 included).
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\xa0-\U0010ffff]*")


@attrs.frozen
class HeaderFields:
    """HTTP header fields an operator adds to every request to a backend (``Headers``).

    Each name is an RFC 9110 token, once (names are case-insensitive), and not a field the
    gateway sets itself; each value is one line of visible text; so no value can break the
    request it is written into.
    """

    max_fields: int = 64
    max_name: int = 256
    max_value_bytes: int = 8192

    @property
    def allowed(self) -> str:
        return f"an object of at most {self.max_fields} header fields whose values are strings"

    def parse(self, value: object, path: str, unknown: list[str]) -> dict[str, str]:
        if not isinstance(value, dict) or len(value) > self.max_fields:
            raise FieldError(path, value, self.allowed)
        out: dict[str, str] = {}
        seen: set[str] = set()
        for name, text in value.items():
            if not (
                isinstance(name, str)
                and len(name) <= self.max_name
                and name.isascii()
                and _TOKEN.fullmatch(name)
            ):
                raise FieldError(
                    path,
                    name,
                    f"header names that are tokens of 1-{self.max_name} letters, digits"
                    " and !#$%&'*+-.^_`|~",
                )
            where = f"{path}.{name}"
            lowered = name.lower()
            if lowered in _GATEWAY_HEADERS:
                raise FieldError(
                    where,
                    name,
                    f"a header other than {', '.join(GATEWAY_HEADERS)} (the gateway sets those)",
                )
            if lowered in seen:
                raise FieldError(where, name, "each header once (names are case-insensitive)")
            seen.add(lowered)
            if not (
                isinstance(text, str)
                and len(text) <= self.max_value_bytes
                and valid_text(text)
                and _FIELD_VALUE.fullmatch(text)
                and len(text.encode()) <= self.max_value_bytes
            ):
                raise FieldError(
                    where,
                    text,
                    f"a string of at most {self.max_value_bytes} bytes of visible text,"
                    " spaces and tabs",
                )
            out[name] = text
        return out

    def dump(self, value: Mapping[str, str]) -> object:
        return dict(value)


#: Integers a JSON encoder of the gateway (orjson) writes: signed and unsigned 64-bit.
_JSON_INT_MIN = -(2**63)
_JSON_INT_MAX = 2**64 - 1


@attrs.frozen
class JsonObject:
    """A JSON object the daemon merges into requests (pinned properties): nesting at most
    ``max_depth`` levels (itself the first), only finite numbers, strings and keys in valid
    Unicode, at most ``max_bytes`` as compact UTF-8 JSON. Walked with a stack, never
    recursively, and a refusal names the path inside (``Field.options.temperature``)."""

    allowed: str = "a JSON object"
    max_depth: int = MAX_DEPTH
    max_bytes: int = 64 * 1024

    def parse(self, value: object, path: str, unknown: list[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise FieldError(path, value, self.allowed)
        problem = _json_problem(value, path, self.max_depth)
        if problem is not None:
            raise problem
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        if len(encoded) > self.max_bytes or len(encoded.encode()) > self.max_bytes:
            raise FieldError(
                path, value, f"{self.allowed} of at most {self.max_bytes // 1024} KiB as JSON"
            )
        return value

    def dump(self, value: Mapping[str, Any]) -> object:
        return dict(value)


def _json_problem(value: object, path: str, max_depth: int) -> FieldError | None:
    """The first thing in ``value`` (in document order) that is not plain, finite JSON."""
    # Each pending node: (value, depth, index in ``trail`` of the step that reached it).
    # The trail holds (parent's index, ".key" or "[i]"): paths are spelled only for an error.
    trail: list[tuple[int, str]] = []
    stack: list[tuple[object, int, int]] = [(value, 1, -1)]

    def where(index: int) -> str:
        steps = []
        while index >= 0:
            index, step = trail[index]
            steps.append(step)
        return path + "".join(reversed(steps))

    while stack:
        node, depth, at = stack.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                return FieldError(where(at), node, f"JSON nesting at most {max_depth} levels")
            children: list[tuple[object, int, int]] = []
            if isinstance(node, dict):
                for key, child in node.items():
                    if not isinstance(key, str) or not valid_text(key):
                        return FieldError(where(at), key, "keys that are strings in valid Unicode")
                    trail.append((at, f".{key_text(key)}"))
                    children.append((child, depth + 1, len(trail) - 1))
            else:
                for i, child in enumerate(node):
                    trail.append((at, f"[{i}]"))
                    children.append((child, depth + 1, len(trail) - 1))
            stack.extend(reversed(children))
        else:
            allowed = _scalar_problem(node)
            if allowed is not None:
                return FieldError(where(at), node, allowed)
    return None


def _scalar_problem(node: object) -> str | None:
    """What ``node`` (anything but an object or array) should have been, or None if it is
    plain, finite JSON."""
    if node is None or isinstance(node, bool):
        return None
    if isinstance(node, int):
        return None if _JSON_INT_MIN <= node <= _JSON_INT_MAX else "an integer from -2^63 to 2^64-1"
    if isinstance(node, float):
        return None if math.isfinite(node) else "a finite number (no NaN or Infinity)"
    if isinstance(node, str):
        return None if valid_text(node) else "strings in valid Unicode (no lone surrogates)"
    return "JSON: objects, arrays, strings, numbers, true, false or null"


#: A DNS label as sent on the wire (after IDNA): letters, digits, '-' and '_'.
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_ZONE = re.compile(r"[A-Za-z0-9_.-]+")


def is_ip_address(text: str) -> bool:
    """An IPv4 or IPv6 address as written in a URL's host (IPv6 without brackets, maybe with
    a zone such as ``%eth0``)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    zone = text.partition("%")[2]
    return not zone or bool(_ZONE.fullmatch(zone))


def is_dns_name(text: str) -> bool:
    """A name Python's ``idna`` codec turns into labels of letters, digits, '-' and '_', 1-63
    each and 253 in all (one trailing dot allowed), as the gateway's ``Host`` header writes
    it."""
    if not text or len(text) > 1024 or not valid_text(text):
        return False
    try:
        encoded = text.encode("idna")
    except UnicodeError:
        return False
    name = encoded.decode("ascii")
    name = name[:-1] if name.endswith(".") else name
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


@attrs.frozen
class HostName:
    """A host to connect to or to answer for: an IP address or a DNS name (see
    :func:`is_dns_name`); ``*`` too when ``wildcard`` (any host)."""

    wildcard: bool = False

    @property
    def allowed(self) -> str:
        names = (
            "an IP address or a DNS name (labels of letters, digits, '-' and '_', 1-63"
            " characters each, 253 in all)"
        )
        return f"'*' or {names}" if self.wildcard else names

    def parse(self, value: object, path: str, unknown: list[str]) -> str:
        if not isinstance(value, str):
            raise FieldError(path, value, self.allowed)
        if self.wildcard and value == "*":
            return value
        if is_ip_address(value) or is_dns_name(value):
            return value
        raise FieldError(path, value, self.allowed)

    def dump(self, value: str) -> object:
        return value


@attrs.frozen
class Choice:
    """One of an Enum's values, written canonically by name.

    Read as the name in any case; when ``numbered``, also as the member's number, its position
    in the enum (declared in OllamaFlow 1.2's order: 1.2's C# serializer takes an enum's number
    too). ``wrapper`` also accepts ``{wrapper: name}``, the object 1.2 writes for an HTTP method.
    """

    enum: type[Enum]
    numbered: bool = False
    wrapper: str | None = None

    @property
    def allowed(self) -> str:
        if self.numbered:
            return "one of " + ", ".join(f"{m.value} or {i}" for i, m in enumerate(self.enum))
        return "one of " + ", ".join(str(m.value) for m in self.enum)

    def parse(self, value: object, path: str, unknown: list[str]) -> Enum:
        if self.wrapper is not None and isinstance(value, dict) and len(value) == 1:
            ((key, inner),) = value.items()
            if isinstance(key, str) and key.lower() == self.wrapper.lower():
                value = inner
        if isinstance(value, str):
            for member in self.enum:
                if str(member.value).lower() == value.lower():
                    return member
        elif self.numbered and isinstance(value, int) and not isinstance(value, bool):
            members = list(self.enum)
            if 0 <= value < len(members):
                return members[value]
        raise FieldError(path, value, self.allowed)

    def dump(self, value: Enum) -> object:
        return value.value


@attrs.frozen
class Timestamp:
    allowed: str = "an ISO-8601 UTC time"

    def parse(self, value: object, path: str, unknown: list[str]) -> datetime:
        """A time with an offset is moved to UTC; one without is UTC already (never the
        server's own zone)."""
        if isinstance(value, str) and len(value) <= 64:
            try:
                moment = datetime.fromisoformat(value)
                if moment.tzinfo is None:
                    return moment.replace(tzinfo=UTC)
                return moment.astimezone(UTC)
            except (ValueError, OverflowError):
                pass
        raise FieldError(path, value, self.allowed)

    def dump(self, value: datetime) -> object:
        return format_utc(value)
