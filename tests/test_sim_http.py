"""The simulator's HTTP surface over real sockets (treq): shapes, framing, errors, `/_sim/`."""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest_twisted
import treq
from harness import Collect, until
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from ollamaflow.sim import RunningSimulator, SimConfig

Start = Callable[..., Awaitable[RunningSimulator]]


async def call(
    sim: RunningSimulator,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[bytes | str, bytes | str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request; status, lower-cased headers and body."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    response = await treq.request(
        method, sim.url + path, data=data, headers=headers, persistent=False
    )
    content = await treq.content(response)
    heads = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, heads, content


async def raw_head(sim: RunningSimulator, method: str, path: str, body: Any = None) -> bytes:
    """The raw response head (treq hides the framing headers): lower-cased."""
    data = b"" if body is None else json.dumps(body).encode()
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    proto = Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", sim.port), proto)
    assert proto.transport is not None
    proto.transport.write(request)
    response = await proto.done
    return response.split(b"\r\n\r\n", 1)[0].lower()


@pytest_twisted.ensureDeferred
async def test_liveness_version_and_head(simulators: Start) -> None:
    sim = await simulators()
    status, headers, body = await call(sim, "GET", "/")
    assert (status, body) == (200, b"Ollama is running")
    assert headers["content-type"].startswith("text/plain")
    status, headers, body = await call(sim, "HEAD", "/")
    assert (status, body) == (200, b"")
    assert b"content-length: 17" in await raw_head(sim, "HEAD", "/")
    status, _, body = await call(sim, "GET", "/api/version")
    assert json.loads(body) == {"version": "0.32.15"}


@pytest_twisted.ensureDeferred
async def test_tags_shape(simulators: Start) -> None:
    sim = await simulators(models=["llama3", "all-minilm", "library/qwen2.5:0.5b"])
    status, headers, body = await call(sim, "GET", "/api/tags")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert f"content-length: {len(body)}".encode() in await raw_head(sim, "GET", "/api/tags")
    models = json.loads(body)["models"]
    assert {m["name"] for m in models} == {"llama3:latest", "all-minilm:latest", "qwen2.5:0.5b"}
    for entry in models:
        assert entry["model"] == entry["name"]
        assert re.fullmatch("[0-9a-f]{64}", entry["digest"])
        assert set(entry["details"]) == {
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        }
    empty = await simulators(models=[])
    _, _, body = await call(empty, "GET", "/api/tags")
    assert json.loads(body) == {"models": []}


@pytest_twisted.ensureDeferred
async def test_digests_are_stable_across_simulators(simulators: Start) -> None:
    one, two = await simulators(), await simulators()
    tags = [json.loads((await call(s, "GET", "/api/tags"))[2]) for s in (one, two)]
    assert tags[0]["models"][0]["digest"] == tags[1]["models"][0]["digest"]


@pytest_twisted.ensureDeferred
async def test_show_has_model_info_and_capabilities(simulators: Start) -> None:
    sim = await simulators()
    _, _, body = await call(sim, "POST", "/api/show", {"model": "llama3"})
    shown = json.loads(body)
    assert shown["capabilities"] == ["completion"]
    assert shown["model_info"]["llama.embedding_length"] == 4096
    assert {"details", "template", "parameters", "modified_at"} <= set(shown)
    _, _, body = await call(sim, "POST", "/api/show", {"name": "all-minilm"})
    assert json.loads(body)["capabilities"] == ["embedding"]


@pytest_twisted.ensureDeferred
async def test_errors(simulators: Start) -> None:
    sim = await simulators()
    cases: list[tuple[str, str, Any, bytes | None, int, str]] = [
        ("GET", "/nope", None, None, 404, "404 page not found"),
        ("GET", "/api/chat", None, None, 405, "405 method not allowed"),
        ("POST", "/api/tags", None, None, 405, "405 method not allowed"),
        ("POST", "/api/chat", None, b"{nope", 400, "invalid JSON body"),
        ("POST", "/api/chat", None, b"", 400, "missing request body"),
        ("POST", "/api/chat", None, b"[1]", 400, "must be a JSON object"),
        ("POST", "/api/chat", {"messages": []}, None, 400, "model is required"),
        ("POST", "/api/generate", {"model": "x"}, None, 404, "model 'x' not found"),
        ("POST", "/api/chat", {"model": "Nope:1"}, None, 404, "model 'Nope:1' not found"),
        ("POST", "/api/show", {"model": "x"}, None, 404, "model 'x' not found"),
        ("DELETE", "/api/delete", {"model": "x"}, None, 404, "model 'x' not found"),
        ("POST", "/api/embed", {"model": "a b"}, None, 400, "invalid model name"),
        ("POST", "/api/generate", {"model": "all-minilm", "prompt": "x"}, None, 400, "support"),
    ]
    for method, path, body, raw, status, message in cases:
        got_status, headers, got = await call(sim, method, path, body, raw=raw)
        assert got_status == status, (path, got)
        assert headers["content-type"].startswith("application/json")
        assert message in json.loads(got)["error"], (path, got)


@pytest_twisted.ensureDeferred
async def test_names_are_normalized_and_echoed(simulators: Start) -> None:
    sim = await simulators()
    for name in ("LLAMA3", "registry.ollama.ai/library/llama3:latest", "library/llama3"):
        body = {"model": name, "prompt": "hi", "stream": False}
        status, _, got = await call(sim, "POST", "/api/generate", body)
        assert status == 200
        assert json.loads(got)["model"] == name


@pytest_twisted.ensureDeferred
async def test_generate_stream_framing(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(tokens=5))
    status, headers, body = await call(
        sim, "POST", "/api/generate", {"model": "llama3", "prompt": "hi"}
    )
    assert status == 200
    assert headers["content-type"] == "application/x-ndjson"
    head = await raw_head(sim, "POST", "/api/generate", {"model": "llama3", "prompt": "hi"})
    assert b"transfer-encoding: chunked" in head and b"content-length" not in head
    head = await raw_head(
        sim, "POST", "/api/generate", {"model": "llama3", "prompt": "hi", "stream": False}
    )
    assert b"content-length: " in head and b"chunked" not in head
    lines = body.split(b"\n")
    assert lines[-1] == b"" and b"" not in lines[:-1]
    messages = [json.loads(line) for line in lines[:-1]]
    assert [m["done"] for m in messages] == [False] * 5 + [True]
    final = messages[-1]
    for field in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        assert isinstance(final[field], int) and final[field] > 0
    assert final["context"] and final["done_reason"] == "stop"
    assert "".join(m["response"] for m in messages) == "The quick brown fox jumps"


@pytest_twisted.ensureDeferred
async def test_num_predict_limits_with_reason_length(simulators: Start) -> None:
    sim = await simulators()
    body = {"model": "llama3", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    _, _, got = await call(sim, "POST", "/api/generate", body)
    reply = json.loads(got)
    assert (reply["eval_count"], reply["done_reason"], reply["response"]) == (
        2,
        "length",
        "The quick",
    )


@pytest_twisted.ensureDeferred
async def test_embed_and_legacy_embeddings(simulators: Start) -> None:
    sim = await simulators()
    _, _, got = await call(sim, "POST", "/api/embed", {"model": "all-minilm", "input": "hello"})
    one = json.loads(got)
    assert one["model"] == "all-minilm" and len(one["embeddings"]) == 1
    assert len(one["embeddings"][0]) == 384
    assert abs(sum(v * v for v in one["embeddings"][0]) - 1) < 1e-3
    assert {"total_duration", "load_duration", "prompt_eval_count"} <= set(one)
    _, _, got = await call(
        sim, "POST", "/api/embed", {"model": "all-minilm", "input": ["hello", "x"]}
    )
    two = json.loads(got)["embeddings"]
    assert two[0] == one["embeddings"][0] and two[0] != two[1]
    _, _, got = await call(
        sim, "POST", "/api/embeddings", {"model": "all-minilm", "prompt": "hello"}
    )
    assert json.loads(got)["embedding"] == one["embeddings"][0]


@pytest_twisted.ensureDeferred
async def test_copy_and_delete(simulators: Start) -> None:
    sim = await simulators()
    status, _headers, body = await call(
        sim, "POST", "/api/copy", {"source": "llama3", "destination": "mine:v1"}
    )
    assert (status, body) == (200, b"")
    head = await raw_head(sim, "POST", "/api/copy", {"source": "llama3", "destination": "b"})
    assert b"content-length: 0" in head and b"content-type" not in head
    names = [m["name"] for m in json.loads((await call(sim, "GET", "/api/tags"))[2])["models"]]
    assert "mine:v1" in names
    status, _, body = await call(sim, "DELETE", "/api/delete", {"name": "mine:v1"})
    assert (status, body) == (200, b"")
    names = [m["name"] for m in json.loads((await call(sim, "GET", "/api/tags"))[2])["models"]]
    assert "mine:v1" not in names
    status, _, _ = await call(sim, "POST", "/api/copy", {"source": "nope", "destination": "x"})
    assert status == 404


@pytest_twisted.ensureDeferred
async def test_openai_routes(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(tokens=3))
    _, _, got = await call(sim, "GET", "/v1/models")
    listing = json.loads(got)
    assert listing["object"] == "list"
    assert {"id", "object", "created", "owned_by"} == set(listing["data"][0])
    status, _, got = await call(sim, "GET", "/v1/models/llama3")
    assert status == 200 and json.loads(got)["id"] == "llama3:latest"
    status, _, got = await call(sim, "GET", "/v1/models/nope")
    assert status == 404 and json.loads(got)["error"]["type"] == "not_found_error"

    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, got = await call(sim, "POST", "/v1/chat/completions", chat)
    completion = json.loads(got)
    assert headers["content-type"].startswith("application/json")
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "The quick brown"
    assert completion["usage"]["completion_tokens"] == 3

    stream = dict(chat, stream=True, stream_options={"include_usage": True})
    status, headers, got = await call(sim, "POST", "/v1/chat/completions", stream)
    assert headers["content-type"] == "text/event-stream"
    events = got.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [json.loads(e[len(b"data: ") :]) for e in events[:-2]]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 3 + ["stop"]
    assert chunks[-1]["usage"]["total_tokens"] > 3

    _, _, got = await call(sim, "POST", "/v1/completions", {"model": "llama3", "prompt": "hi"})
    assert json.loads(got)["choices"][0]["text"] == "The quick brown"

    body = {"model": "all-minilm", "input": ["a", "b"], "encoding_format": "base64"}
    _, _, got = await call(sim, "POST", "/v1/embeddings", body)
    data = json.loads(got)["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert len(struct.unpack("<384f", base64.b64decode(data[0]["embedding"]))) == 384

    status, _, got = await call(
        sim, "POST", "/v1/chat/completions", {"model": "nope", "messages": [{}]}
    )
    assert status == 404 and json.loads(got)["error"]["message"] == "model 'nope' not found"


@pytest_twisted.ensureDeferred
async def test_host_header_check_on_loopback(simulators: Start) -> None:
    sim = await simulators()
    status, _, body = await call(sim, "GET", "/api/tags", headers={"Host": "evil.example.com"})
    assert (status, body) == (403, b"")
    for host in ("localhost:11434", "10.1.2.3", "box.local", "[::1]:80", "gpu.internal"):
        status, _, _ = await call(sim, "GET", "/api/tags", headers={"Host": host})
        assert status == 200, host
    sim.config.check_host = False
    status, _, _ = await call(sim, "GET", "/api/tags", headers={"Host": "evil.example.com"})
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_control_endpoint(simulators: Start) -> None:
    sim = await simulators()
    await call(sim, "GET", "/api/tags")
    await call(sim, "GET", "/api/tags")
    _, _, got = await call(sim, "GET", "/_sim/state")
    state = json.loads(got)
    assert state["counters"]["requests"] == {"/api/tags": 2}
    assert state["counters"]["statuses"] == {"200": 2}
    assert state["models"] == ["llama3:latest", "all-minilm:latest"]
    assert state["config"]["num_parallel"] == 1

    status, _, got = await call(sim, "POST", "/_sim/config", {"tokens": 2, "ttft": 0})
    assert status == 200 and json.loads(got)["tokens"] == 2
    assert sim.config.tokens == 2
    for bad in ({"nope": 1}, {"tokens": "many"}, {"tokens": -1}, {"error500": 1}):
        status, _, got = await call(sim, "POST", "/_sim/config", bad)
        assert status == 400, bad
    assert sim.config.tokens == 2

    status, _, got = await call(sim, "POST", "/_sim/reset")
    assert json.loads(got)["requests"] == {}
    assert (await call(sim, "GET", "/_sim/nope"))[0] == 404
    assert (await call(sim, "POST", "/_sim/state"))[0] == 405


@pytest_twisted.ensureDeferred
async def test_error500_and_hang_via_control(simulators: Start) -> None:
    sim = await simulators()
    await call(sim, "POST", "/_sim/config", {"error500": True})
    status, _, got = await call(sim, "POST", "/api/chat", {"model": "llama3"})
    assert status == 500 and "error" in json.loads(got)
    status, _, got = await call(sim, "POST", "/v1/chat/completions", {"model": "llama3"})
    assert status == 500 and json.loads(got)["error"]["type"] == "api_error"
    await call(sim, "POST", "/_sim/config", {"error500": False, "hang": True})
    pending = treq.get(sim.url + "/api/tags", persistent=False)
    await until(lambda: sim.counters.in_flight == 1)
    pending.cancel()
    await until(lambda: sim.counters.client_disconnects == 1)
    assert sim.counters.in_flight == 0
    pending.addErrback(lambda _f: None)


@pytest_twisted.ensureDeferred
async def test_refuse_via_control_then_back(simulators: Start) -> None:
    sim = await simulators()
    status, _, _ = await call(sim, "POST", "/_sim/config", {"refuse": True, "refuse_seconds": 0.3})
    assert status == 200
    await until(lambda: not sim.listening)
    try:
        await call(sim, "GET", "/")
    except Exception as e:
        assert "refused" in repr(e).lower()
    else:
        raise AssertionError("connection was not refused")
    await until(lambda: sim.listening)
    assert (await call(sim, "GET", "/"))[0] == 200
    assert sim.config.refuse is False


@pytest_twisted.ensureDeferred
async def test_start_refusing(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(refuse=True))
    assert not sim.listening
    await sim.configure(refuse=False)
    assert (await call(sim, "GET", "/"))[0] == 200
