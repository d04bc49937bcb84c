"""JSON from strangers: the depth limit, and parsers that only ever refuse with InvalidJson."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollamaflow import jsonlimits
from ollamaflow.jsonlimits import MAX_DEPTH, InvalidJson, TooDeep


def depth(value: Any) -> int:
    """Nesting depth, by the definition (recursive: fine for the small values drawn here)."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def text_of_depth(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=40,
)


@given(json_values, st.integers(min_value=0, max_value=8))
def test_too_deep_agrees_with_the_definition(value: Any, limit: int) -> None:
    assert jsonlimits.too_deep(value, limit) == (depth(value) > limit)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 1_000, 1_025, 100_000])
@pytest.mark.parametrize("parse", [jsonlimits.loads_strict, jsonlimits.loads_for_fields])
def test_anything_deeper_than_the_limit_is_refused(parse: Any, levels: int) -> None:
    with pytest.raises(TooDeep, match=f"deeper than {MAX_DEPTH}"):
        parse(text_of_depth(levels))


@pytest.mark.parametrize("parse", [jsonlimits.loads_strict, jsonlimits.loads_for_fields])
def test_the_limit_itself_is_accepted(parse: Any) -> None:
    assert depth(parse(text_of_depth(MAX_DEPTH))) == MAX_DEPTH


@pytest.mark.parametrize("parse", [jsonlimits.loads_strict, jsonlimits.loads_for_fields])
def test_large_bodies_are_judged_by_the_same_rule(parse: Any) -> None:
    """Past 16 KiB the brackets are not counted first: the walk alone decides."""
    pad = b'"' + b"x" * 20_000 + b'"'
    assert depth(parse(b"[" * MAX_DEPTH + pad + b"]" * MAX_DEPTH)) == MAX_DEPTH
    with pytest.raises(TooDeep):
        parse(b"[" * (MAX_DEPTH + 1) + pad + b"]" * (MAX_DEPTH + 1))


@settings(max_examples=300)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_the_parsers_refuse_only_with_invalid_json(raw: bytes) -> None:
    for parse in (jsonlimits.loads_strict, jsonlimits.loads_for_fields):
        try:
            value = parse(raw)
        except InvalidJson as e:
            assert str(e).startswith("the ")  # says what is wrong; nothing else escapes
        else:
            assert not jsonlimits.too_deep(value)


@pytest.mark.parametrize(
    "raw", [b'{"x": NaN}', b"[Infinity]", b"[-Infinity]", b"[1e999]", b'["\\ud800"]', b"\xff"]
)
def test_client_bodies_are_strict_json(raw: bytes) -> None:
    with pytest.raises(InvalidJson):
        jsonlimits.loads_strict(raw)


def test_operator_documents_keep_odd_numbers_for_the_field_to_refuse() -> None:
    raw = b'{"a": NaN, "b": 1e999, "c": ' + b"9" * 5000 + b', "d": ' + b"9" * 400 + b"}"
    value = jsonlimits.loads_for_fields(raw)
    assert math.isnan(value["a"]) and value["b"] == math.inf
    assert value["c"] == math.inf and repr(value["c"]) == "<an integer of 5000 digits>"
    assert value["d"] == 10**400 - 1, "integers Python can convert are kept exact"
    assert jsonlimits.loads_for_fields(b'\xef\xbb\xbf{"port": 11434}') == {"port": 11434}


def test_what_was_read_strictly_can_be_written_back() -> None:
    raw = b'{"model": "llama3", "options": {"seed": 18446744073709551616}, "x": [[[1.5]]]}'
    assert json.loads(jsonlimits.dumps(jsonlimits.loads_strict(raw)))["x"] == [[[1.5]]]
