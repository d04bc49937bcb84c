"""The gateway's pure parts: classes, pinned-property merge, headers, candidates and order."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from twisted.web.http_headers import Headers

from ollamaflow.catalog import Catalog
from ollamaflow.credentials import NO_TOKENS, Tokens
from ollamaflow.gateway import headers as hdrs
from ollamaflow.gateway.balancer import (
    Balancer,
    NoCandidate,
    Rotation,
    StickyPins,
    candidates,
    stick,
)
from ollamaflow.gateway.classify import RequestClass, classify, manages_models
from ollamaflow.gateway.completed import RequestIds
from ollamaflow.gateway.pinning import deep_merge
from ollamaflow.records import Backend, Frontend, LoadBalancing
from ollamaflow.runtime import Runtime
from ollamaflow.store import Snapshot


def test_request_classes() -> None:
    for path in [b"/api/embed", b"/api/embeddings", b"/v1/embeddings", b"/api/embed/"]:
        assert classify(path) is RequestClass.EMBEDDINGS
    for path in [
        b"/api/generate",
        b"/api/chat",
        b"/v1/completions",
        b"/v1/chat/completions",
        b"/v1/responses",
        b"/v1/messages",
    ]:
        assert classify(path) is RequestClass.COMPLETIONS
    for path in [b"/api/tags", b"/api/pull", b"/v1/models", b"/", b"/api/chatty"]:
        assert classify(path) is RequestClass.OTHER


def test_deep_merge_objects_recursively_arrays_replaced_pins_win() -> None:
    body = {"model": "m", "options": {"temperature": 0.9, "stop": ["a"]}, "keep": 1}
    pinned = {"options": {"temperature": 0.1, "stop": ["z"], "num_ctx": 8192}, "model": "pin"}
    assert deep_merge(body, pinned) == {
        "model": "pin",
        "options": {"temperature": 0.1, "stop": ["z"], "num_ctx": 8192},
        "keep": 1,
    }
    assert body["options"] == {"temperature": 0.9, "stop": ["a"]}, "the input is not changed"
    assert deep_merge({"options": 3}, {"options": {"a": 1}}) == {"options": {"a": 1}}


def test_hop_by_hop_headers_are_stripped_and_forwarding_headers_added() -> None:
    client = [
        (b"Host", b"flow.example:43411"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"x-secret-hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Content-Length", b"12"),
        (b"X-Forwarded-For", b"10.1.1.1"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"spoofed"),
        (b"Authorization", b"Bearer client"),
        (b"X-App", b"kept"),
        (b"x-tenant", b"red"),
    ]
    backend = Backend(identifier="b", bearer_token="backend-secret", headers={"X-Tenant": "blue"})
    out = Headers()
    for name, value in hdrs.to_backend(
        client, backend, client_ip="127.0.0.9", host=b"flow.example:43411", proto=b"http"
    ):
        out.addRawHeader(name, value)
    names = {name.lower() for name, _ in out.getAllRawHeaders()}
    for gone in [
        b"host",
        b"connection",
        b"keep-alive",
        b"x-secret-hop",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"proxy-authorization",
        b"content-length",
    ]:
        assert gone not in names, gone
    assert out.getRawHeaders(b"x-forwarded-for") == [b"10.1.1.1, 127.0.0.9"]
    assert out.getRawHeaders(b"x-forwarded-host") == [b"flow.example:43411"]
    assert out.getRawHeaders(b"x-forwarded-proto") == [b"http"]
    assert out.getRawHeaders(b"authorization") == [b"Bearer backend-secret"]
    assert out.getRawHeaders(b"x-tenant") == [b"blue"]
    assert out.getRawHeaders(b"x-app") == [b"kept"]


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer ofk_" + b"A" * 43, b"bearer  ofk_unknown", b"BEARER ofk_x"],
)
def test_an_api_key_of_ours_never_reaches_a_backend(authorization: bytes) -> None:
    """Valid or not, a key of ours stays here; another token (a backend's own) goes on."""
    backend = Backend(identifier="b")
    client = [(b"Authorization", authorization), (b"X-App", b"kept")]
    out = hdrs.to_backend(client, backend, client_ip="10.0.0.1", host=None, proto=b"http")
    assert [v for n, v in out if n.lower() == b"authorization"] == []
    passed = [(b"Authorization", b"Bearer sk-openai-upstream")]
    out = hdrs.to_backend(passed, backend, client_ip="10.0.0.1", host=None, proto=b"http")
    assert [v for n, v in out if n.lower() == b"authorization"] == [b"Bearer sk-openai-upstream"]


def test_operator_header_values_cannot_break_the_request_head() -> None:
    backend = Backend(identifier="b", headers={"X-Tenant": "blue\r\nX-Evil: 1"})
    out = hdrs.to_backend([], backend, client_ip="127.0.0.1", host=None, proto=b"http")
    assert (b"X-Tenant", b"blue  X-Evil: 1") in out


def _catalog(*backends: Backend, **frontend: Any) -> tuple[Catalog, Frontend]:
    fe = Frontend(identifier="f", backends=tuple(b.identifier for b in backends), **frontend)
    return Catalog.build(Snapshot(1, (fe,), backends)), fe


def _healthy(runtime: Runtime, *identifiers: str) -> None:
    for i in identifiers:
        runtime.state(i).succeeded(_now(), threshold=1)


def _now() -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC)


def test_candidates_filter_and_explain_why_none() -> None:
    a = Backend(identifier="a", labels=("gpu",))
    b = Backend(identifier="b", allow_embeddings=False)
    c = Backend(identifier="c", active=False)
    catalog, fe = _catalog(a, b, c)
    runtime = Runtime()
    found = candidates(catalog, runtime, fe, RequestClass.OTHER, None)
    assert isinstance(found, NoCandidate) and "none of its 2 backends is healthy" in found.message
    _healthy(runtime, "a", "b", "c")
    assert candidates(catalog, runtime, fe, RequestClass.OTHER, None) == [a, b]
    assert candidates(catalog, runtime, fe, RequestClass.EMBEDDINGS, None) == [a]
    assert candidates(catalog, runtime, fe, RequestClass.OTHER, "gpu") == [a]
    none = candidates(catalog, runtime, fe, RequestClass.OTHER, "tpu")
    assert isinstance(none, NoCandidate) and "label 'tpu'" in none.message
    catalog2, fe2 = _catalog(b)
    none = candidates(catalog2, runtime, fe2, RequestClass.EMBEDDINGS, None)
    assert isinstance(none, NoCandidate) and "allows embeddings" in none.message
    catalog3, fe3 = _catalog(c)
    none = candidates(catalog3, runtime, fe3, RequestClass.OTHER, None)
    assert isinstance(none, NoCandidate) and "no active backends" in none.message


def idle(_: str) -> int:
    return 0


def test_round_robin_is_exactly_even_and_rotates_the_rest_for_retries() -> None:
    backends = [Backend(identifier=n) for n in "abc"]
    _, fe = _catalog(*backends, load_balancing=LoadBalancing.ROUND_ROBIN)
    balancer = Balancer()
    firsts = [balancer.order(fe, backends, idle)[0].identifier for _ in range(300)]
    assert {n: firsts.count(n) for n in "abc"} == {"a": 100, "b": 100, "c": 100}
    assert [b.identifier for b in balancer.order(fe, backends, idle)] == ["a", "b", "c"]
    assert [b.identifier for b in balancer.order(fe, backends, idle)] == ["b", "c", "a"]


def test_weighted_round_robin_is_smooth_and_exact() -> None:
    backends = [Backend(identifier="a", weight=3), Backend(identifier="b"), Backend(identifier="c")]
    _, fe = _catalog(*backends, load_balancing=LoadBalancing.ROUND_ROBIN)
    balancer = Balancer()
    firsts = [balancer.order(fe, backends, idle)[0].identifier for _ in range(50)]
    assert {n: firsts.count(n) for n in "abc"} == {"a": 30, "b": 10, "c": 10}
    assert firsts[:5] == ["a", "b", "a", "c", "a"], "interleaved, not bunched"


def test_round_robin_sees_weights_change_with_the_candidate_list() -> None:
    plain = [Backend(identifier=n) for n in "ab"]
    _, fe = _catalog(*plain, load_balancing=LoadBalancing.ROUND_ROBIN)
    balancer = Balancer()
    assert [balancer.order(fe, plain, idle)[0].identifier for _ in range(4)] == list("abab")
    weighted = [Backend(identifier="a", weight=3), Backend(identifier="b")]
    firsts = [balancer.order(fe, weighted, idle)[0].identifier for _ in range(8)]
    assert firsts.count("a") == 6, "a new list (weights changed) is looked at again"


def test_least_outstanding_picks_the_least_loaded_and_breaks_ties_round_robin() -> None:
    backends = [Backend(identifier=n) for n in "abc"]
    _, fe = _catalog(*backends)
    assert fe.load_balancing is LoadBalancing.LEAST_OUTSTANDING, "the default for new frontends"
    balancer = Balancer()
    loads = {"a": 2, "b": 0, "c": 1}
    assert [b.identifier for b in balancer.order(fe, backends, loads.__getitem__)] == [
        "b",
        "c",
        "a",
    ]
    firsts = [balancer.order(fe, backends, idle)[0].identifier for _ in range(30)]
    assert {n: firsts.count(n) for n in "abc"} == {"a": 10, "b": 10, "c": 10}


def test_least_outstanding_honours_weights() -> None:
    backends = [Backend(identifier="big", weight=4), Backend(identifier="small")]
    _, fe = _catalog(*backends)
    loads = {"big": 3, "small": 1}
    assert Balancer().order(fe, backends, loads.__getitem__)[0].identifier == "big"


def test_least_outstanding_with_many_backends_compares_two_at_random() -> None:
    backends = [Backend(identifier=f"b{i}") for i in range(100)]
    _, fe = _catalog(*backends)
    loads = {b.identifier: 5 for b in backends} | {"b42": 0}
    balancer = Balancer(rng=random.Random(3))
    picks = [balancer.order(fe, backends, loads.__getitem__)[0].identifier for _ in range(500)]
    assert all(loads[p] == 5 or p == "b42" for p in picks)
    assert picks.count("b42") > 5, "the idle one wins whenever it is drawn"
    ordered = balancer.order(fe, backends, loads.__getitem__)
    assert sorted(b.identifier for b in ordered) == sorted(loads), "the rest for retries"


def test_above_eight_the_backend_that_finished_last_is_one_of_the_two_and_wins_ties() -> None:
    backends = [Backend(identifier=f"b{i}") for i in range(100)]
    _, fe = _catalog(*backends)
    balancer = Balancer(rng=random.Random(5))
    for finished in (3, 9, 7):
        balancer.finished(fe.identifier, backends[finished])
    firsts = [balancer.order(fe, backends, idle)[0].identifier for _ in range(3)]
    assert firsts == ["b7", "b9", "b3"], "all idle: where a connection was released latest"
    loads = {b.identifier: 0 for b in backends} | {"b7": 1}
    for _ in range(50):
        balancer.finished(fe.identifier, backends[7])
        chosen = balancer.order(fe, backends, loads.__getitem__)[0].identifier
        assert chosen != "b7", "busier than the random draw: the random draw wins"
    balancer.finished(fe.identifier, backends[7])
    ordered = balancer.order(fe, backends, idle)
    assert ordered[0].identifier == "b7"
    assert sorted(b.identifier for b in ordered) == sorted(b.identifier for b in backends)


def test_power_of_two_choices_with_memory_spreads_requests_that_overlap() -> None:
    """64 requests in flight over 100 backends: never two on one backend while the other
    draw is idle, however the memory steers."""
    backends = [Backend(identifier=f"b{i}") for i in range(100)]
    _, fe = _catalog(*backends)
    balancer = Balancer(rng=random.Random(11))
    loads = {b.identifier: 0 for b in backends}
    in_flight: list[Backend] = []
    rng = random.Random(3)
    for _ in range(5000):
        if len(in_flight) == 64:
            done = in_flight.pop(rng.randrange(64))
            loads[done.identifier] -= 1
            balancer.finished(fe.identifier, done)
        chosen = balancer.order(fe, backends, loads.__getitem__)[0]
        loads[chosen.identifier] += 1
        in_flight.append(chosen)
    assert max(loads.values()) <= 2
    assert sum(1 for n in loads.values() if n) >= 50


def test_the_memory_is_ignored_when_that_backend_is_no_longer_a_candidate() -> None:
    backends = [Backend(identifier=f"b{i}") for i in range(20)]
    _, fe = _catalog(*backends)
    balancer = Balancer(rng=random.Random(2))
    balancer.finished(fe.identifier, Backend(identifier="gone"))
    picks = {balancer.order(fe, backends, idle)[0].identifier for _ in range(200)}
    assert len(picks) > 10, "two random draws, as without memory"


def test_a_rotation_reads_the_list_round_from_its_start_without_copying_it() -> None:
    backends = [Backend(identifier=n) for n in "abcd"]
    rotation = Rotation(backends, 2)
    assert [b.identifier for b in rotation] == ["c", "d", "a", "b"]
    assert [rotation[i].identifier for i in range(4)] == ["c", "d", "a", "b"]
    assert rotation[-1].identifier == "b" and len(rotation) == 4
    assert [b.identifier for b in rotation[1:3]] == ["d", "a"]
    assert [b.identifier for b in stick(rotation, "a")] == ["a", "c", "d", "b"]
    with pytest.raises(IndexError):
        rotation[4]
    assert rotation.backends is backends


def test_random_order_uses_every_backend() -> None:
    backends = [Backend(identifier=n) for n in "abc"]
    _, fe = _catalog(*backends, load_balancing=LoadBalancing.RANDOM)
    balancer = Balancer(rng=random.Random(7))
    firsts = {balancer.order(fe, backends, idle)[0].identifier for _ in range(100)}
    assert firsts == {"a", "b", "c"}


def test_sticky_pins_slide_expire_and_are_pruned() -> None:
    pins = StickyPins()
    pins.pin("f", b"client", "b", until=100.0)
    assert pins.lookup("f", b"client", now=99.0) == "b"
    assert pins.lookup("f", b"client", now=100.0) is None, "expired pins are not used"
    pins.pin("f", b"c1", "a", until=10.0)
    pins.pin("f", b"c2", "b", until=50.0)
    assert pins.sweep(now=20.0) == 1 and len(pins) == 1
    catalog, _ = _catalog(Backend(identifier="a"))
    pins.prune(catalog)
    assert len(pins) == 0, "a pin to a backend the frontend no longer lists goes"
    backends = [Backend(identifier=n) for n in "abc"]
    assert [b.identifier for b in stick(backends, "c")] == ["c", "a", "b"]
    assert stick(backends, "z") == backends


def test_sticky_pins_are_bounded_in_count_and_in_bytes() -> None:
    pins = StickyPins(limit=3)
    huge = b"x" * 60_000
    for n in range(5):
        pins.pin("f", huge + b"%d" % n, "a", until=100.0)
    assert len(pins) == 3, "beyond the limit the least recently pinned pin goes"
    assert pins.lookup("f", huge + b"0", now=1.0) is None
    assert pins.lookup("f", huge + b"4", now=1.0) == "a"
    pins.pin("f", huge + b"2", "b", until=100.0)  # renewed: now the most recent
    pins.pin("f", b"new", "c", until=100.0)
    assert pins.lookup("f", huge + b"2", now=1.0) == "b", "a renewed pin is kept"
    assert pins.lookup("f", huge + b"3", now=1.0) is None, "the least recent one went"
    assert all(len(client) == 16 for _, client in pins._pins), "keys are fixed-size digests"


def test_a_pinned_key_takes_out_every_case_variant_of_itself() -> None:
    body = {"model": "a", "MODEL": "b", "Options": {"seed": 1, "num_ctx": 9}, "stream": True}
    pinned = {"model": "p", "options": {"seed": 7}, "keep_alive": -1}
    merged = deep_merge(body, pinned)
    assert merged == {
        "model": "p",
        "options": {"seed": 7, "num_ctx": 9},
        "stream": True,
        "keep_alive": -1,
    }, "the variant Go would have used is merged with the pin, the others dropped"
    nested = deep_merge({"options": {"Seed": 1, "seed": 2}}, {"options": {"seed": 7}})
    assert nested == {"options": {"seed": 7}}


@pytest.mark.parametrize(
    ("method", "path", "managing"),
    [
        (b"POST", b"/api/pull", True),
        (b"DELETE", b"/api/delete", True),
        (b"POST", b"/api/copy", True),
        (b"POST", b"/api/create/", True),
        (b"POST", b"/api/push", True),
        (b"POST", b"/api/blobs/sha256:00", True),
        (b"HEAD", b"/api/blobs/sha256:00", False),
        (b"POST", b"/api/chat", False),
        (b"POST", b"/api/show", False),
        (b"GET", b"/api/tags", False),
    ],
)
def test_which_requests_manage_models(method: bytes, path: bytes, managing: bool) -> None:
    assert manages_models(method, path) is managing


def test_our_tokens_are_recognised_in_any_spelling_of_bearer() -> None:
    tokens = Tokens.of(["admin-token"], [None, "metrics-token"])
    for header in (b"Bearer admin-token", b"bearer  admin-token ", b"BEARER metrics-token"):
        assert tokens.match(header), header
    for refused in (None, b"", b"Bearer", b"Basic admin-token", b"Bearer admin", b"Bearer x"):
        assert not tokens.match(refused), refused
    assert not NO_TOKENS.match(b"Bearer ")


def test_usage_is_read_from_the_end_of_a_completion() -> None:
    from ollamaflow.gateway.completed import Completed, usage

    stream = (
        b'{"model":"m","response":"a","done":false}\n'
        b'{"model":"m","response":"","done":true,"prompt_eval_count":9,'
        b'"eval_count":42,"eval_duration":2000000000}\n'
    )
    assert usage(stream) == (42, 2_000_000_000, 9)
    assert usage(b'{"done":true, "eval_count": 7, "eval_duration": 7000}') == (7, 7000, None)
    sse = (
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":11}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage(sse) == (11, None, 3)
    assert usage(b'{"embeddings": [[0.1]]}') == (None, None, None)
    # Embeddings report the prompt only: Ollama's prompt_eval_count, OpenAI's usage.
    assert usage(b'{"embeddings": [[0.1]], "prompt_eval_count": 5}') == (None, None, 5)
    assert usage(b'{"data": [], "usage": {"prompt_tokens": 4, "total_tokens": 4}}') == (
        None,
        None,
        4,
    )
    record = Completed(
        request_id="r", client="c", frontend="f", backend="b", method="POST", path="/api/chat",
        model="m", status=200, outcome="ok", bytes=1, queued=0.0, ttfb=0.1, duration=1.0,
        retries=0, eval_count=42, eval_duration_ns=2_000_000_000,
    )  # fmt: skip
    assert record.tokens_per_second == 21.0


def test_request_ids_are_distinct_version_4_uuids() -> None:
    ids = RequestIds()
    made = [ids() for _ in range(600)]  # more than one pool of random bytes
    assert len(set(made)) == 600
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
