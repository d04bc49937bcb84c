"""attrs records in their wire form: PascalCase JSON, keys accepted in any case, values validated.

Records declare each field with :func:`field` and a :class:`~ollamaflow.fieldkinds.Kind`;
:func:`from_wire` and :func:`to_wire` do the rest, so the settings file and the admin API share
one set of rules and one style of error message. Records inside records are the two kinds here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from ollamaflow.fielderrors import FieldError, MissingField, key_text
from ollamaflow.fieldkinds import MAX_ITEMS, Kind

T = TypeVar("T")


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
    max_items: int = MAX_ITEMS

    @property
    def allowed(self) -> str:
        return f"an array of at most {self.max_items} JSON objects"

    def parse(self, value: object, path: str, unknown: list[str]) -> tuple[Any, ...]:
        if not isinstance(value, list) or len(value) > self.max_items:
            raise FieldError(path, value, self.allowed)
        return tuple(_from_wire(self.cls, v, f"{path}[{i}]", unknown) for i, v in enumerate(value))

    def dump(self, value: tuple[Any, ...]) -> object:
        return [to_wire(v) for v in value]


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
        if not isinstance(key, str):
            raise FieldError(path or cls.__name__, key, "an object whose keys are strings")
        found = by_lower.get(key.lower())
        where = f"{path}.{key_text(key)}" if path else key_text(key)
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
