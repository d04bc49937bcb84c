"""Cluster awareness end to end: a daemon with its real health checker, inventory and model
sync, in front of simulators that fail, recover, lack models and pull them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ollama
import pytest
import pytest_twisted
import treq
from harness import DaemonUnderTest, Http, start_daemon, until
from twisted.internet import reactor, task, threads

from ollamaflow.sim.service import start_simulator

FAST = {"HealthCheckIntervalMs": 100, "ModelRefreshIntervalMs": 1000, "HealthCheckTimeoutMs": 500}


class Cluster(DaemonUnderTest):
    """A fleet balanced round robin, so spreads are predictable."""

    async def serve(self, *names: str, **fields: Any) -> None:
        await super().serve(*names, **{"LoadBalancing": "RoundRobin", **fields})

    def healthy(self, name: str) -> bool:
        return self.daemon.runtime.state(name).healthy

    async def get(self, path: str, **kw: Any) -> Any:
        return await treq.get(self.url + path, persistent=False, **kw)

    async def post(self, path: str, body: Any, **kw: Any) -> Any:
        return await treq.post(self.url + path, json=body, persistent=False, **kw)

    def client(self) -> ollama.Client:
        return ollama.Client(host=self.url, timeout=30)


@pytest_twisted.async_yield_fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Cluster]:
    made = Cluster(await start_daemon(tmp_path, FAST))
    yield made
    await made.stop()


# -- health ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_new_backend_serves_within_one_round_trip(tmp_path: Path) -> None:
    """With the default 5 s interval, a backend is healthy long before a second check."""
    daemon = await start_daemon(tmp_path)
    sim = await start_simulator(reactor)
    try:
        http = Http.to(daemon)
        created = reactor.seconds()
        await http.put(
            "/v1.0/backends", {"Identifier": "s", "Hostname": "127.0.0.1", "Port": sim.port}
        )
        await until(lambda: daemon.runtime.state("s").healthy, seconds=2)
        assert reactor.seconds() - created < 1.0
        health = (await http.get("/v1.0/backends/s/health")).json
        assert health["Healthy"] is True and health["LastCheckUtc"].endswith("Z")
        assert sim.counters.requests.get("/") == 1, "one check, not two intervals"
    finally:
        await sim.stop()
        await daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_a_dead_backend_leaves_and_a_recovered_one_rejoins(fleet: Cluster) -> None:
    a = await fleet.add("a")
    b = await fleet.add("b")
    for sim in (a, b):  # warm on both: round robin over warm copies only, once it knows
        response = await treq.post(
            sim.url + "/api/generate", json={"model": "llama3"}, persistent=False
        )
        assert (await response.json())["done_reason"] == "load"
    await fleet.serve("a", "b")
    inventory = fleet.daemon.inventory
    await until(lambda: all(inventory.is_loaded(n, "llama3") for n in ("a", "b")))

    async def generate() -> str:
        response = await fleet.post(
            "/api/generate", {"model": "llama3", "prompt": "x", "stream": False}
        )
        assert response.code == 200, await response.text()
        await response.content()
        return str(response.headers.getRawHeaders("x-ollamaflow-backend")[0])

    assert {await generate() for _ in range(4)} == {"a", "b"}
    await a.configure(refuse=True)
    served = [await generate() for _ in range(6)]
    assert served.count("a") == 0, "no client request failed: retries covered the detection"
    await until(lambda: not fleet.healthy("a"))
    health = (await fleet.http.get("/v1.0/backends/a/health")).json
    assert health["Healthy"] is False and health["LastError"]
    assert "UnhealthySinceUtc" in health and "Downtime" in health
    await a.configure(refuse=False)
    await until(lambda: fleet.healthy("a"))
    assert "a" in {await generate() for _ in range(4)}, "it rejoins the rotation"


# -- models -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_required_model_appears_on_a_backend_that_lacked_it(fleet: Cluster) -> None:
    await fleet.add("full")
    lacking = await fleet.add("lacking", models=("all-minilm",), pull_time=0.2)
    await fleet.serve("full", "lacking", RequiredModels=["llama3"])

    async def has_it() -> bool:
        response = await treq.get(lacking.url + "/api/tags")
        return "llama3:latest" in [m["name"] for m in (await response.json())["models"]]

    deadline = reactor.seconds() + 10
    while not await has_it():
        assert reactor.seconds() < deadline, "the required model was never pulled"
        await task.deferLater(reactor, 0.05, lambda: None)
    assert fleet.sims["full"].counters.pulls == 0, "nothing pulled where it was present"
    await until(lambda: fleet.daemon.inventory.has("lacking", "llama3") is True)
    models = (await fleet.http.get("/v1.0/backends/lacking/models")).json
    llama = next(m for m in models if m["Name"] == "llama3:latest")
    assert llama["Present"] is True and llama["Required"] is True


@pytest_twisted.ensureDeferred
async def test_a_model_on_one_backend_only_routes_there(fleet: Cluster) -> None:
    await fleet.add("both")
    await fleet.add("embed-only", models=("all-minilm",))
    await fleet.serve("both", "embed-only")
    for _ in range(4):
        response = await fleet.post(
            "/api/chat",
            {"model": "llama3", "stream": False, "messages": [{"role": "user", "content": "x"}]},
        )
        await response.content()
        assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["both"]
    response = await fleet.post("/api/generate", {"model": "phi3", "prompt": "x"})
    assert response.code == 404
    assert await response.json() == {"error": "model 'phi3' not found"}
    response = await fleet.post("/v1/chat/completions", {"model": "phi3", "messages": []})
    assert response.code == 404
    assert (await response.json())["error"]["message"] == "model 'phi3' not found"


@pytest_twisted.ensureDeferred
async def test_loaded_models_are_preferred(fleet: Cluster) -> None:
    await fleet.add("cold")
    warm = await fleet.add("warm")
    await fleet.serve("cold", "warm")
    await treq.post(warm.url + "/api/generate", json={"model": "llama3", "prompt": ""})
    await fleet.daemon.inventory.refresh_now("warm")
    assert fleet.daemon.inventory.is_loaded("warm", "llama3")
    for _ in range(4):
        response = await fleet.post(
            "/api/generate", {"model": "llama3:latest", "prompt": "x", "stream": False}
        )
        await response.content()
        assert response.headers.getRawHeaders("x-ollamaflow-backend") == ["warm"]


@pytest_twisted.ensureDeferred
async def test_the_catalog_is_the_union_over_healthy_backends(fleet: Cluster) -> None:
    await fleet.add("a", models=("llama3", "all-minilm"))
    await fleet.add("b", models=("LLAMA3:latest", "mistral"))
    await fleet.serve("a", "b")
    for _ in range(3):
        tags = await (await fleet.get("/api/tags")).json()
        assert [m["name"].lower() for m in tags["models"]] == [
            "all-minilm:latest",
            "llama3:latest",
            "mistral:latest",
        ]
    models = await (await fleet.get("/v1/models")).json()
    assert models["object"] == "list"
    assert sorted(m["id"].lower() for m in models["data"]) == [
        "all-minilm:latest",
        "llama3:latest",
        "mistral:latest",
    ]
    one = await fleet.get("/v1/models/mistral:latest")
    assert one.code == 200 and (await one.json())["id"] == "mistral:latest"
    assert (await fleet.get("/v1/models/nope")).code == 404
    listed = await threads.deferToThread(lambda: fleet.client().list())
    assert len(listed.models) == 3


@pytest_twisted.ensureDeferred
async def test_a_client_pull_fans_out_with_one_merged_progress(fleet: Cluster) -> None:
    for name in ("a", "b", "c"):
        await fleet.add(name, models=("all-minilm",), pull_time=0.3, pull_tick=0.05)
    await fleet.serve("a", "b", "c")
    progress = await threads.deferToThread(
        lambda: list(fleet.client().pull("mistral", stream=True))
    )
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    counted = [(p.completed or 0, p.total) for p in progress if p.total]
    assert counted, "merged progress lines carry totals"
    assert all(done <= total for done, total in counted)
    assert max(total for _, total in counted) > 0
    for sim in fleet.sims.values():
        tags = await (await treq.get(sim.url + "/api/tags")).json()
        assert "mistral:latest" in [m["name"] for m in tags["models"]]
    frontend = (await fleet.http.get("/v1.0/frontends/frontend1")).json
    assert frontend["RequiredModels"] == ["mistral"], "backends that join later get it too"
    response = await fleet.post("/api/pull", {"model": "mistral", "stream": False})
    assert response.code == 200 and await response.json() == {"status": "success"}


@pytest_twisted.ensureDeferred
async def test_a_failed_pull_names_the_backends_and_the_client_sees_an_error(
    fleet: Cluster,
) -> None:
    await fleet.add("a")
    await fleet.add("b", pullable=("llama3",))
    await fleet.serve("a", "b")
    response = await fleet.post("/api/pull", {"model": "gemma2"})
    lines = [json.loads(line) for line in (await response.text()).splitlines()]
    assert lines[-1]["error"].startswith("pull of 'gemma2' failed on b:")
    assert all(line.get("status") != "success" for line in lines)
    with pytest.raises(ollama.ResponseError):
        await threads.deferToThread(lambda: list(fleet.client().pull("gemma2", stream=True)))
    response = await fleet.post("/api/pull", {"model": "gemma2", "stream": False})
    assert response.code == 500 and "failed on b" in (await response.json())["error"]
