"""Frontend and Backend records: OllamaFlow 1.2's defaults and validation on the way in."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollamaflow import modelnames
from ollamaflow.fielderrors import FieldError, MissingField
from ollamaflow.http1.rules import HOP_BY_HOP
from ollamaflow.jsonfields import from_wire, to_wire
from ollamaflow.records import (
    ApiFormat,
    Backend,
    Frontend,
    HealthCheckMethod,
    LoadBalancing,
    parse_record,
)

NAN = math.nan
BIG = 10**5000


class Unprintable:
    """A value whose repr raises, as a careless caller might hand a field."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def pascal_to_snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def test_frontend_defaults_match_ollamaflow_1_2_plus_load_aware_scheduling() -> None:
    fe, unknown = parse_record(Frontend, {"Identifier": "f"})
    assert unknown == []
    assert to_wire(fe) == {
        "Identifier": "f",
        "Hostname": "*",
        "TimeoutMs": 60000,
        "LoadBalancing": "LeastOutstanding",
        "BlockHttp10": True,
        "MaxRequestBodySize": 536870912,
        "Backends": [],
        "RequiredModels": [],
        "LogRequestFull": False,
        "LogRequestBody": False,
        "LogResponseBody": False,
        "UseStickySessions": False,
        "StickySessionExpirationMs": 1800000,
        "PinnedEmbeddingsProperties": {},
        "PinnedCompletionsProperties": {},
        "AllowEmbeddings": True,
        "AllowCompletions": True,
        "AllowRetries": True,
        "AllowModelManagement": True,
        "Active": True,
        "RequireApiKey": False,
        "MaxQueueDepth": 512,
        "QueueTimeoutMs": 30000,
    }


def test_a_stored_frontend_keeps_its_load_balancing() -> None:
    """Records carry every field, so an old RoundRobin frontend stays RoundRobin."""
    old, _ = parse_record(Frontend, {"Identifier": "f", "LoadBalancing": "RoundRobin"})
    again, _ = parse_record(Frontend, to_wire(old))
    assert again.load_balancing is LoadBalancing.ROUND_ROBIN


def test_backend_defaults_match_ollamaflow_1_2_except_the_ollama_port() -> None:
    be, _ = parse_record(Backend, {"Identifier": "b"})
    assert (be.hostname, be.port, be.ssl) == ("localhost", 11434, False)
    assert (be.unhealthy_threshold, be.healthy_threshold) == (2, 2)
    assert be.health_check_method is HealthCheckMethod.GET
    assert be.health_check_url == "/"
    assert (be.max_parallel_requests, be.rate_limit_requests_threshold) == (4, 10)
    assert be.api_format is ApiFormat.OLLAMA
    assert be.labels == () and dict(be.headers) == {}
    assert be.bearer_token is None and be.querystring is None
    assert be.active and be.allow_embeddings and be.allow_completions
    assert be.weight == 1
    assert "BearerToken" not in to_wire(be), "null fields are omitted"


def test_keys_in_any_case_and_enums_in_any_case() -> None:
    fe, _ = parse_record(
        Frontend, {"identifier": "f", "LOADBALANCING": "random", "backends": ["a", "b"]}
    )
    assert fe.load_balancing is LoadBalancing.RANDOM
    assert fe.backends == ("a", "b")
    assert to_wire(fe)["LoadBalancing"] == "Random"


def test_runtime_and_server_managed_keys_are_ignored_so_get_output_can_be_put_back() -> None:
    be, _ = parse_record(Backend, {"Identifier": "b", "Port": 8080})
    echoed = to_wire(be) | {
        "CreatedUtc": "2020-01-01T00:00:00.000000Z",
        "Healthy": True,
        "ActiveRequests": 3,
        "Uptime": "00:00:01",
    }
    again, unknown = parse_record(Backend, echoed)
    assert unknown == []
    assert again == be


# -- enums as 1.2 accepts them: names in any case, or numbers ----------------------------------

#: Each enum field, its record, and its members by the number OllamaFlow 1.2 gives them (the
#: order of its C# enums; 1.2's HealthCheckMethod is an HttpMethod, numbered here GET, HEAD).
NUMBERED = [
    (Frontend, "LoadBalancing", ["Random", "RoundRobin", "LeastOutstanding", "ModelAware"]),
    (Backend, "ApiFormat", ["Ollama", "OpenAI"]),
    (Backend, "HealthCheckMethod", ["GET", "HEAD"]),
]


@pytest.mark.parametrize(("cls", "key", "names"), NUMBERED)
def test_enums_given_as_numbers_are_read_as_1_2_numbers_them_and_written_as_names(
    cls: type, key: str, names: list[str]
) -> None:
    for number, name in enumerate(names):
        record, unknown = parse_record(cls, {"Identifier": "x", key: number})
        assert unknown == [] and to_wire(record)[key] == name


@pytest.mark.parametrize(("cls", "key", "names"), NUMBERED)
@pytest.mark.parametrize("bad", [-1, "out of range", True, False, 1.5, 0.0, "0", [0], {"0": 0}])
def test_an_enum_number_out_of_range_or_a_boolean_is_400_naming_the_field_and_the_choices(
    cls: type, key: str, names: list[str], bad: object
) -> None:
    value = len(names) if bad == "out of range" else bad
    error = refused(cls, {key: value})
    assert error.path == key
    for number, name in enumerate(names):
        assert f"{name} or {number}" in error.allowed


def test_a_health_check_method_may_come_as_1_2_writes_it() -> None:
    """1.2's HealthCheckMethod is a .NET HttpMethod, serialized as ``{"Method": "GET"}``."""
    be, _ = parse_record(Backend, {"Identifier": "b", "HealthCheckMethod": {"method": "head"}})
    assert be.health_check_method is HealthCheckMethod.HEAD
    assert to_wire(be)["HealthCheckMethod"] == "HEAD"
    for bad in [{"Method": "POST"}, {"Verb": "GET"}, {"Method": "GET", "Extra": 1}, {}]:
        assert refused(Backend, {"HealthCheckMethod": bad}).path == "HealthCheckMethod"


_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    case=st.sampled_from(NUMBERED),
    value=_JSON
    | st.integers(min_value=-2, max_value=4)
    | st.sampled_from(
        ["random", "ROUNDROBIN", "leastoutstanding", "ollama", "OPENAI", "get", "Head"]
    )
    | st.builds(lambda v: {"Method": v}, _JSON_SCALARS),
)
def test_an_enum_field_reads_only_a_name_or_a_number_and_always_writes_the_name(
    case: tuple[type, str, list[str]], value: object
) -> None:
    cls, key, names = case
    by_lower = {name.lower(): name for name in names}
    inner = value
    if key == "HealthCheckMethod" and isinstance(value, dict) and len(value) == 1:
        ((wrapper, wrapped),) = value.items()
        inner = wrapped if wrapper.lower() == "method" else value
    if isinstance(inner, str) and inner.lower() in by_lower:
        expected: str | None = by_lower[inner.lower()]
    elif type(inner) is int and 0 <= inner < len(names):
        expected = names[inner]
    else:
        expected = None
    if value is None:  # null is the default, as for every field
        parse_record(cls, {"Identifier": "x", key: value})
        return
    if expected is None:
        assert refused(cls, {key: value}).path == key
    else:
        record, _ = parse_record(cls, {"Identifier": "x", key: value})
        assert to_wire(record)[key] == expected


def test_unknown_keys_are_reported() -> None:
    _, unknown = parse_record(Backend, {"Identifier": "b", "HeathCheckUrl": "/"})
    assert unknown == ["HeathCheckUrl"]


@pytest.mark.parametrize(
    ("cls", "data", "field"),
    [
        (Backend, {"Port": 70000}, "Port"),
        (Backend, {"Port": "11434"}, "Port"),
        (Backend, {"Port": True}, "Port"),
        (Backend, {"Ssl": 1}, "Ssl"),
        (Backend, {"HealthyThreshold": 0}, "HealthyThreshold"),
        (Backend, {"HealthCheckMethod": "POST"}, "HealthCheckMethod"),
        (Backend, {"HealthCheckUrl": "health"}, "HealthCheckUrl"),
        (Backend, {"ApiFormat": "vllm"}, "ApiFormat"),
        (Backend, {"Labels": "gpu"}, "Labels"),
        (Backend, {"Labels": ["gpu", "gpu"]}, "Labels"),
        (Backend, {"Headers": {"X-A": 1}}, "Headers.X-A"),
        (Backend, {"MaxParallelRequests": 0}, "MaxParallelRequests"),
        (Frontend, {"TimeoutMs": -1}, "TimeoutMs"),
        (Frontend, {"StickySessionExpirationMs": 9999}, "StickySessionExpirationMs"),
        (Frontend, {"StickySessionExpirationMs": 86400001}, "StickySessionExpirationMs"),
        (Frontend, {"MaxRequestBodySize": 0}, "MaxRequestBodySize"),
        (Frontend, {"LoadBalancing": "Fastest"}, "LoadBalancing"),
        (Frontend, {"Backends": ["a/b"]}, "Backends[0]"),
        (Frontend, {"PinnedCompletionsProperties": [1]}, "PinnedCompletionsProperties"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(
    cls: type, data: dict[str, object], field: str
) -> None:
    with pytest.raises(FieldError) as caught:
        parse_record(cls, {"Identifier": "x", **data})
    assert caught.value.path == field
    assert str(caught.value).startswith(f"{field}: ")
    assert "expected" in str(caught.value)


def test_identifier_is_required_and_must_be_url_safe() -> None:
    with pytest.raises(MissingField):
        parse_record(Frontend, {"Hostname": "a"})
    for bad in ["", "a b", "a/b", "x" * 257]:
        with pytest.raises(FieldError):
            parse_record(Frontend, {"Identifier": bad})


def test_the_same_key_twice_in_different_case_is_refused() -> None:
    with pytest.raises(FieldError, match="each field once"):
        parse_record(Backend, {"Identifier": "b", "Port": 1, "port": 2})


def test_querystring_may_carry_its_question_mark() -> None:
    be, _ = parse_record(Backend, {"Identifier": "b", "Querystring": "?a=1&b=2"})
    assert be.querystring == "a=1&b=2"


def test_null_means_default() -> None:
    fe, _ = parse_record(Frontend, {"Identifier": "f", "TimeoutMs": None, "Name": None})
    assert fe.timeout_ms == 60000 and fe.name is None


def test_base_url() -> None:
    assert parse_record(Backend, {"Identifier": "b"})[0].base_url == "http://localhost:11434"
    be, _ = parse_record(Backend, {"Identifier": "b", "Hostname": "::1", "Ssl": True, "Port": 1})
    assert be.base_url == "https://[::1]:1"


# -- hostile input: every value bounded and checked (issue #14) -------------------------------


def refused(cls: type, data: dict[str, object]) -> FieldError:
    """The FieldError that ``data`` (plus an Identifier unless it has one) is refused with."""
    with pytest.raises(FieldError) as caught:
        parse_record(cls, {"Identifier": "x", **data})
    message = str(caught.value)
    assert message.startswith(f"{caught.value.path}: ") and "expected" in message, message
    return caught.value


def accepted(cls: type, data: dict[str, object]) -> Any:
    record, unknown = parse_record(cls, {"Identifier": "x", **data})
    assert unknown == []
    return record


@pytest.mark.parametrize(
    "value",
    [
        10**5000,
        -(10**5000),
        float("nan"),
        float("inf"),
        "\ud800",
        {"\udfff": ["\ud800"]},
        "x" * 100_000,
        list(range(100_000)),
        {str(i): i for i in range(100_000)},
        functools.reduce(lambda inner, _: [inner], range(100_000), list[Any]()),
        functools.reduce(lambda inner, _: {"k": inner}, range(100_000), dict[str, Any]()),
        Unprintable(),
    ],
    ids=[
        "huge-int",
        "huge-negative-int",
        "nan",
        "infinity",
        "surrogate",
        "surrogates-inside",
        "long-string",
        "long-list",
        "big-object",
        "deep-list",
        "deep-object",
        "unprintable",
    ],
)
def test_a_field_error_shows_any_value_in_about_80_characters_without_raising(
    value: object,
) -> None:
    error = FieldError("Field", value, "something else")
    shown = (
        str(error).removeprefix("Field: ").removesuffix(" is not allowed; expected something else")
    )
    assert 0 < len(shown) <= 80
    shown.encode("utf-8")  # no lone surrogate reaches a log line or a response


@pytest.mark.parametrize(
    ("cls", "data", "path"),
    [
        (Backend, {"Identifier": "\ud800"}, "Identifier"),
        (Backend, {"Name": "gpu \udc00"}, "Name"),
        (Backend, {"Labels": ["ok", "\ud800"]}, "Labels[1]"),
        (Backend, {"Headers": {"X-A": "\ud800"}}, "Headers.X-A"),
        (Backend, {"Headers": {"\ud800": "v"}}, "Headers"),
        (
            Backend,
            {"PinnedCompletionsProperties": {"stop": ["\ud800"]}},
            "PinnedCompletionsProperties.stop[0]",
        ),
        (Backend, {"PinnedEmbeddingsProperties": {"\udfff": 1}}, "PinnedEmbeddingsProperties"),
        (Frontend, {"RequiredModels": ["llama3\ud800"]}, "RequiredModels[0]"),
        (Frontend, {"Backends": ["\ud800"]}, "Backends[0]"),
    ],
)
def test_every_string_anywhere_must_be_valid_unicode(
    cls: type, data: dict[str, object], path: str
) -> None:
    assert refused(cls, data).path == path


@pytest.mark.parametrize(
    ("cls", "field"),
    [
        (Backend, "Name"),
        (Frontend, "Name"),
        (Backend, "Hostname"),
        (Frontend, "Hostname"),
        (Backend, "Identifier"),
        (Backend, "BearerToken"),
        (Backend, "Querystring"),
        (Backend, "HealthCheckUrl"),
    ],
)
@pytest.mark.parametrize("control", ["\x00", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\x9f"])
def test_text_fields_refuse_control_characters(cls: type, field: str, control: str) -> None:
    prefix = "/" if field == "HealthCheckUrl" else ""
    assert refused(cls, {field: f"{prefix}a{control}b"}).path == field


def test_text_fields_still_take_printable_unicode() -> None:
    be = accepted(Backend, {"Name": "GPU-Box №1 — Zürich ☃"})
    assert be.name == "GPU-Box №1 — Zürich ☃"


@pytest.mark.parametrize("identifier", [".", "..", "a\x7fb", "a\x00b", "a\x85b", "a\u2028b"])
def test_identifiers_that_cannot_be_addressed_are_refused(identifier: str) -> None:
    assert refused(Frontend, {"Identifier": identifier}).path == "Identifier"


@pytest.mark.parametrize("identifier", ["...", ".a", "a.", "gpu-1.rack_2", "ü", "x" * 256])
def test_identifiers_that_are_fine(identifier: str) -> None:
    assert accepted(Backend, {"Identifier": identifier}).identifier == identifier


@pytest.mark.parametrize(
    ("cls", "field", "item", "most"),
    [
        (Backend, "Labels", "l{}", 1024),
        (Frontend, "Backends", "b{}", 1024),
        (Frontend, "RequiredModels", "m{}", 1024),
    ],
)
def test_lists_hold_at_most_1024_items(cls: type, field: str, item: str, most: int) -> None:
    at_most = [item.format(i) for i in range(most)]
    assert len(getattr(accepted(cls, {field: at_most}), pascal_to_snake(field))) == most
    error = refused(cls, {field: [*at_most, item.format(most)]})
    assert error.path == field and "at most 1024" in str(error)


@pytest.mark.parametrize(
    ("cls", "field", "valid", "invalid"),
    [
        (Backend, "Labels", ["a100", "rack-2", "ü"], ["a b", "a\tb", "", "a\x00", "a\u00a0b"]),
        (
            Frontend,
            "RequiredModels",
            ["llama3", "hf.co/org/model:Q4_K_M", "x" * 673],
            ["llama 3", "llama3\n", "", "x" * 674, "a\x7f"],
        ),
    ],
)
def test_list_items_without_whitespace_or_controls(
    cls: type, field: str, valid: list[str], invalid: list[str]
) -> None:
    assert len(getattr(accepted(cls, {field: valid}), pascal_to_snake(field))) == len(valid)
    for bad in invalid:
        assert refused(cls, {field: ["fine", bad]}).path == f"{field}[1]", bad


def test_the_longest_model_name_ollama_accepts_fits() -> None:
    """host 350 + namespace, model and tag 80 each, a scheme and a digest: 673, the limit."""
    name = (
        "https://"
        + "h" * 350
        + "/"
        + "n" * 80
        + "/"
        + "m" * 80
        + ":"
        + "t" * 80
        + "@sha256:"
        + "0" * 64
    )
    assert len(name) == modelnames.MAX_LENGTH
    assert accepted(Frontend, {"RequiredModels": [name]}).required_models == (name,)


# -- Headers ----------------------------------------------------------------------------------


def test_headers_take_tokens_and_visible_values() -> None:
    headers = {
        "X-Api-Key": "s3cr3t",
        "Authorization": "Basic dXNlcjpwYXNz",
        "x_odd.name~!#$%&'*+^`|": "a value\twith tab and obs-text ü",
        "X-Empty": "",
        "X-" + "n" * 254: "v" * 8192,
    }
    assert dict(accepted(Backend, {"Headers": headers}).headers) == headers


@pytest.mark.parametrize(
    "name",
    [
        "X-A\r\nX-Evil",
        "X-A\n",
        "X A",
        "X:A",
        "",
        "X-é",
        "(x)",
        "x" * 257,
        "\x00",
    ],
)
def test_header_names_must_be_tokens(name: str) -> None:
    error = refused(Backend, {"Headers": {name: "v"}})
    assert error.path == "Headers" and "token" in str(error)


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "content-length",
        *(name.decode().upper() for name in sorted(HOP_BY_HOP)),
    ],
)
def test_headers_the_gateway_sets_itself_are_refused(name: str) -> None:
    """Every hop-by-hop field the proxy drops (one list, http1.rules), and the framing."""
    error = refused(Backend, {"Headers": {name: "v"}})
    assert error.path == f"Headers.{name}"


@pytest.mark.parametrize(
    "value", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", "a\x7fb", "a\x1bb", "a\x85b", "v" * 8193]
)
def test_header_values_are_visible_text_space_and_tab_at_most_8_kib(value: str) -> None:
    assert refused(Backend, {"Headers": {"X-A": value}}).path == "Headers.X-A"


def test_header_values_count_their_utf8_bytes() -> None:
    assert refused(Backend, {"Headers": {"X-A": "ü" * 4097}}).path == "Headers.X-A"


def test_at_most_64_header_fields_each_name_once() -> None:
    sixty_four = {f"X-{i}": "v" for i in range(64)}
    assert len(accepted(Backend, {"Headers": sixty_four}).headers) == 64
    error = refused(Backend, {"Headers": {**sixty_four, "X-64": "v"}})
    assert error.path == "Headers" and "at most 64" in str(error)
    assert refused(Backend, {"Headers": {"X-A": "1", "x-a": "2"}}).path == "Headers.x-a"


@pytest.mark.parametrize("headers", [{"X-A": 1}, {"X-A": None}, {"X-A": ["v"]}, ["X-A"], "X-A: v"])
def test_headers_must_be_an_object_of_strings(headers: object) -> None:
    assert refused(Backend, {"Headers": headers}).path.startswith("Headers")


# -- pinned properties (JsonObject) -----------------------------------------------------------


def nest(depth: int) -> dict[str, Any]:
    """An object nesting ``depth`` levels, itself counting as 1."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


@pytest.mark.parametrize("field", ["PinnedEmbeddingsProperties", "PinnedCompletionsProperties"])
def test_pinned_properties_nest_at_most_64_levels(field: str) -> None:
    assert accepted(Backend, {field: nest(64)})
    for depth in (65, 1000, 100_000):
        error = refused(Backend, {field: nest(depth)})
        assert error.path.startswith(field) and "64 levels" in str(error)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"options": {"temperature": float("nan")}}, ".options.temperature"),
        ({"options": {"temperature": float("inf")}}, ".options.temperature"),
        ({"stop": [1.0, float("-inf")]}, ".stop[1]"),
        ({"seed": 2**64}, ".seed"),
        ({"seed": -(2**63) - 1}, ".seed"),
        pytest.param({"seed": 10**5000}, ".seed", id="5000-digits"),
        ({"x": {1, 2}}, ".x"),
        ({"x": b"bytes"}, ".x"),
        ({"x": object()}, ".x"),
        ({1: "non-string key"}, ""),
    ],
)
def test_pinned_properties_hold_only_json_with_finite_numbers(
    value: dict[Any, Any], path: str
) -> None:
    error = refused(Frontend, {"PinnedCompletionsProperties": value})
    assert error.path == "PinnedCompletionsProperties" + path
    assert str(error).startswith(f"PinnedCompletionsProperties{path}: ")


def test_pinned_properties_name_the_path_of_a_nan_in_the_message() -> None:
    error = refused(Backend, {"PinnedCompletionsProperties": {"options": {"temperature": NAN}}})
    assert str(error).startswith(
        "PinnedCompletionsProperties.options.temperature: NaN is not allowed; expected"
    )


def test_pinned_properties_take_ordinary_json_up_to_64_kib() -> None:
    ordinary = {
        "options": {"temperature": 0.2, "num_ctx": 8192, "seed": -(2**63), "big": 2**64 - 1},
        "stop": ["\n", "</s>"],
        "keep_alive": None,
        "think": False,
        "format": {"type": "object", "properties": {"a": {"type": "string"}}},
    }
    assert (
        dict(
            accepted(
                Backend, {"PinnedCompletionsProperties": ordinary}
            ).pinned_completions_properties
        )
        == ordinary
    )
    assert accepted(Backend, {"PinnedEmbeddingsProperties": {"s": "x" * 65_000}})
    error = refused(Backend, {"PinnedEmbeddingsProperties": {"s": "x" * 65_536}})
    assert error.path == "PinnedEmbeddingsProperties" and "64 KiB" in str(error)


def test_pinned_properties_are_walked_without_recursion() -> None:
    wide_and_deep = {"a": [nest(63)["k"] for _ in range(100)], "b": nest(63)}
    assert accepted(Frontend, {"PinnedEmbeddingsProperties": wide_and_deep})


# -- Hostname -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hostname",
    [
        "localhost",
        "10.0.0.5",
        "::1",
        "fe80::1%eth0",
        "2001:db8::8a2e:370:7334",
        "gpu-1.rack_2.example.com",
        "localhost.",
        "bücher.example",
        "a" * 63 + ".example",
        "a" * 63,
        "abc." + ".".join(["a" * 63] * 3) + "." + "a" * 57,
    ],
)
def test_backend_hostnames_that_are_addresses_or_dns_names(hostname: str) -> None:
    assert accepted(Backend, {"Hostname": hostname}).hostname == hostname


@pytest.mark.parametrize(
    "hostname",
    [
        "*",
        "a b",
        "a\x01b",
        "a..b",
        ".a",
        "a" * 64 + ".example",
        "abcd." + ".".join(["a" * 63] * 3) + "." + "a" * 57,
        "a" * 64,
        "[::1]",
        "host:80",
        "host/path",
        "a$b",
        "\u2024",
        "xn--a.example\ud800",
        "a.\u00ad.b",
        "",
    ],
)
def test_backend_hostnames_that_would_break_every_request(hostname: str) -> None:
    """The gateway writes every request's ``Host`` from the hostname (the idna codec for a
    name that is not ASCII): a name it cannot write would break every request."""
    assert refused(Backend, {"Hostname": hostname}).path == "Hostname"


def test_a_frontend_hostname_is_star_or_a_host_name() -> None:
    assert accepted(Frontend, {"Hostname": "*"}).hostname == "*"
    assert accepted(Frontend, {"Hostname": "chat.example.com"}).hostname == "chat.example.com"
    assert accepted(Frontend, {"Hostname": "10.1.2.3"}).hostname == "10.1.2.3"
    for bad in ["*.example.com", "chat example", "a\nb", "a..b"]:
        assert refused(Frontend, {"Hostname": bad}).path == "Hostname", bad


# -- header-bound strings -----------------------------------------------------------------------


def test_bearer_token_is_visible_ascii_up_to_4096() -> None:
    assert accepted(Backend, {"BearerToken": "sk-" + "A" * 4093}).bearer_token
    for bad in ["sk abc", "sk\r\nX: y", "sk-ü", "x" * 4097]:
        assert refused(Backend, {"BearerToken": bad}).path == "BearerToken", bad


def test_querystring_and_health_check_url_are_visible_ascii_without_fragment() -> None:
    be = accepted(
        Backend, {"Querystring": "?api-version=2024-01&x=%20", "HealthCheckUrl": "/a?b=1"}
    )
    assert (be.querystring, be.health_check_url) == ("api-version=2024-01&x=%20", "/a?b=1")
    for bad in ["a=1#frag", "a=ü", "a b"]:
        assert refused(Backend, {"Querystring": bad}).path == "Querystring", bad
    for bad in ["/#frag", "/ü", "/a b", "health"]:
        assert refused(Backend, {"HealthCheckUrl": bad}).path == "HealthCheckUrl", bad


# -- numbers from the operator's JSON -----------------------------------------------------------


@pytest.mark.parametrize(
    "value", [BIG, float("inf"), float("nan"), 1e300], ids=["5000-digits", "inf", "nan", "1e300"]
)
@pytest.mark.parametrize(("cls", "field"), [(Backend, "Port"), (Frontend, "TimeoutMs")])
def test_integers_out_of_any_range_are_refused_by_name(
    cls: type, field: str, value: object
) -> None:
    error = refused(cls, {field: value})
    assert error.path == field and len(str(error)) < 200


@pytest.mark.parametrize(
    "value", [BIG, float("inf"), float("nan")], ids=["5000-digits", "inf", "nan"]
)
def test_a_number_where_a_string_belongs_is_refused_by_name(value: object) -> None:
    assert refused(Backend, {"Identifier": value}).path == "Identifier"


def test_a_record_read_back_from_its_wire_form_is_the_same() -> None:
    be = accepted(
        Backend,
        {
            "Hostname": "bücher.example",
            "Headers": {"X-A": "1"},
            "BearerToken": "t",
            "Labels": ["a"],
            "PinnedCompletionsProperties": {"options": {"temperature": 0.5}},
        },
    )
    assert parse_record(Backend, to_wire(be))[0] == be


def test_a_time_without_an_offset_is_utc_and_an_overflowing_one_is_a_field_error() -> None:
    """ExpiresUtc and the like: UTC whatever the server's time zone; a time that leaves the
    calendar when moved to UTC is refused like any bad value, never a 500."""
    from datetime import UTC, datetime

    from ollamaflow.records import ApiKey

    key, _ = from_wire(ApiKey, {"Identifier": "k", "ExpiresUtc": "2026-12-01T10:00:00"})
    assert key.expires_utc == datetime(2026, 12, 1, 10, tzinfo=UTC)
    for bad in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "tomorrow"):
        with pytest.raises(FieldError, match="ExpiresUtc"):
            from_wire(ApiKey, {"Identifier": "k", "ExpiresUtc": bad})
