"""What a refused field value says: the field's path, the value (shown short and safe) and
what was allowed, in one style for the settings file and the admin API."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ollamaflow.jsonlimits import OverlongNumber

#: C0 controls, DEL and C1 controls: never part of a name, a label or a line of text.
CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Halves of UTF-16 pairs: a str may hold them alone, but no encoder (UTF-8, a database
#: driver, a log file) can write them.
_SURROGATES = re.compile(r"[\ud800-\udfff]")


class FieldError(ValueError):
    """A value that does not fit its field: names the field, the value and what is allowed."""

    def __init__(self, path: str, value: object, allowed: str) -> None:
        self.path = path
        self.value = value
        self.allowed = allowed
        super().__init__(f"{path}: {show_value(value)} is not allowed; expected {allowed}")


class MissingField(FieldError):
    """A required field that is absent or null."""

    def __init__(self, path: str, allowed: str) -> None:
        self.path = path
        self.value = None
        self.allowed = allowed
        ValueError.__init__(self, f"{path} is required: {allowed}")


def valid_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode: no lone surrogate, so it encodes as UTF-8."""
    return text.isascii() or _SURROGATES.search(text) is None


class _Raw(str):
    """Punctuation written by :func:`_show` as it is (a plain ``str`` is a value to quote)."""


#: Integers up to this many bits (38 digits) are shown in full.
_SHOWN_INT_BITS = 128


def _scalar(value: object, limit: int) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        if value.bit_length() <= _SHOWN_INT_BITS:
            return int.__repr__(value)
        # str() of a long integer is slow, and refused beyond 4,300 digits.
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}<an integer of about {digits} digits>"
    if isinstance(value, OverlongNumber):
        return repr(value)
    if isinstance(value, float):
        return json.dumps(float(value))  # NaN, Infinity and -Infinity as JSON's extensions
    if isinstance(value, str):
        return json.dumps(value[: limit + 1])  # escapes controls and lone surrogates
    try:
        text = repr(value)[: limit + 1]
    except Exception:  # a broken __repr__, or one that recurses without end
        return f"<{type(value).__name__}>"
    return text if valid_text(text) else json.dumps(text)


def _items(values: list[Any] | tuple[Any, ...]) -> Iterator[object]:
    for i, item in enumerate(values):
        if i:
            yield _Raw(", ")
        yield item
    yield _Raw("]")


def _entries(mapping: Mapping[Any, Any], limit: int) -> Iterator[object]:
    for i, (key, item) in enumerate(mapping.items()):
        if i:
            yield _Raw(", ")
        yield _Raw(_scalar(key, limit) + ": ")
        yield item
    yield _Raw("}")


_END = object()


def show_value(value: object, limit: int = 80) -> str:
    """``value`` as JSON for a message, cut to ``limit`` characters; never raises.

    Any value: integers too long to print, NaN, lone surrogates, nesting of any depth (walked
    with a stack, and only as far as the first ``limit`` characters need).
    """
    parts: list[str] = []
    size = 0
    stack: list[Iterator[object]] = [iter((value,))]
    try:
        while stack and size <= limit:
            item = next(stack[-1], _END)
            if item is _END:
                stack.pop()
                continue
            if isinstance(item, _Raw):
                text = str(item)
            elif isinstance(item, Mapping):
                text = "{"
                stack.append(_entries(item, limit))
            elif isinstance(item, list | tuple):
                text = "["
                stack.append(_items(item))
            else:
                text = _scalar(item, limit)
            parts.append(text)
            size += len(text)
    except Exception:  # a container of a caller's own type that fails to iterate
        parts.append(" ...")
    shown = "".join(parts)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def key_text(key: object) -> str:
    """A JSON key as part of a field's path: as written when plain, else quoted and cut."""
    if isinstance(key, str) and len(key) <= 64 and valid_text(key) and not CONTROLS.search(key):
        return key
    return show_value(key, 64)
