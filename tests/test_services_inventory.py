"""Model inventory: /api/tags and /api/ps of healthy Ollama backends, by clock and end to end."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import pytest_twisted
from harness import until
from test_services_health import (
    Call,
    FakeResponse,
    World,
    backend,
    real_http,
    sim_backend,
)
from treq.client import HTTPClient
from twisted.internet.error import ConnectionRefusedError

from ollamaflow.records import ApiFormat
from ollamaflow.services import ModelInventory

__all__ = ["real_http"]  # a fixture, shared by import

TAGS = {
    "models": [
        {"name": "llama3:latest", "model": "llama3:latest", "size": 10, "digest": "aa" * 32},
        {"name": "hf.co/Org/Model:Q4", "model": "hf.co/Org/Model:Q4", "size": 20},
        {"name": "not a valid name!", "size": 1},
        "garbage",
    ]
}
PS = {"models": [{"name": "llama3:latest", "model": "llama3:latest", "size_vram": 5}]}


@attrs.define
class Inv:
    world: World
    inventory: ModelInventory
    answers: dict[str, Any]
    refreshed: list[str]

    def calls(self, path: str) -> list[Call]:
        return self.world.http.to(path)


@pytest.fixture
def inv() -> Any:
    world = World()
    answers: dict[str, Any] = {"/api/tags": TAGS, "/api/ps": PS}

    def handler(call: Call) -> FakeResponse | None:
        answer = answers[call.path]
        if answer is None:
            return None
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, FakeResponse):
            return answer
        return FakeResponse.json(answer)

    world.http.handler = handler
    inventory = ModelInventory(
        registry=world.registry,
        runtime=world.runtime,
        clock=world.clock,
        http=world.http,
        interval=30.0,
        timeout=10.0,
    )
    world.registry.subscribe(inventory.configuration_changed)
    refreshed: list[str] = []
    inventory.add_listener(refreshed.append)
    yield Inv(world, inventory, answers, refreshed)
    inventory.stopService()
    assert world.clock.getDelayedCalls() == []


def test_reads_tags_and_ps_with_normalized_names(inv: Inv) -> None:
    inv.world.publish(backend(bearer_token="t", querystring="k=v"))
    inv.world.mark_healthy("b1")
    assert inv.inventory.has("b1", "llama3") is None
    inv.inventory.startService()
    assert [c.url for c in inv.world.http.calls] == [
        "http://b1.example:11434/api/tags?k=v",
        "http://b1.example:11434/api/ps?k=v",
    ]
    assert inv.world.http.calls[0].header("Authorization") == "Bearer t"
    assert inv.refreshed == ["b1"]
    for name in ("llama3", "LLama3:latest", "library/llama3", "registry.ollama.ai/library/llama3"):
        assert inv.inventory.has("b1", name) is True
    assert inv.inventory.has("b1", "hf.co/org/model:q4") is True
    assert inv.inventory.has("b1", "mistral") is False
    assert inv.inventory.has("b1", "not a valid name!") is False
    assert inv.inventory.has("other", "llama3") is None
    assert set(inv.inventory.entries("b1")) == {"llama3:latest", "hf.co/org/model:q4"}
    assert inv.inventory.entries("b1")["llama3:latest"]["size"] == 10
    assert inv.inventory.is_loaded("b1", "llama3")
    assert not inv.inventory.is_loaded("b1", "hf.co/Org/Model:Q4")
    assert set(inv.inventory.loaded_entries("b1")) == {"llama3:latest"}
    record = inv.inventory.inventory("b1")
    assert record is not None and record.known and record.last_error is None


def test_a_model_a_backend_answered_for_is_loaded_at_once_then_read_again(inv: Inv) -> None:
    inv.world.publish(backend("b1"))
    inv.world.mark_healthy("b1")
    inv.inventory.learned("b1", "hf.co/Org/Model:Q4")
    assert inv.calls("/api/tags") == [], "nothing to learn into before the first read"
    inv.inventory.startService()
    assert not inv.inventory.is_loaded("b1", "hf.co/Org/Model:Q4")
    inv.answers["/api/tags"] = None  # reads from now on stay unanswered
    inv.inventory.learned("b1", "hf.co/Org/Model:Q4")
    assert inv.inventory.is_loaded("b1", "hf.co/org/model:q4"), "before the read answers"
    assert inv.inventory.loaded_entries("b1")["hf.co/org/model:q4"]["size"] == 20
    assert len(inv.calls("/api/tags")) == 2, "and read again at once for the details"
    inv.inventory.learned("b1", "brand-new")
    assert inv.inventory.has("b1", "brand-new:latest") is True
    assert inv.inventory.is_loaded("b1", "brand-new")
    inv.inventory.learned("b1", "llama3")
    inv.inventory.learned("b1", "brand-new")
    assert len(inv.calls("/api/tags")) == 2, "one read at a time; known models ask nothing"


def test_refreshes_every_interval_only_healthy_ollama_backends(inv: Inv) -> None:
    inv.world.publish(backend("b1"), backend("sick"), backend("oai", api_format=ApiFormat.OPENAI))
    inv.world.mark_healthy("b1", "oai")
    inv.inventory.startService()
    assert len(inv.calls("/api/tags")) == 1
    inv.world.clock.advance(29.9)
    assert len(inv.calls("/api/tags")) == 1
    inv.world.clock.advance(0.1)
    assert len(inv.calls("/api/tags")) == 2
    assert {c.url.split("/")[2] for c in inv.calls("/api/tags")} == {"b1.example:11434"}
    assert inv.inventory.has("sick", "llama3") is None
    assert inv.inventory.has("oai", "llama3") is None


def test_a_failed_refresh_keeps_what_was_known(inv: Inv) -> None:
    inv.world.publish(backend())
    inv.world.mark_healthy("b1")
    inv.answers["/api/tags"] = FakeResponse(500, b'{"error":"boom"}')
    inv.inventory.startService()
    record = inv.inventory.inventory("b1")
    assert record is not None and not record.known
    assert record.last_error == "/api/tags: HTTP 500"
    assert inv.inventory.has("b1", "llama3") is None
    assert inv.refreshed == []

    inv.answers["/api/tags"] = TAGS
    inv.world.clock.advance(30)
    assert inv.inventory.has("b1", "llama3") is True

    inv.answers["/api/tags"] = ConnectionRefusedError("refused")
    inv.world.clock.advance(30)
    assert inv.inventory.has("b1", "llama3") is True
    assert "refused" in (inv.inventory.inventory("b1").last_error or "")  # type: ignore[union-attr]

    inv.answers["/api/tags"] = {"unexpected": True}
    inv.world.clock.advance(30)
    assert "models" in (inv.inventory.inventory("b1").last_error or "")  # type: ignore[union-attr]
    assert inv.inventory.has("b1", "llama3") is True


def test_ps_failure_still_counts_the_tags(inv: Inv) -> None:
    inv.world.publish(backend())
    inv.world.mark_healthy("b1")
    inv.answers["/api/ps"] = FakeResponse(404, b"404 page not found")
    inv.inventory.startService()
    assert inv.inventory.has("b1", "llama3") is True
    assert not inv.inventory.is_loaded("b1", "llama3")
    assert inv.inventory.inventory("b1").last_error == "/api/ps: HTTP 404"  # type: ignore[union-attr]


def test_timeout_cancels_the_refresh(inv: Inv) -> None:
    inv.world.publish(backend())
    inv.world.mark_healthy("b1")
    inv.answers["/api/tags"] = None
    inv.inventory.startService()
    inv.world.clock.advance(10)
    assert inv.calls("/api/tags")[0].cancelled
    assert inv.inventory.inventory("b1").last_error == "/api/tags: no answer within 10s"  # type: ignore[union-attr]


def test_refresh_now_runs_after_the_refresh_in_flight(inv: Inv) -> None:
    inv.world.publish(backend())
    inv.world.mark_healthy("b1")
    inv.answers["/api/tags"] = None
    inv.inventory.startService()
    first = inv.calls("/api/tags")[0]
    done = inv.inventory.refresh_now("b1")
    assert not done.called
    assert len(inv.calls("/api/tags")) == 1  # never two at once for one backend
    inv.answers["/api/tags"] = TAGS
    first.respond(FakeResponse.json({"models": []}))
    assert done.called
    assert len(inv.calls("/api/tags")) == 2
    assert inv.inventory.has("b1", "llama3") is True
    # The periodic round skips a backend whose refresh is still running.
    inv.inventory.timeout = 100
    inv.answers["/api/tags"] = None
    inv.inventory.refresh_now("b1")
    inv.world.clock.advance(30)
    assert len(inv.calls("/api/tags")) == 3


def test_refresh_now_ignores_ineligible_backends(inv: Inv) -> None:
    inv.world.publish(backend(api_format=ApiFormat.OPENAI))
    inv.inventory.startService()
    assert inv.inventory.refresh_now("b1").called
    assert inv.inventory.refresh_now("nope").called
    assert inv.world.http.calls == []


def test_health_transition_hook_refreshes(inv: Inv) -> None:
    be = backend()
    inv.world.publish(be)
    inv.inventory.startService()
    assert inv.world.http.calls == []
    inv.world.mark_healthy("b1")
    inv.inventory.health_changed(be, True)
    assert inv.inventory.has("b1", "llama3") is True
    inv.inventory.health_changed(be, False)
    assert len(inv.calls("/api/tags")) == 1


def test_deleted_deactivated_or_moved_backends_are_forgotten(inv: Inv) -> None:
    inv.world.publish(backend("b1"), backend("b2"), backend("b3"))
    inv.world.mark_healthy("b1", "b2", "b3")
    inv.inventory.startService()
    assert all(inv.inventory.known(b) for b in ("b1", "b2", "b3"))
    inv.answers["/api/tags"] = None
    inv.world.publish(backend("b2", active=False), backend("b3", port=1234))
    assert inv.inventory.has("b1", "llama3") is None
    assert inv.inventory.has("b2", "llama3") is None
    assert inv.inventory.has("b3", "llama3") is None
    # The moved backend is re-read at its new address at once.
    assert inv.calls("/api/tags")[-1].url == "http://b3.example:1234/api/tags"
    inv.world.publish(backend("b2", active=False))
    assert inv.calls("/api/tags")[-1].cancelled


def test_a_refresh_finishing_after_a_delete_writes_nothing(inv: Inv) -> None:
    inv.world.publish(backend())
    inv.world.mark_healthy("b1")
    inv.answers["/api/tags"] = None
    inv.inventory.startService()
    pending = inv.calls("/api/tags")[0]
    inv.world.publish()
    assert pending.cancelled
    assert inv.inventory.inventory("b1") is None


def test_forget(inv: Inv) -> None:
    inv.world.publish(backend())
    inv.world.mark_healthy("b1")
    inv.inventory.startService()
    inv.inventory.forget("b1")
    assert inv.inventory.has("b1", "llama3") is None
    assert inv.inventory.entries("b1") == {}


# -- end to end --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reads_a_simulator(simulators: Any, real_http: Any) -> None:
    from twisted.internet import reactor

    sim = await simulators(models=["llama3", "qwen2.5:0.5b", "library/all-minilm"])
    world = World(http=real_http)  # its fake clock stays still: the services get the reactor
    world.publish(sim_backend("b1", sim))
    world.mark_healthy("b1")
    inventory = ModelInventory(
        registry=world.registry, runtime=world.runtime, clock=reactor, http=real_http, interval=60
    )
    world.registry.subscribe(inventory.configuration_changed)
    inventory.startService()
    try:
        await until(lambda: inventory.known("b1"))
        assert set(inventory.entries("b1")) == {
            "llama3:latest",
            "qwen2.5:0.5b",
            "all-minilm:latest",
        }
        assert inventory.has("b1", "Qwen2.5:0.5B")
        assert not inventory.is_loaded("b1", "llama3")
        client = HTTPClient(real_http._agent)
        answer = await client.post(
            f"{sim.url}/api/generate", json={"model": "llama3", "prompt": "hi", "stream": False}
        )
        assert answer.code == 200
        await answer.content()
        await inventory.refresh_now("b1")
        assert inventory.is_loaded("b1", "llama3:latest")
        assert inventory.loaded_entries("b1")["llama3:latest"]["name"] == "llama3:latest"
    finally:
        inventory.stopService()
