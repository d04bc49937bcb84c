"""Model operations are fleet-wide, end to end: the official ``ollama`` client against the
gateway in front of three simulated Ollama servers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import ollama
import pytest
import pytest_twisted
import treq
from test_conformance import inventories_read
from test_gateway import Cluster, cluster, in_thread

from ollamaflow.sim.catalog import spec_for
from ollamaflow.sim.service import RunningSimulator

__all__ = ["cluster"]  # a fixture, shared by import


def state(sim: RunningSimulator) -> dict[str, Any]:
    return sim.control.snapshot()


async def on_sim(sim: RunningSimulator, path: str, body: dict[str, Any]) -> None:
    """A request straight to one simulator, around the gateway."""
    response = await treq.post(sim.url + path, json=body)
    await response.content()
    assert response.code == 200, path


@pytest_twisted.ensureDeferred
async def test_a_copy_is_made_on_every_backend_and_routes_at_once(cluster: Cluster) -> None:
    await inventories_read(cluster)
    client = cluster.client(timeout=30)

    def session() -> tuple[Any, Any, Any]:
        copied = client.copy("llama3", "my-llama")
        shown = client.show("my-llama")
        answered = client.generate("my-llama", "hi")
        return copied, shown, answered

    copied, shown, answered = await in_thread(session)
    assert copied.status == "success"
    assert shown.modelinfo and answered.done
    for sim in cluster.sims:
        assert "my-llama:latest" in state(sim)["models"], sim.url
    response = await cluster.request(
        "POST", "/api/copy", json={"source": "nope", "destination": "x"}
    )
    assert response.code == 404
    assert await response.json() == {"error": "model 'nope' not found"}
    response = await cluster.request("POST", "/api/copy", json={"source": "llama3"})
    assert response.code == 400


@pytest_twisted.ensureDeferred
async def test_ollama_create_from_local_files_runs_on_every_backend(
    cluster: Cluster, tmp_path: Path
) -> None:
    await inventories_read(cluster)
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" + bytes(range(256)) * 4096)  # 1 MiB: spooled to a file
    digest = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    client = cluster.client(timeout=60)

    def session() -> tuple[str, list[Any], Any]:
        uploaded = client.create_blob(weights)
        progress = list(client.create(model="mine", files={"model.gguf": uploaded}, stream=True))
        answered = client.chat("mine", messages=[{"role": "user", "content": "hi"}])
        return uploaded, progress, answered

    uploaded, progress, answered = await in_thread(session)
    assert uploaded == digest
    assert progress[-1].status == "success"
    statuses = [p.status for p in progress if not p.digest]
    assert len(statuses) == len(set(statuses)), "each status once, not once per backend"
    assert answered.done
    for sim in cluster.sims:
        seen = state(sim)
        assert {"digest": digest, "size": weights.stat().st_size} in seen["blobs"], sim.url
        assert "mine:latest" in seen["models"]
    # A blob one backend lacks is missing for the fleet: the client uploads it again.
    cluster.sims[2].state.blobs.discard(digest)
    response = await cluster.request("HEAD", "/api/blobs/" + digest)
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_a_create_that_fails_everywhere_is_the_clients_error(cluster: Cluster) -> None:
    await inventories_read(cluster)
    missing = "sha256:" + "ab" * 32
    with pytest.raises(ollama.ResponseError) as raised:
        await in_thread(
            lambda: cluster.client(timeout=30).create(
                model="broken", files={"model.gguf": missing}, stream=False
            )
        )
    assert raised.value.status_code == 400
    for name in ("sim0", "sim1", "sim2"):
        assert name in raised.value.error


@pytest_twisted.ensureDeferred
async def test_a_push_goes_to_the_backend_that_has_the_model(cluster: Cluster) -> None:
    await on_sim(cluster.sims[1], "/api/copy", {"source": "llama3", "destination": "me/mine"})
    await inventories_read(cluster)
    for _ in range(3):  # whatever the balancer's turn
        done = await in_thread(lambda: cluster.client(timeout=30).push("me/mine"))
        assert done.status == "success"
    assert [len(state(sim)["pushed"]) for sim in cluster.sims] == [0, 3, 0]


@pytest_twisted.ensureDeferred
async def test_ollama_stop_unloads_the_model_everywhere_it_is_loaded(cluster: Cluster) -> None:
    for sim in cluster.sims[:2]:
        await on_sim(sim, "/api/generate", {"model": "llama3", "prompt": "x", "stream": False})
    await inventories_read(cluster)
    # What `ollama stop llama3` sends.
    response = await cluster.request(
        "POST", "/api/generate", json={"model": "llama3", "keep_alive": 0}
    )
    answer = await response.json()
    assert response.code == 200 and answer["done_reason"] == "unload"
    assert [state(sim)["loaded"] for sim in cluster.sims] == [[], [], []]
    listed = await (await cluster.request("GET", "/api/ps")).json()
    assert listed["models"] == [], "the inventory was read again before the answer"


@pytest_twisted.ensureDeferred
async def test_ps_shows_a_model_the_gateway_just_loaded(cluster: Cluster) -> None:
    await inventories_read(cluster)
    assert (await (await cluster.request("GET", "/api/ps")).json())["models"] == []
    done = await in_thread(lambda: cluster.client(timeout=30).generate("llama3", "hi"))
    assert done.done
    listed = await in_thread(lambda: cluster.client(timeout=30).ps())
    assert [m.model for m in listed.models] == ["llama3:latest"]


@pytest_twisted.ensureDeferred
async def test_pull_progress_keeps_ollamas_per_layer_lines(cluster: Cluster) -> None:
    await inventories_read(cluster)
    progress = await in_thread(
        lambda: list(cluster.client(timeout=60).pull("mistral", stream=True))
    )
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = [p for p in progress if p.digest]
    assert layers, "per-layer lines, with their digest"
    sizes = {layer.digest: layer.total for layer in layers}
    expected = {layer.digest: layer.size for layer in spec_for("mistral").layers}
    assert sizes == expected, "each layer's own size, not summed over backends"
    by_layer: dict[str, int] = {}
    for layer in layers:
        assert (layer.completed or 0) >= by_layer.get(layer.digest, 0), "bars never go back"
        by_layer[layer.digest] = layer.completed or 0
    assert all(by_layer[d] == sizes[d] for d in sizes), "every bar ends full"
    for sim in cluster.sims:
        assert "mistral:latest" in state(sim)["models"]
