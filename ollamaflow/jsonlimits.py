"""JSON from strangers: one depth limit, and parsers that refuse what they cannot give back.

Every JSON document OllamaFlow reads from a client or an operator nests at most
:data:`MAX_DEPTH` levels: 64 is far more than any Ollama, OpenAI or admin API call needs, and
far below where Python's recursive encoder and decoder give up (about 1,000), so a document that
was accepted can always be written out again.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

#: Arrays and objects inside one another, the outermost counting as 1.
MAX_DEPTH = 64


class InvalidJson(ValueError):
    """A document that is not JSON, or nests deeper than :data:`MAX_DEPTH`; says which."""


class TooDeep(InvalidJson):
    """Valid JSON, but nested deeper than :data:`MAX_DEPTH`."""


def too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects in ``value`` (as a JSON parser builds them: plain dicts and
    lists) nest more than ``limit`` levels. Level by level, so the check itself cannot
    recurse, with exact type tests: a long chat is a walk over its messages, nothing more."""
    kind = type(value)
    if kind is not dict and kind is not list:
        return False
    level: list[Any] = [value]
    depth = 1
    while level:
        if depth > limit:
            return True
        below: list[Any] = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                kind = type(child)
                if kind is dict or kind is list:
                    below.append(child)
        level = below
        depth += 1
    return False


#: Bodies up to this size have their brackets counted before any walk (most skip it); past
#: it the walk is cheaper than the count (a 66 KB chat: 34 us against 39 us).
_COUNTED = 16 * 1024


def _deeper_than_allowed(raw: bytes, value: object) -> bool:
    # Fewer brackets than the limit cannot nest past it.
    if len(raw) <= _COUNTED:
        return raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and too_deep(value)
    return too_deep(value)


def loads_strict(raw: bytes) -> Any:
    """Parse a client's body as RFC 8259 JSON in UTF-8 (no NaN or Infinity, no lone
    surrogates, no number beyond a double) nesting at most :data:`MAX_DEPTH` levels."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        if str(e).startswith("depth limit exceeded"):  # orjson's own limit, at 1,024
            raise TooDeep(f"the request body nests deeper than {MAX_DEPTH} levels") from None
        raise InvalidJson(f"the request body is not valid JSON: {e}") from None
    if _deeper_than_allowed(raw, value):
        raise TooDeep(f"the request body nests deeper than {MAX_DEPTH} levels")
    return value


def dumps(value: object) -> bytes:
    """Encode a document read by :func:`loads_strict` (possibly merged with validated JSON)."""
    return orjson.dumps(value)


#: Python converts integers of at most this many digits (``sys.get_int_max_str_digits``).
_MAX_INT_DIGITS = 4300


class OverlongNumber(float):
    """An integer with more digits than Python converts: infinite, as no field takes it, and
    shown by its length, so the field that refuses it can say what it was."""

    digits: int

    def __new__(cls, digits: int) -> OverlongNumber:
        number = super().__new__(cls, "inf")
        number.digits = digits
        return number

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _int(text: str) -> int | float:
    # Beyond the limit int() raises, failing the whole parse where the field should.
    return int(text) if len(text) <= _MAX_INT_DIGITS else OverlongNumber(len(text))


def _constant(name: str) -> float:
    return float(name)  # NaN and ±Infinity: kept, so the field that holds one can refuse it


_LENIENT = json.JSONDecoder(parse_int=_int, parse_constant=_constant)


def loads_for_fields(raw: bytes) -> Any:
    """Parse an operator's document (the admin API): numbers the fields will judge are kept
    as they are (NaN, Infinity, an :class:`OverlongNumber`), so the error can name the field;
    nesting deeper than :data:`MAX_DEPTH` is refused here. A leading UTF-8 byte order mark is
    ignored, as RFC 8259 allows."""
    try:
        value = _LENIENT.decode(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidJson(f"the body is not valid JSON: not UTF-8 ({e.reason})") from None
    except RecursionError:
        raise TooDeep(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise InvalidJson(f"the body is not valid JSON: {e}") from None
    if _deeper_than_allowed(raw, value):
        raise TooDeep(f"the body nests deeper than {MAX_DEPTH} levels")
    return value
