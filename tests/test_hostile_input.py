"""Hostile input, generated: whatever a client or an admin sends, the answer is a clear 4xx in
the right dialect (or the backend's own answer), never a 5xx of ours, a traceback or an HTML
page; afterwards no slot is held, the database loads in a fresh daemon, and the daemon serves.

One daemon per half (admin, gateway) serves every example over real sockets, and the test that
follows each property checks that daemon afterwards; raw bytes go on the wire as generated (no
client library normalises them). ``OLLAMAFLOW_HYPOTHESIS_EXAMPLES`` sets how many examples each
property draws (CI: the default).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import h11
import pytest
import pytest_twisted
from harness import TOKEN, Collect, DaemonUnderTest, start_daemon, until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from ollamaflow.server.errors import error_path
from ollamaflow.store import Store
from ollamaflow.utctime import utc_clock

EXAMPLES = int(os.environ.get("OLLAMAFLOW_HYPOTHESIS_EXAMPLES", "150"))
HOSTILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- a raw HTTP/1.1 exchange -------------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def exchange(port: int, request: bytes) -> Answer:
    """Send ``request`` exactly as given (it asks the server to close) and parse the answer."""
    collector = Collect(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), collector)
    raw = await collector.done
    parser = h11.Connection(h11.CLIENT)
    method = request.split(b" ", 1)[0].decode("latin-1")
    parser.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(raw)
    parser.receive_data(b"")
    try:
        head = parser.next_event()
    except h11.RemoteProtocolError as e:
        raise AssertionError(f"{e}: to {request[:300]!r}: {raw[:300]!r}") from None
    assert isinstance(head, h11.Response), f"no response to {request[:200]!r}: {raw[:200]!r}"
    body = bytearray()
    while True:
        event = parser.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
        else:
            raise AssertionError(f"a cut-off response to {request[:200]!r}: {event!r}")
    headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
    return Answer(head.status_code, headers, bytes(body))


def http_request(
    method: str,
    target: bytes,
    body: bytes | None,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Connection: close")
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def assert_admin_error(answer: Answer) -> None:
    document = answer.json()
    assert set(document) == {"Error", "Message", "StatusCode", "Description"}, document
    assert document["StatusCode"] == answer.status


def assert_gateway_error(path: bytes, answer: Answer) -> None:
    document = answer.json()
    if path.startswith(b"/v1/"):
        assert set(document["error"]) == {"message", "type", "param", "code"}, document
    else:
        assert set(document) == {"error"} and isinstance(document["error"], str), document


# -- what strangers send -----------------------------------------------------------------------

#: Every kind of string: controls, lone surrogates, astral planes, very long ones.
texts = (
    st.text(max_size=40)
    | st.text(st.characters(codec=None, categories=None), max_size=20)
    | st.sampled_from(["", ".", "..", "a\r\nX: y", "\x00", "\ud800", "*", "a" * 5000])
)
numbers = (
    st.integers()
    | st.integers(min_value=10**40, max_value=10**4000)
    | st.floats()
    | st.sampled_from([float("nan"), float("inf"), -float("inf"), 2**31, 2**53 + 1, -1])
)
scalars = st.none() | st.booleans() | numbers | texts


def values(depth: int = 3) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
        max_leaves=12,
    )


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"x": value}
    return value


FRONTEND_FIELDS = [
    "Identifier", "Name", "Hostname", "TimeoutMs", "LoadBalancing", "BlockHttp10",
    "MaxRequestBodySize", "Backends", "RequiredModels", "LogRequestFull", "UseStickySessions",
    "StickySessionExpirationMs", "PinnedEmbeddingsProperties", "PinnedCompletionsProperties",
    "AllowEmbeddings", "AllowCompletions", "AllowRetries", "AllowModelManagement", "Active",
    "MaxQueueDepth", "QueueTimeoutMs",
]  # fmt: skip
BACKEND_FIELDS = [
    "Identifier", "Name", "Hostname", "Port", "Ssl", "UnhealthyThreshold", "HealthyThreshold",
    "HealthCheckMethod", "HealthCheckUrl", "MaxParallelRequests", "ModelParallelRequests",
    "RateLimitRequestsThreshold", "ApiFormat", "Labels", "PinnedEmbeddingsProperties",
    "PinnedCompletionsProperties", "AllowEmbeddings", "AllowCompletions", "BearerToken",
    "Querystring", "Headers", "Active", "Weight",
]  # fmt: skip


def casing(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper()])


def records(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with some of the record's fields (in any case) holding any value, plus junk."""
    field = st.sampled_from(fields).flatmap(casing)
    value = values() | st.sampled_from([deep(70), deep(2000)]) | st.just({"a": float("nan")})
    return st.dictionaries(field | texts, value, max_size=6)


def dump(value: Any) -> bytes:
    """JSON as Python writes it (NaN and Infinity included, as a careless client would)."""
    try:
        return json.dumps(value).encode()
    except (RecursionError, ValueError):
        return b"[" * 5000 + b"]" * 5000


admin_bodies = st.sampled_from(["frontends", "backends"]).flatmap(
    lambda kind: st.tuples(
        st.just(kind),
        records(FRONTEND_FIELDS if kind == "frontends" else BACKEND_FIELDS).map(dump)
        | st.binary(max_size=64),
    )
)


def encoded(text: str) -> bytes:
    return quote(text.encode("utf-8", "surrogatepass"), safe="").encode()


# -- the admin API -----------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture(scope="module")
async def admin_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[DaemonUnderTest, Path]]:
    folder = tmp_path_factory.mktemp("admin")
    made = DaemonUnderTest(await start_daemon(folder))
    yield made, folder
    await made.stop()


@HOSTILE
@given(
    body=admin_bodies,
    identifier=st.none() | texts,
    method=st.sampled_from(["PUT", "POST", "DELETE", "GET", "HEAD"]),
)
@pytest_twisted.ensureDeferred
async def test_the_admin_api_answers_hostile_input_with_a_json_4xx(
    admin_daemon: tuple[DaemonUnderTest, Path],
    body: tuple[str, bytes],
    identifier: str | None,
    method: str,
) -> None:
    """One generated request (what it created is deleted again)."""
    fleet, _ = admin_daemon
    kind, raw = body
    target = f"/v1.0/{kind}".encode()
    if identifier is not None:
        target += b"/" + encoded(identifier)
    headers = [(b"Authorization", b"Bearer " + TOKEN.encode())]
    request = http_request(method, target, raw if method in ("PUT", "POST") else None, headers)
    answer = await exchange(fleet.daemon.address.port, request)
    assert answer.status < 500, (request[:300], answer)
    if answer.status >= 400 and method != "HEAD":
        assert answer.headers["content-type"].startswith("application/json")
        assert_admin_error(answer)
    if answer.status in (200, 201) and method in ("PUT", "POST"):
        stored = answer.json()["Identifier"]
        cleanup = http_request("DELETE", target.rsplit(b"/", 1)[0] + b"/" + encoded(stored),
                               None, headers)  # fmt: skip
        if stored not in ("frontend1", "backend1"):
            await exchange(fleet.daemon.address.port, cleanup)


@pytest_twisted.ensureDeferred
async def test_afterwards_the_database_loads_in_a_fresh_daemon_which_serves(
    admin_daemon: tuple[DaemonUnderTest, Path],
) -> None:
    """After the property above, on its daemon: the probes of the issue, then a fresh daemon
    on the same database."""
    fleet, folder = admin_daemon
    port = fleet.daemon.address.port
    headers = [(b"Authorization", b"Bearer " + TOKEN.encode())]
    hostile = [
        (b"/v1.0/frontends/frontend1", {"RequiredModels": ["a" * 674]}),
        (b"/v1.0/frontends/frontend1", {"PinnedCompletionsProperties": {"t": float("nan")}}),
        (b"/v1.0/backends/backend1", {"Headers": {"X-A\r\nB": "c"}}),
        (b"/v1.0/backends/backend1", {"Hostname": "a\x01b"}),
        (b"/v1.0/backends", {"Identifier": "\ud800"}),
        (b"/v1.0/backends", {"Identifier": ".."}),
    ]
    for target, document in hostile:
        answer = await exchange(port, http_request("PUT", target, dump(document), headers))
        assert answer.status == 400, (target, document, answer)
        assert_admin_error(answer)
    store = await Store.open_sqlite(
        str(folder / "ollamaflow.db"), reactor=reactor, now=utc_clock(reactor.seconds)
    )
    try:
        snapshot = await store.snapshot()
    finally:
        await store.close()
    assert not snapshot.left_out, snapshot.left_out
    assert "frontend1" in [f.identifier for f in snapshot.frontends]
    fresh = await start_daemon(folder)
    try:
        port = fresh.address.port
        headers = [(b"Authorization", b"Bearer " + TOKEN.encode())]
        assert (await exchange(port, http_request("GET", b"/", None))).status == 200
        listed = await exchange(port, http_request("GET", b"/v1.0/frontends", None, headers))
        assert listed.status == 200 and len(listed.json()) == len(snapshot.frontends)
    finally:
        await fresh.stopService()


# -- the gateway -------------------------------------------------------------------------------

KNOWN_PATHS = [
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/tags",
    "/api/ps", "/api/version", "/api/pull", "/api/delete", "/api/copy", "/api/create",
    "/api/push", "/api/blobs/sha256:" + "0" * 64, "/v1/chat/completions", "/v1/completions",
    "/v1/embeddings", "/v1/models", "/v1/models/llama3", "/v1/responses", "/v1/messages",
    "/v1.0/backends", "/", "/metrics",
]  # fmt: skip


@st.composite
def paths(draw: st.DrawFn) -> bytes:
    """A known path, mangled the ways a path can be: percent-encoded letters, doubled slashes,
    dot segments, junk segments and escapes."""
    path = draw(st.sampled_from(KNOWN_PATHS))
    out = bytearray()
    for char in path.encode():
        choice = draw(st.integers(min_value=0, max_value=9))
        if choice == 0 and char != ord("/"):
            out += b"%%%02X" % char
        elif choice == 1 and char == ord("/"):
            out += b"//"
        elif choice == 2 and char == ord("/"):
            out += b"/./"
        else:
            out.append(char)
    if draw(st.booleans()):
        junk = draw(st.sampled_from([b"/..", b"/../x/..", b"%zz", b"%ff", b"%00", b"%2e%2e/"]))
        out += junk
    return bytes(out)


def bodies() -> st.SearchStrategy[bytes]:
    model = st.sampled_from(["llama3", "all-minilm", "LLAMA3:latest", "x" * 673]) | texts
    document = st.fixed_dictionaries(
        {"model": model},
        optional={
            "messages": st.just([{"role": "user", "content": "hi"}]),
            "prompt": texts,
            "input": st.lists(texts, max_size=3),
            "stream": st.booleans(),
            "Options": values(),
            "options": values(),
            "KEEP_ALIVE": values(),
            "MODEL": texts,
            "deep": st.sampled_from([deep(63), deep(65), deep(900)]),
        },
    )
    return document.map(dump) | st.binary(max_size=64) | values().map(dump)


@pytest_twisted.async_yield_fixture(scope="module")
async def gateway_fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DaemonUnderTest]:
    daemon = await start_daemon(tmp_path_factory.mktemp("gateway"))
    made = DaemonUnderTest(daemon)
    await made.add("sim0", num_parallel=8)
    await made.add("sim1", num_parallel=8)
    await made.serve(
        "sim0",
        "sim1",
        UseStickySessions=True,
        AllowModelManagement=False,
        PinnedCompletionsProperties={"options": {"seed": 7}, "keep_alive": -1},
        PinnedEmbeddingsProperties={"truncate": True},
    )
    yield made
    await made.stop()


@HOSTILE
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "HEAD", "PUT", "OPTIONS"]),
    target=paths(),
    body=bodies(),
    conversation=st.none() | st.binary(min_size=1, max_size=64).map(lambda b: b.hex().encode()),
    authorization=st.sampled_from([None, b"Bearer " + TOKEN.encode(), b"Bearer sk-x"]),
)
@pytest_twisted.ensureDeferred
async def test_the_gateway_answers_hostile_requests_without_an_error_of_its_own(
    gateway_fleet: DaemonUnderTest,
    method: str,
    target: bytes,
    body: bytes,
    conversation: bytes | None,
    authorization: bytes | None,
) -> None:
    headers = []
    if conversation is not None:
        headers.append((b"X-Conversation-Id", conversation))
    if authorization is not None:
        headers.append((b"Authorization", authorization))
    request = http_request(method, target, body if method != "GET" else None, headers)
    answer = await exchange(gateway_fleet.daemon.address.port, request)
    relayed = "x-ollamaflow-backend" in answer.headers
    ours_to_retry = answer.status in (429, 503) and "retry-after" in answer.headers
    assert answer.status < 500 or relayed or ours_to_retry, (request[:300], answer)
    if answer.status >= 400 and not relayed and method != "HEAD" and answer.body:
        path = error_path(target)  # decoded and normalised, as the server routes it
        if path.startswith(b"/v1.0"):
            assert_admin_error(answer)
            return
        assert answer.headers["content-type"].startswith("application/json"), answer
        assert_gateway_error(path, answer)  # in the dialect of the path


@pytest_twisted.ensureDeferred
async def test_afterwards_no_slot_is_held_and_the_daemon_serves(
    gateway_fleet: DaemonUnderTest,
) -> None:
    """After the property above, on its daemon: the probes of the issue, then nothing is held
    and a plain chat works."""
    port = gateway_fleet.daemon.address.port
    deep_chat = b'{"model": "llama3", "messages": [], "x": ' + b"[" * 990 + b"]" * 990 + b"}"
    for request in (
        http_request("POST", b"/api/chat", deep_chat),
        http_request("POST", b"/api/%63hat", b'{"model": "' + b"m" * 100_000 + b'"}'),
        http_request("POST", b"/api/chat", b'{"model": "llama3", "x": NaN}'),
    ):
        answer = await exchange(port, request)
        assert answer.status == 400, answer
        assert_gateway_error(b"/api/chat", answer)
    daemon = gateway_fleet.daemon
    await until(lambda: not any(s.active_requests for s in daemon.runtime.states.values()))
    assert not daemon.gateway.exchanges
    assert daemon.gateway.scheduler.depth("frontend1") == 0
    chat = b'{"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": false}'
    answer = await exchange(port, http_request("POST", b"/api/chat", chat))
    assert answer.status == 200, answer
    # What clients could write (RequiredModels, through pulls and deletes with the admin
    # token) reloads whole.
    store = await Store.open_sqlite(
        str(daemon.loaded.database_path), reactor=reactor, now=utc_clock(reactor.seconds)
    )
    try:
        assert not (await store.snapshot()).left_out
    finally:
        await store.close()
