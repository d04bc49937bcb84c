"""Who is asking, decided with no I/O: keys, admin tokens, RequireApiKey, and what a key may
do (frontends, models, model management)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ollamaflow import modelnames
from ollamaflow.apikeys import hash_secret, model_allowed, new_secret
from ollamaflow.credentials import Tokens
from ollamaflow.gateway.callers import (
    ADMIN_CALLER,
    ANONYMOUS_CALLER,
    Caller,
    Denied,
    KeyRing,
    identify,
    may_manage,
    may_use,
    named_models,
)
from ollamaflow.ratelimits.contracts import Limits
from ollamaflow.records import ApiKey, Frontend

SECRET = new_secret()
NOW = datetime(2026, 11, 30, tzinfo=UTC).timestamp()
ADMIN_TOKENS = Tokens.of(["admin-token"])
OPEN = Frontend(identifier="open")
CLOSED = Frontend(identifier="closed", require_api_key=True)


def keyed(**fields: object) -> dict[str, ApiKey]:
    key = ApiKey(identifier="team-a", secret_hash=hash_secret(SECRET), **fields)  # type: ignore[arg-type]
    return {key.secret_hash: key}


def who(authorization: bytes | None, frontend: Frontend, **fields: object) -> Caller | Denied:
    return identify(authorization, frontend, KeyRing(keyed(**fields).values()), ADMIN_TOKENS, NOW)


BEARER = b"Bearer " + SECRET.encode()


def test_an_open_frontend_serves_requests_without_a_key_or_with_a_placeholder() -> None:
    assert who(None, OPEN) is ANONYMOUS_CALLER
    assert who(b"Bearer ollama", OPEN) is ANONYMOUS_CALLER, "what an OpenAI SDK must send"
    assert who(b"Basic dXNlcjpwYXNz", OPEN) is ANONYMOUS_CALLER


def test_a_frontend_that_requires_a_key_refuses_none_and_others_with_401() -> None:
    for authorization in (None, b"Bearer ollama", b"Basic x", b"Bearer "):
        denied = who(authorization, CLOSED)
        assert isinstance(denied, Denied) and denied.status == 401, authorization


def test_a_valid_key_is_its_caller_with_its_limits_on_any_frontend() -> None:
    for frontend in (OPEN, CLOSED):
        caller = who(BEARER, frontend, requests_per_minute=5, priority=3)
        assert isinstance(caller, Caller) and caller.account == "team-a"
        assert caller.limits == Limits(5, 0, 0) and caller.priority == 3


def test_a_key_of_ours_that_is_not_valid_is_401_everywhere() -> None:
    unknown = b"Bearer " + new_secret().encode()
    for frontend in (OPEN, CLOSED):
        for authorization, fields in (
            (unknown, {}),
            (BEARER, {"active": False}),
            (BEARER, {"expires_utc": datetime(2026, 11, 29, tzinfo=UTC)}),
        ):
            denied = who(authorization, frontend, **fields)
            assert isinstance(denied, Denied) and denied.status == 401, (fields, frontend)
    later = who(BEARER, CLOSED, expires_utc=datetime(2026, 12, 1, tzinfo=UTC))
    assert isinstance(later, Caller)


def test_a_key_outside_its_frontends_is_403_naming_the_frontend() -> None:
    denied = who(BEARER, CLOSED, frontends=("open",))
    assert isinstance(denied, Denied) and denied.status == 403
    assert "'closed'" in denied.message and denied.caller.account == "team-a"
    assert isinstance(who(BEARER, OPEN, frontends=("open",)), Caller)


def test_an_admin_token_is_a_key_to_everything() -> None:
    assert who(b"Bearer admin-token", CLOSED) is ADMIN_CALLER
    assert may_manage(ADMIN_CALLER) is None and may_use(ADMIN_CALLER, ["any"]) is None


def test_model_management_needs_a_key_that_allows_it() -> None:
    caller = who(BEARER, OPEN)
    assert isinstance(caller, Caller)
    denied = may_manage(caller)
    assert denied is not None and denied.status == 403 and "manage models" in denied.message
    allowed = who(BEARER, OPEN, allow_model_management=True)
    assert isinstance(allowed, Caller) and may_manage(allowed) is None
    assert may_manage(ANONYMOUS_CALLER) is None, "the frontend's own rule applies"


def test_a_key_limited_to_models_is_403_for_others_naming_the_model() -> None:
    caller = who(BEARER, OPEN, models=("llama3", "qwen2.5*"))
    assert isinstance(caller, Caller)
    for allowed in (
        "llama3",
        "llama3:latest",
        "registry.ollama.ai/library/llama3:latest",
        "qwen2.5:7b",
        "QWEN2.5-coder:1.5b",
    ):
        assert may_use(caller, [allowed]) is None, allowed
    denied = may_use(caller, ["llama3", "mistral"])
    assert denied is not None and denied.status == 403 and "'mistral'" in denied.message


def test_the_models_an_operation_names_are_all_checked() -> None:
    assert named_models({"source": "llama3", "destination": "mine"}) == ["llama3", "mine"]
    assert named_models({"model": "a", "stream": False}) == ["a"]
    assert named_models({"name": 3}) == [] and named_models(None) == []


@pytest.mark.parametrize("pattern", ["*", "**", "*:*"])
def test_a_catch_all_pattern_allows_any_model(pattern: str) -> None:
    assert model_allowed([pattern], "anything:at-all")


@given(st.text(max_size=40).filter(lambda t: "*" not in t), st.text(max_size=40))
def test_a_pattern_matches_what_starts_with_its_text_whatever_the_characters(
    prefix: str, rest: str
) -> None:
    """Characters a regular expression would read ('.', '+', '(') stand for themselves."""
    assert model_allowed([prefix + "*"], prefix + rest)


def test_regex_characters_in_a_pattern_are_literal() -> None:
    assert not model_allowed(["a.c*"], "abc:latest")
    assert model_allowed(["a.c*"], "a.c:latest")
    assert not model_allowed(["(x|y)*"], "x")


@given(st.binary(max_size=300), st.booleans())
def test_any_authorization_is_a_caller_or_a_401_never_an_error(
    authorization: bytes, required: bool
) -> None:
    """Hostile values (huge, binary, our prefix with garbage) are answered, never raised."""
    frontend = CLOSED if required else OPEN
    for value in (authorization, b"Bearer " + authorization, b"Bearer ofk_" + authorization):
        found = who(value, frontend)
        assert isinstance(found, Caller) or (isinstance(found, Denied) and found.status == 401)


def test_a_key_ring_remembers_the_keys_it_matched_until_the_keys_change() -> None:
    """A key in use is parsed and hashed once; what is remembered still expires and is still
    held to its frontends; a ring built after a rotation or a delete knows none of the old
    secrets, and a secret that matched nothing is never remembered."""
    key = keyed(frontends=("open",), expires_utc=datetime(2026, 12, 1, tzinfo=UTC))
    ring = KeyRing(key.values())
    first = identify(BEARER, OPEN, ring, ADMIN_TOKENS, NOW)
    assert isinstance(first, Caller) and ring.seen == {BEARER: first}
    assert identify(BEARER, OPEN, ring, ADMIN_TOKENS, NOW) is first
    elsewhere = identify(BEARER, CLOSED, ring, ADMIN_TOKENS, NOW)
    assert isinstance(elsewhere, Denied) and elsewhere.status == 403
    later = datetime(2026, 12, 2, tzinfo=UTC).timestamp()
    expired = identify(BEARER, OPEN, ring, ADMIN_TOKENS, later)
    assert isinstance(expired, Denied) and expired.status == 401
    unknown = b"Bearer " + new_secret().encode()
    assert isinstance(identify(unknown, OPEN, ring, ADMIN_TOKENS, NOW), Denied)
    assert unknown not in ring.seen
    rotated = KeyRing([ApiKey(identifier="team-a", secret_hash=hash_secret(new_secret()))])
    assert isinstance(identify(BEARER, OPEN, rotated, ADMIN_TOKENS, NOW), Denied)


def reference_glob(pattern: str, name: str) -> bool:
    """``*`` as any run of characters, the rest literal, any case (a regex: fine when short)."""
    import re

    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, name, re.IGNORECASE | re.DOTALL) is not None


@given(st.text("ab*.", max_size=8), st.text("abAB.", max_size=10))
def test_a_pattern_matches_as_a_glob_would(pattern: str, name: str) -> None:
    """On the name as written or as Ollama displays it ("b" is "b:latest", which "*a*"
    matches)."""
    if "*" in pattern:
        try:
            shown = modelnames.display(name)
        except modelnames.InvalidModelName:
            shown = name
        expected = reference_glob(pattern, name) or reference_glob(pattern, shown)
        assert model_allowed([pattern], name) == expected


def test_a_pattern_with_many_stars_against_a_long_name_is_answered_at_once() -> None:
    """A key's patterns meet client-chosen names: matching must not backtrack (a regex took
    12 s for this one)."""
    assert not model_allowed(["*a*a*a*b"], "a" * 400)
    assert not model_allowed(["llama*:*b*q4*"], "llama" + ":" + "b" * 660)
