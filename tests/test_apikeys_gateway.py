"""API keys at the gateway, end to end: a daemon in front of simulated Ollama servers, keys made
through the admin API, and the clients users have (the OpenAI SDK, the ``ollama`` client)."""

from __future__ import annotations

import json
from typing import Any

import ollama
import openai
import pytest
import pytest_twisted
import treq
from harness import until
from listening import stop_listening
from logcapture import keeping
from recorder import Recorder, start_recorder
from test_conformance import inventories_read
from test_gateway import Cluster, cluster, in_thread
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from ollamaflow.gateway.scheduler import Scheduler

__all__ = ["cluster"]  # a fixture, shared by import

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
CHAT = {"model": "llama3", "messages": MESSAGES, "stream": False}


async def make_key(cluster: Cluster, **fields: Any) -> tuple[str, str]:
    """A new key through the admin API: its Identifier and its secret."""
    reply = await cluster.http.request("POST", "/v1.0/apikeys", {"Name": "test", **fields})
    assert reply.status == 201, reply.body
    made = reply.json
    return made["Identifier"], made["Key"]


async def chat(cluster: Cluster, secret: str | None, path: str = "/api/chat", **body: Any) -> Any:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    if path.startswith("/v1/"):
        document: dict[str, Any] = {"model": "llama3", "messages": MESSAGES, **body}
    else:
        document = {**CHAT, **body}
    return await cluster.request("POST", path, json=document, headers=headers)


async def require_keys(cluster: Cluster) -> None:
    await cluster.frontend(["sim0", "sim1", "sim2"], RequireApiKey=True)


@pytest_twisted.ensureDeferred
async def test_a_frontend_that_requires_keys_answers_401_in_each_clients_dialect(
    cluster: Cluster,
) -> None:
    await require_keys(cluster)
    response = await chat(cluster, None)
    assert response.code == 401
    assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="ollamaflow"']
    assert "API key is required" in (await response.json())["error"]
    response = await chat(cluster, "ollama", "/v1/chat/completions")
    assert response.code == 401
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and "not valid" in error["message"]


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_and_the_ollama_client_work_with_a_key(cluster: Cluster) -> None:
    await require_keys(cluster)
    _, secret = await make_key(cluster)
    sdk = openai.OpenAI(base_url=cluster.url + "/v1", api_key=secret, timeout=30)
    bad = openai.OpenAI(base_url=cluster.url + "/v1", api_key="ofk_wrong", timeout=30)
    client = ollama.Client(host=cluster.url, headers={"Authorization": f"Bearer {secret}"})

    def session() -> tuple[Any, Any, Any]:
        answered = sdk.chat.completions.create(model="llama3", messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="llama3", messages=MESSAGES)
        listed = client.list()
        replied = client.chat("llama3", messages=MESSAGES)
        return answered, listed, replied

    answered, listed, replied = await in_thread(session)
    assert answered.choices[0].message.content
    assert "llama3:latest" in [m.model for m in listed.models]
    assert replied.done


@pytest_twisted.ensureDeferred
async def test_open_frontends_serve_without_a_key_and_a_placeholder_key(cluster: Cluster) -> None:
    assert (await chat(cluster, None)).code == 200
    assert (await chat(cluster, "ollama", "/v1/chat/completions")).code == 200
    response = await chat(cluster, "ofk_revoked-or-mistyped")
    assert response.code == 401, "a key of ours that is not valid is never taken as none"


@pytest_twisted.ensureDeferred
async def test_a_key_beyond_its_frontends_models_or_rights_is_403_naming_what(
    cluster: Cluster,
) -> None:
    await require_keys(cluster)
    _, elsewhere = await make_key(cluster, Frontends=["another"])
    response = await chat(cluster, elsewhere)
    assert response.code == 403 and "frontend 'frontend1'" in (await response.json())["error"]
    _, limited = await make_key(cluster, Models=["all-minilm", "qwen*"])
    response = await chat(cluster, limited)
    assert response.code == 403 and "model 'llama3'" in (await response.json())["error"]
    headers = {"Authorization": f"Bearer {limited}"}
    response = await cluster.request(
        "POST", "/api/embed", json={"model": "all-minilm", "input": "x"}, headers=headers
    )
    assert response.code == 200
    response = await cluster.request(
        "POST", "/api/pull", json={"model": "qwen2.5"}, headers=headers
    )
    assert response.code == 403 and "manage models" in (await response.json())["error"]
    _, manager = await make_key(cluster, Models=["llama3"], AllowModelManagement=True)
    response = await cluster.request(
        "POST",
        "/api/copy",
        json={"source": "llama3", "destination": "mine"},
        headers={"Authorization": f"Bearer {manager}"},
    )
    assert response.code == 403 and "model 'mine'" in (await response.json())["error"]


@pytest_twisted.ensureDeferred
async def test_the_key_is_never_forwarded_nor_logged(cluster: Cluster) -> None:
    recorder = start_recorder(reactor)
    try:
        await cluster.backend("rec", recorder.address[1])
        await cluster.frontend(["rec"], RequireApiKey=True, LogRequestFull=True)
        _, secret = await make_key(cluster)
        events: list[dict[str, Any]] = []
        observer = keeping(events)
        globalLogPublisher.addObserver(observer)
        try:
            response = await chat(cluster, secret)
            await response.content()
        finally:
            globalLogPublisher.removeObserver(observer)
        assert response.code == 200
        assert recorded_header(recorder, "authorization") == []
        logged = json.dumps([repr(e) for e in events])
        assert "Bearer [redacted]" in logged, "the head was logged, its credential redacted"
        assert secret not in logged and secret[12:] not in logged
    finally:
        assert recorder.port is not None
        await stop_listening(recorder.port)


def recorded_header(recorder: Recorder, name: str) -> list[str]:
    return list(recorder.seen[-1].header(name))


@pytest_twisted.ensureDeferred
async def test_requests_per_minute_beyond_the_limit_are_429_with_retry_after(
    cluster: Cluster,
) -> None:
    await require_keys(cluster)
    _, secret = await make_key(cluster, RequestsPerMinute=2)
    assert [(await chat(cluster, secret)).code for _ in range(2)] == [200, 200]
    response = await chat(cluster, secret)
    assert response.code == 429
    retry_after = int(response.headers.getRawHeaders("retry-after")[0])
    assert 1 <= retry_after <= 60
    assert "2 requests per minute" in (await response.json())["error"]
    response = await chat(cluster, secret, "/v1/chat/completions")
    assert response.code == 429
    assert (await response.json())["error"]["type"] == "rate_limit_error"
    _, other = await make_key(cluster, RequestsPerMinute=2)
    assert (await chat(cluster, other)).code == 200, "each key has its own count"


@pytest_twisted.ensureDeferred
async def test_tokens_per_minute_count_what_the_backend_reported(cluster: Cluster) -> None:
    """Prompt and completion tokens both count: the limit is exactly what one request used, so
    a second is refused only if both were counted (the simulator answers 1 + 10 tokens)."""
    await require_keys(cluster)
    _, secret = await make_key(cluster, TokensPerMinute=11)
    first = await chat(cluster, secret)
    reply = await first.json()
    assert (reply["prompt_eval_count"], reply["eval_count"]) == (1, 10)
    response = await chat(cluster, secret)
    assert response.code == 429
    assert "11 tokens per minute" in (await response.json())["error"]
    # OpenAI's dialect reports its tokens in ``usage``: they count just the same.
    _, other = await make_key(cluster, TokensPerMinute=11)
    first = await chat(cluster, other, "/v1/chat/completions")
    usage = (await first.json())["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (1, 10)
    response = await chat(cluster, other, "/v1/chat/completions")
    assert response.code == 429
    assert "11 tokens per minute" in (await response.json())["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_an_admin_token_is_a_key_to_every_frontend_without_limits(cluster: Cluster) -> None:
    await require_keys(cluster)
    admin = cluster.http.token
    assert admin is not None
    assert [(await chat(cluster, admin)).code for _ in range(3)] == [200, 200, 200]
    reply = await cluster.http.get("/v1.0/apikeys/admin/usage")
    assert reply.status == 200


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_beyond_the_limit_are_429_until_one_ends(
    cluster: Cluster,
) -> None:
    await require_keys(cluster)
    for sim in cluster.sims:
        await sim.configure(tokens=10, tokens_per_second=20)
    _, secret = await make_key(cluster, MaxConcurrentRequests=1)
    streaming = await chat(cluster, secret, stream=True)
    assert streaming.code == 200
    refused = await chat(cluster, secret)
    assert refused.code == 429
    assert "1 concurrent requests" in (await refused.json())["error"]
    await streaming.content()
    assert (await chat(cluster, secret)).code == 200, "the slot is free once the stream ended"


@pytest_twisted.ensureDeferred
async def test_usage_is_accounted_per_key_and_model_and_anonymous(cluster: Cluster) -> None:
    await inventories_read(cluster)  # the metrics name models they know
    identifier, secret = await make_key(cluster)
    for _ in range(2):
        assert (await chat(cluster, secret)).code == 200
    assert (await chat(cluster, None)).code == 200
    response = await chat(cluster, secret, model="no-such-model")
    assert response.code == 404

    async def usage(who: str) -> dict[str, Any]:
        reply = await cluster.http.get(f"/v1.0/apikeys/{who}/usage")
        assert reply.status == 200, reply.body
        return dict(reply.json["Totals"])

    totals = await until(
        lambda: usage(identifier), what="usage of the key", ignoring=(AssertionError,)
    )
    assert totals["Requests"] == 3 and totals["Errors"] == 1
    assert totals["PromptTokens"] > 0 and totals["CompletionTokens"] > 0
    assert (await usage("anonymous"))["Requests"] >= 1
    metrics = (await (await treq.get(cluster.url + "/metrics")).content()).decode()
    counted = f'ollamaflow_apikey_requests_total{{key="{identifier}",model="llama3:latest"}} 2.0'
    assert counted in metrics.splitlines()


@pytest_twisted.ensureDeferred
async def test_a_key_limited_to_models_lists_only_those(cluster: Cluster) -> None:
    """The catalog a key sees is the models it may use: /api/tags, /api/ps, /v1/models."""
    await inventories_read(cluster)
    await require_keys(cluster)
    _, secret = await make_key(cluster, Models=["llama3*"])
    headers = {"Authorization": f"Bearer {secret}"}
    assert (await chat(cluster, secret)).code == 200  # llama3 is loaded somewhere now

    async def names(path: str, field: str, key: str) -> list[str]:
        response = await cluster.request("GET", path, headers=headers)
        assert response.code == 200
        return [m[key] for m in (await response.json())[field]]

    tags = await names("/api/tags", "models", "name")
    assert tags and all(name.startswith("llama3") for name in tags)
    assert all(n.startswith("llama3") for n in await names("/api/ps", "models", "name"))
    assert all(n.startswith("llama3") for n in await names("/v1/models", "data", "id"))
    response = await cluster.request("GET", "/v1/models/all-minilm", headers=headers)
    assert response.code == 403
    response = await cluster.request("GET", "/v1/models/llama3", headers=headers)
    assert response.code == 200
    everything = await cluster.request("GET", "/api/tags", headers={"Authorization": "Bearer x"})
    assert everything.code == 401


@pytest_twisted.ensureDeferred
async def test_a_request_the_queue_refuses_gives_its_keys_slot_back(cluster: Cluster) -> None:
    """Admitted by its key, refused by a full queue: the key's concurrency slot is free again,
    so the next request meets the queue, not the key's limit."""
    sim = cluster.sims[0]
    backend = {"Hostname": "127.0.0.1", "Port": sim.port, "MaxParallelRequests": 1}
    assert (await cluster.http.put("/v1.0/backends/sim0", backend)).status == 200
    cluster.healthy("sim0")
    await cluster.frontend(["sim0"], MaxQueueDepth=0)
    await sim.configure(tokens=10, tokens_per_second=20)
    _, secret = await make_key(cluster, MaxConcurrentRequests=1)
    holding = await chat(cluster, None, stream=True)  # the backend's one slot, without a key
    assert holding.code == 200
    for _ in range(3):
        refused = await chat(cluster, secret)
        assert refused.code == 429
        assert "concurrent" not in (await refused.json())["error"], "the key's slot leaked"
    await holding.content()
    assert (await chat(cluster, secret)).code == 200


@pytest_twisted.ensureDeferred
async def test_a_bug_before_the_exchange_starts_gives_the_keys_slot_back(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client gets its 500, and the key's one concurrency slot is free again."""
    _, secret = await make_key(cluster, MaxConcurrentRequests=1)
    real = Scheduler.has_slot
    broken = [True]

    def has_slot(self: Scheduler, *args: Any) -> bool:
        if broken.pop() if broken else False:
            raise RuntimeError("a bug")
        return real(self, *args)

    monkeypatch.setattr(Scheduler, "has_slot", has_slot)
    assert (await chat(cluster, secret)).code == 500
    assert (await chat(cluster, secret)).code == 200, "the key's slot leaked"
