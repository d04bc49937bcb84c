"""attrs records in their wire form: PascalCase JSON, keys accepted in any case, values validated.

Records declare each field with :func:`field` and a :class:`Kind`; :func:`from_wire` and
:func:`to_wire` do the rest, so the settings file and the admin API share one set of rules
and one style of error message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol, TypeVar

import attrs

T = TypeVar("T")

_INT32_MAX = 2**31 - 1


class FieldError(ValueError):
    """A value that does not fit its field: names the field, the value and what is allowed."""

    def __init__(self, path: str, value: object, allowed: str) -> None:
        self.path = path
        self.value = value
        self.allowed = allowed
        super().__init__(f"{path}: {_show(value)} is not allowed; expected {allowed}")


class MissingField(FieldError):
    """A required field that is absent or null."""

    def __init__(self, path: str, allowed: str) -> None:
        self.path = path
        self.value = None
        self.allowed = allowed
        ValueError.__init__(self, f"{path} is required: {allowed}")


class UnknownFields(ValueError):
    """Keys that no field of the record answers to."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        super().__init__(f"unknown field{'s' if len(paths) > 1 else ''}: {', '.join(paths)}")


def _show(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not self.lo <= value <= self.hi:
            raise FieldError(path, value, self.allowed)
        return value

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
    """A string; ``pattern`` (a full match) narrows it, ``strip`` trims a prefix first."""

    allowed: str = "a non-empty string"
    pattern: str = r"(?s).+"
    max_length: int = 4096
    strip_prefix: str = ""

    def parse(self, value: object, path: str, unknown: list[str]) -> str:
        if not isinstance(value, str):
            raise FieldError(path, value, self.allowed)
        if self.strip_prefix and value.startswith(self.strip_prefix):
            value = value[len(self.strip_prefix) :]
        if len(value) > self.max_length or not re.fullmatch(self.pattern, value):
            raise FieldError(path, value, self.allowed)
        return value

    def dump(self, value: str) -> object:
        return value


IDENTIFIER = Str(
    allowed="1-256 characters without spaces, '/', '?' or '#'",
    pattern=r"[^\s/?#\x00-\x1f]+",
    max_length=256,
)


@attrs.frozen
class StrList:
    """A JSON array of strings, kept as a tuple; duplicates refused when ``unique``."""

    item: Str = Str()
    unique: bool = True

    @property
    def allowed(self) -> str:
        return f"an array of {'distinct ' if self.unique else ''}strings ({self.item.allowed})"

    def parse(self, value: object, path: str, unknown: list[str]) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise FieldError(path, value, self.allowed)
        items = tuple(self.item.parse(v, f"{path}[{i}]", unknown) for i, v in enumerate(value))
        if self.unique and len(set(items)) != len(items):
            raise FieldError(path, value, self.allowed)
        return items

    def dump(self, value: tuple[str, ...]) -> object:
        return list(value)


@attrs.frozen
class StrMap:
    """A JSON object of string values (HTTP headers and the like)."""

    allowed: str = "an object whose values are strings"

    def parse(self, value: object, path: str, unknown: list[str]) -> dict[str, str]:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise FieldError(path, value, self.allowed)
        return dict(value)

    def dump(self, value: Mapping[str, str]) -> object:
        return dict(value)


@attrs.frozen
class JsonObject:
    allowed: str = "a JSON object"

    def parse(self, value: object, path: str, unknown: list[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise FieldError(path, value, self.allowed)
        return value

    def dump(self, value: Mapping[str, Any]) -> object:
        return dict(value)


@attrs.frozen
class Choice:
    """One of an Enum's values, matched case-insensitively, written canonically."""

    enum: type[Enum]

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(str(m.value) for m in self.enum)

    def parse(self, value: object, path: str, unknown: list[str]) -> Enum:
        if isinstance(value, str):
            for member in self.enum:
                if str(member.value).lower() == value.lower():
                    return member
        raise FieldError(path, value, self.allowed)

    def dump(self, value: Enum) -> object:
        return value.value


@attrs.frozen
class Timestamp:
    allowed: str = "an ISO-8601 UTC time"

    def parse(self, value: object, path: str, unknown: list[str]) -> datetime:
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value).astimezone(UTC)
            except ValueError:
                pass
        raise FieldError(path, value, self.allowed)

    def dump(self, value: datetime) -> object:
        return format_utc(value)


@attrs.frozen
class Nested:
    """A record inside a record (the settings file's sections)."""

    cls: type

    @property
    def allowed(self) -> str:
        return "a JSON object"

    def parse(self, value: object, path: str, unknown: list[str]) -> Any:
        return _from_wire(self.cls, value, path, unknown)

    def dump(self, value: Any) -> object:
        return to_wire(value)


@attrs.frozen
class ObjectList:
    """An array of nested records."""

    cls: type

    @property
    def allowed(self) -> str:
        return "an array of JSON objects"

    def parse(self, value: object, path: str, unknown: list[str]) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise FieldError(path, value, self.allowed)
        return tuple(_from_wire(self.cls, v, f"{path}[{i}]", unknown) for i, v in enumerate(value))

    def dump(self, value: tuple[Any, ...]) -> object:
        return [to_wire(v) for v in value]


def format_utc(moment: datetime) -> str:
    """ISO-8601 in UTC with a ``Z``, as OllamaFlow 1.2 writes dates."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@attrs.frozen
class _Meta:
    kind: Kind
    wire: str
    readonly: bool


def pascal(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def field(
    kind: Kind,
    *,
    default: Any = attrs.NOTHING,
    factory: Callable[[], Any] | None = None,
    wire: str | None = None,
    readonly: bool = False,
) -> Any:
    """An attrs field with its wire kind; ``readonly`` fields are written but never read."""
    return attrs.field(
        default=default,
        factory=factory,
        metadata={"wire": _Meta(kind, wire or "", readonly)},
    )


def _fields(cls: type) -> list[tuple[attrs.Attribute[Any], _Meta]]:
    out = []
    for a in attrs.fields(cls):
        meta = a.metadata.get("wire")
        if meta is not None:
            out.append((a, meta))
    return out


def _wire_name(a: attrs.Attribute[Any], meta: _Meta) -> str:
    return meta.wire or pascal(a.name)


def from_wire(cls: type[T], data: object, path: str = "") -> tuple[T, list[str]]:
    """Build ``cls`` from JSON data; returns the record and the keys nothing answered to.

    Missing or null keys take the field's default; read-only keys are ignored.
    Raises :class:`FieldError` for the first value that does not fit.
    """
    unknown: list[str] = []
    return _from_wire(cls, data, path, unknown), unknown


def _from_wire(cls: type[T], data: object, path: str, unknown: list[str]) -> T:
    if not isinstance(data, dict):
        raise FieldError(path or cls.__name__, data, "a JSON object")
    by_lower = {_wire_name(a, m).lower(): (a, m) for a, m in _fields(cls)}
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for key, value in data.items():
        found = by_lower.get(key.lower())
        where = f"{path}.{key}" if path else key
        if found is None:
            unknown.append(where)
            continue
        a, meta = found
        if a.name in seen:
            raise FieldError(where, value, "each field once (keys are case-insensitive)")
        seen.add(a.name)
        if meta.readonly or value is None:
            continue
        values[a.name] = meta.kind.parse(value, where, unknown)
    for a, meta in _fields(cls):
        if a.name not in values and a.default is attrs.NOTHING:
            where = f"{path}.{_wire_name(a, meta)}" if path else _wire_name(a, meta)
            raise MissingField(where, meta.kind.allowed)
    return cls(**values)


def to_wire(record: Any) -> dict[str, object]:
    """The record as PascalCase JSON data; ``None`` fields are left out."""
    out: dict[str, object] = {}
    for a, meta in _fields(type(record)):
        value = getattr(record, a.name)
        if value is not None:
            out[_wire_name(a, meta)] = meta.kind.dump(value)
    return out
