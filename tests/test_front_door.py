"""The gateway as a front door: each probe of issue 14 sent as an attacker sent it, over real
sockets, against a daemon with simulated Ollama servers behind it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from harness import DaemonUnderTest, Http, Reply, start_daemon, until
from listening import stop_listening
from recorder import Recorder, start_recorder
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseFailed

from ollamaflow import modelnames
from ollamaflow.gateway import exchange, outbound
from ollamaflow.gateway.balancer import Balancer, StickyPins
from ollamaflow.gateway.deadlines import Deadlines
from ollamaflow.server.request import ConnectionRequest
from ollamaflow.upstream import BackendClient


@pytest_twisted.async_yield_fixture
async def fleet(tmp_path: Path) -> AsyncIterator[DaemonUnderTest]:
    daemon = await start_daemon(tmp_path)
    made = DaemonUnderTest(daemon)
    await made.add("sim0", num_parallel=8)
    await made.add("sim1", num_parallel=8)
    await made.serve("sim0", "sim1")
    yield made
    await made.stop()


def client(fleet: DaemonUnderTest) -> Http:
    """An unauthenticated client, as anyone on the network is."""
    return Http(fleet.url, token=None)


def chat(model: str = "llama3", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        **extra,
    }


def nested(depth: int) -> str:
    """JSON text of arrays and objects ``depth`` levels deep (the outermost counts); built as
    text, since Python's own encoder gives up near 1,000 levels."""
    opening = "".join('{"x":' if level % 2 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 else "]" for level in reversed(range(depth)))
    return opening + "1" + closing


def chat_text(deep: str) -> bytes:
    """A chat request whose ``deep`` field holds the JSON text ``deep``."""
    return json.dumps(chat(deep=0)).replace('"deep": 0', f'"deep": {deep}').encode()


def in_flight(fleet: DaemonUnderTest) -> dict[str, int]:
    return {n: s.active_requests for n, s in fleet.daemon.runtime.states.items()}


async def no_slot_held(fleet: DaemonUnderTest) -> None:
    await until(lambda: not any(in_flight(fleet).values()), what=f"slots {in_flight(fleet)}")


def ollama_error(reply: Reply) -> str:
    document = reply.json
    assert set(document) == {"error"} and isinstance(document["error"], str), document
    return str(document["error"])


def openai_error(reply: Reply) -> str:
    error = reply.json["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return str(error["message"])


def required_models(fleet: DaemonUnderTest) -> tuple[str, ...]:
    return fleet.daemon.registry.catalog.frontends["frontend1"].required_models


# -- 1. one request must not make the database unloadable --------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", ["a" * 513, "h" * 300 + "/" + "n" * 300, "x" * 5_000_000])
async def test_a_pull_of_a_name_ollama_refuses_is_400_and_stores_nothing(
    fleet: DaemonUnderTest, name: str, tmp_path: Path
) -> None:
    reply = await client(fleet).request("POST", "/api/pull", {"model": name})
    assert reply.status == 400
    assert len(ollama_error(reply)) < 400, "the name is not echoed whole"
    assert required_models(fleet) == ()
    put = await fleet.http.put("/v1.0/frontends/frontend1", {"Backends": ["sim0", "sim1"]})
    assert put.status == 200, "admin writes still work"
    snapshot = await fleet.daemon.store.snapshot()
    assert [f.identifier for f in snapshot.frontends] == ["frontend1"]


@pytest_twisted.ensureDeferred
async def test_a_pull_that_failed_on_every_backend_does_not_join_required_models(
    fleet: DaemonUnderTest,
) -> None:
    longest = "h" * 350 + "/" + "n" * 80 + "/" + "m" * 80 + ":" + "t" * 80
    for name in ("nonexistent-model", longest):
        reply = await client(fleet).request("POST", "/api/pull", {"model": name, "stream": False})
        assert reply.status == 500
        assert "failed on" in ollama_error(reply)
    assert required_models(fleet) == ()


@pytest_twisted.ensureDeferred
async def test_a_pull_that_succeeded_joins_required_models_even_if_the_client_left(
    fleet: DaemonUnderTest,
) -> None:
    for sim in fleet.sims.values():
        await sim.configure(pull_time=0.3)
    body = json.dumps({"model": "mistral"}).encode()
    head = await leave_after_first_bytes(
        fleet,
        b"POST /api/pull HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert head.startswith(b"HTTP/1.1 200"), head
    assert required_models(fleet) == (), "not required before any backend has it"
    await until(lambda: required_models(fleet) == ("mistral",), what="mistral required")


class _Leaver(Protocol):
    """Sends a request, and hangs up as soon as the first bytes of the answer arrive."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.first: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]
        if not self.first.called:
            self.first.callback(data)


async def leave_after_first_bytes(fleet: DaemonUnderTest, request: bytes) -> bytes:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", fleet.daemon.address.port)
    leaver = _Leaver(request)
    await connectProtocol(endpoint, leaver)
    return await leaver.first


# -- 2. a body nested too deep: 400, and no slot leaks -----------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("depth", [65, 990, 100_000])
async def test_a_body_nested_deeper_than_64_levels_is_refused_in_the_clients_dialect(
    fleet: DaemonUnderTest, depth: int
) -> None:
    await fleet.http.put(
        "/v1.0/frontends/frontend1",
        {"Backends": ["sim0", "sim1"], "PinnedCompletionsProperties": {"options": {"seed": 1}}},
    )
    raw = chat_text(nested(depth))
    native = await client(fleet).request("POST", "/api/chat", raw=raw)
    assert native.status == 400 and "deeper than 64" in ollama_error(native)
    openai = await client(fleet).request("POST", "/v1/chat/completions", raw=raw)
    assert openai.status == 400 and "deeper than 64" in openai_error(openai)
    await no_slot_held(fleet)
    ok = await client(fleet).request("POST", "/api/chat", raw=chat_text(nested(63)))
    assert ok.status == 200, ok.body


# -- a slot, once taken, is given back on every path -------------------------------------------


class Boom(Exception):
    """The bug injected at one step of a request's way through the gateway."""


def raise_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int) -> list[int]:
    """Make ``owner.name`` raise :class:`Boom` on its ``call``-th call (1-based) only."""
    original = getattr(owner, name)
    calls = [0]

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise Boom(f"{name} failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    return calls


#: Every step between taking a slot and giving it back, by what it calls.
STEPS: dict[str, tuple[Any, str]] = {
    "merge the pins": (outbound, "deep_merge"),
    "encode the body": (outbound.jsonlimits, "dumps"),
    "build the headers": (exchange.hdrs, "forwarded"),
    "send": (BackendClient, "send"),
    "arm the response deadline": (Deadlines, "add"),
    "copy the response headers": (exchange.hdrs, "to_client"),
    "pin the client": (StickyPins, "pin"),
    "relay the body": (ConnectionRequest, "write"),
    "remember the backend": (Balancer, "finished"),
}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("queued", [False, True], ids=["direct", "from-the-queue"])
@pytest.mark.parametrize("step", list(STEPS))
async def test_a_bug_at_any_step_answers_500_and_gives_the_slot_back(
    fleet: DaemonUnderTest, monkeypatch: pytest.MonkeyPatch, step: str, queued: bool
) -> None:
    await fleet.http.put(
        "/v1.0/frontends/frontend1",
        {
            "Backends": ["sim0"],
            "UseStickySessions": True,
        },
    )
    await fleet.http.put(
        "/v1.0/backends/sim0",
        {
            "Hostname": "127.0.0.1",
            "Port": fleet.sims["sim0"].port,
            "MaxParallelRequests": 1,
            # The backend's pins are merged once the slot is taken (the frontend's, before).
            "PinnedCompletionsProperties": {"options": {"seed": 1}},
        },
    )
    await until(lambda: fleet.daemon.runtime.state("sim0").healthy)
    owner, name = STEPS[step]
    request = json.dumps(chat()).encode()
    if queued:
        # The only slot is taken by hand; the probe waits for it, then gets it handed over.
        scheduler = fleet.daemon.gateway.scheduler
        sim0 = fleet.daemon.registry.catalog.backends["sim0"]
        scheduler.acquire(sim0, None)
        probe = treq.post(fleet.url + "/api/chat", request, persistent=False)
        await until(lambda: scheduler.depth("frontend1") == 1, what="the probe waits")
        raise_on_call(monkeypatch, owner, name, call=1)
        scheduler.release(sim0, None)
    else:
        raise_on_call(monkeypatch, owner, name, call=1)
        probe = treq.post(fleet.url + "/api/chat", request, persistent=False)
    try:
        response = await probe
        body = await response.content()
    except ResponseFailed:
        status = None  # the response had begun: cut off, never complete-looking
    else:
        status = response.code
        assert status in (200, 500), body
        if status == 500:
            assert "internal error" in json.loads(body)["error"]
    await no_slot_held(fleet)
    monkeypatch.undo()
    after = await client(fleet).request("POST", "/api/chat", chat())
    assert after.status == 200, "the backend still takes requests"
    assert status != 200 or step in ("pin the client", "remember the backend"), (
        f"{step}: the bug was not hit"
    )


# -- 3. percent-encoding must not bypass policy ------------------------------------------------


@pytest_twisted.async_yield_fixture
async def recorded(fleet: DaemonUnderTest) -> AsyncIterator[Recorder]:
    recorder = start_recorder(reactor, body=b'{"done": true}')
    host, port = recorder.address
    backend = {"Identifier": "rec", "Hostname": host, "Port": port}
    assert (await fleet.http.put("/v1.0/backends", backend)).status == 201
    pinned = {"model": "pinned", "options": {"seed": 7}, "keep_alive": -1}
    frontend = {
        "Backends": ["rec"],
        "PinnedCompletionsProperties": pinned,
        "PinnedEmbeddingsProperties": {"truncate": True},
    }
    assert (await fleet.http.put("/v1.0/frontends/frontend1", frontend)).status == 200
    await until(lambda: fleet.daemon.runtime.state("rec").healthy, what="rec is healthy")
    yield recorder
    assert recorder.port is not None
    await stop_listening(recorder.port)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("sent", "classified"),
    [
        ("/api/%63hat", "/api/chat"),
        ("/v1/chat/%63ompletions", "/v1/chat/completions"),
        ("/api/%65mbed", "/api/embed"),
        ("/api//chat", "/api/chat"),
        ("/api/./x/../chat", "/api/chat"),
        ("/api%2Fchat", "/api/chat"),
    ],
)
async def test_an_encoded_path_is_classified_and_forwarded_decoded(
    fleet: DaemonUnderTest, recorded: Recorder, sent: str, classified: str
) -> None:
    reply = await client(fleet).request("POST", sent, chat())
    assert reply.status == 200, reply.body
    seen = recorded.seen[-1]
    assert seen.uri == classified.encode(), "the path forwarded is the path classified"
    forwarded = json.loads(seen.body)
    if classified.endswith("embed"):
        assert forwarded["truncate"] is True
    else:
        assert forwarded["options"] == {"seed": 7}, "pinned properties applied"
    flags = {"AllowCompletions": False, "AllowEmbeddings": False}
    await fleet.http.put("/v1.0/frontends/frontend1", {"Backends": ["rec"], **flags})
    refused = await client(fleet).request("POST", sent, chat())
    assert refused.status == 403, refused.body


# -- 4. a pinned key removes every case variant of itself --------------------------------------


@pytest_twisted.ensureDeferred
async def test_pinned_keys_cannot_be_overridden_by_case(
    fleet: DaemonUnderTest, recorded: Recorder
) -> None:
    body = {
        "model": "llama3",
        "MODEL": "mine",
        "Model": "mine too",
        "messages": [],
        "Options": {"seed": 1, "num_ctx": 4096},
        "options": {"temperature": 2},
        "Keep_Alive": "0",
        "KEEP_ALIVE": 0,
    }
    reply = await client(fleet).request("POST", "/api/chat", body)
    assert reply.status == 200, reply.body
    forwarded = json.loads(recorded.seen[-1].body)
    keys = sorted(k.lower() for k in forwarded)
    assert keys == ["keep_alive", "messages", "model", "options"], forwarded
    assert forwarded["model"] == "pinned" and forwarded["keep_alive"] == -1
    assert forwarded["options"]["seed"] == 7


# -- 5. memory fed by clients is bounded -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_strings_do_not_grow_the_gateways_memory(fleet: DaemonUnderTest) -> None:
    gateway = fleet.daemon.gateway
    await fleet.http.put(
        "/v1.0/frontends/frontend1", {"Backends": ["sim0", "sim1"], "UseStickySessions": True}
    )
    parse_cache = modelnames._parse.cache_info().currsize
    http = client(fleet)
    for n in range(5):
        name = f"{n}" + "m" * 2_000_000
        reply = await http.request("POST", "/api/chat", chat(name))
        assert reply.status == 400, "a model name longer than Ollama accepts"
        conversation = f"{n}" + "c" * 60_000
        label = f"{n}" + "l" * 10_000
        host = f"{n}" + "h" * 10_000
        await http.request(
            "POST",
            "/api/chat",
            chat(),
            headers={"X-Conversation-Id": conversation, "X-OllamaFlow-Label": label},
        )
        await http.request("GET", "/api/version", headers={"Host": host})
        await http.request("POST", "/api/chat", chat(), headers={"X-Conversation-Id": conversation})
    assert modelnames._parse.cache_info().currsize == parse_cache
    router = gateway.router
    assert all(len(client) == 16 for _, client in router.pins._pins)
    remembered_labels = [key[2] for key in router._candidates]
    assert all(label is None or len(label) <= 256 for label in remembered_labels)
    assert all(host is None or len(host) <= 300 for host in router._frontends[1])


# -- 7. a client cannot take backends out of service -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_application_errors_do_not_eject_backends(fleet: DaemonUnderTest) -> None:
    for name in ("sim0", "sim1"):
        backend = fleet.daemon.registry.catalog.backends[name]
        await fleet.http.put(
            f"/v1.0/backends/{name}",
            {"Hostname": backend.hostname, "Port": backend.port, "UnhealthyThreshold": 1},
        )
    await until(lambda: all(fleet.daemon.runtime.state(n).healthy for n in ("sim0", "sim1")))
    http = client(fleet)
    for _ in range(6):
        reply = await http.request("POST", "/api/push", {"model": "llama3", "insecure": 1})
        assert reply.status == 400, "the backend's own answer reaches the client"
    states = fleet.daemon.runtime.states
    assert states["sim0"].healthy and states["sim1"].healthy
    assert (await http.request("POST", "/api/chat", chat())).status == 200


@pytest_twisted.ensureDeferred
async def test_gateway_errors_still_count_against_a_backend(tmp_path: Path) -> None:
    daemon = await start_daemon(tmp_path)
    bad = start_recorder(reactor, status=502, body=b'{"error": "bad gateway"}')
    try:
        made = DaemonUnderTest(daemon)
        host, port = bad.address
        record = {"Identifier": "bad", "Hostname": host, "Port": port, "HealthCheckUrl": "/x"}
        assert (await made.http.put("/v1.0/backends", record)).status == 201
        await made.http.put("/v1.0/frontends/frontend1", {"Backends": ["bad"]})
        state = daemon.runtime.state("bad")
        state.succeeded(daemon.now(), threshold=1)
        for _ in range(2):
            await client(made).request("POST", "/api/chat", chat())
        assert not state.healthy or state.consecutive_failures >= 2
    finally:
        assert bad.port is not None
        await stop_listening(bad.port)
        await daemon.stopService()


# -- 8. the admin token never reaches a backend ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_admin_token_is_never_forwarded(
    fleet: DaemonUnderTest, recorded: Recorder
) -> None:
    from harness import TOKEN

    http = client(fleet)
    for authorization in (f"Bearer {TOKEN}", f"bearer   {TOKEN}", f"BEARER {TOKEN}"):
        reply = await http.request(
            "POST", "/api/show", {"model": "llama3"}, headers={"Authorization": authorization}
        )
        assert reply.status == 200
        assert recorded.seen[-1].header("authorization") == []
    await http.request(
        "POST", "/api/show", {"model": "llama3"}, headers={"Authorization": "Bearer sk-own"}
    )
    assert recorded.seen[-1].header("authorization") == ["Bearer sk-own"], (
        "a client's own credentials still pass"
    )


# -- 9. AllowModelManagement -------------------------------------------------------------------

MANAGING: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/api/pull", {"model": "mistral"}),
    ("DELETE", "/api/delete", {"model": "all-minilm"}),
    ("POST", "/api/copy", {"source": "llama3", "destination": "mine"}),
    ("POST", "/api/create", {"model": "mine", "from": "llama3"}),
    ("POST", "/api/push", {"model": "llama3"}),
    ("POST", "/api/blobs/sha256:" + "0" * 64, None),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("method", "path", "body"), MANAGING)
async def test_a_frontend_can_forbid_model_management_to_clients(
    fleet: DaemonUnderTest, method: str, path: str, body: dict[str, Any] | None
) -> None:
    from harness import TOKEN

    await fleet.http.put(
        "/v1.0/frontends/frontend1", {"Backends": ["sim0", "sim1"], "AllowModelManagement": False}
    )
    raw = b"blob" if body is None else None
    refused = await client(fleet).request(method, path, body, raw=raw)
    assert refused.status == 403
    assert "model management" in ollama_error(refused)
    admin = await Http(fleet.url, token=TOKEN).request(method, path, body, raw=raw)
    assert admin.status != 403, "an admin token may"
    chat_reply = await client(fleet).request("POST", "/api/chat", chat())
    assert chat_reply.status == 200, "inference is not model management"
    probe = await client(fleet).request("HEAD", "/api/blobs/sha256:" + "0" * 64)
    assert probe.status != 403, "asking whether a blob exists is not an upload"


def test_step_table_names_real_attributes() -> None:
    for owner, name in STEPS.values():
        assert callable(getattr(owner, name))
