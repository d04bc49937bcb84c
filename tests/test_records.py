"""Frontend and Backend records: OllamaFlow 1.2's defaults and validation on the way in."""

from __future__ import annotations

import pytest

from ollamaflow.records import (
    ApiFormat,
    Backend,
    Frontend,
    HealthCheckMethod,
    LoadBalancing,
    parse_record,
)
from ollamaflow.wire import FieldError, MissingField, to_wire


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
        "Active": True,
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
        (Backend, {"Headers": {"X-A": 1}}, "Headers"),
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
