"""Placement decisions with no reactor: what a load would mean on each backend, the order of
candidates for ``ModelAware`` frontends, what a load started changes, conversations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st

from ollamaflow.gateway.placement import (
    HOT_PER_MINUTE,
    Conversations,
    Fit,
    Placement,
    conversation_of,
)
from ollamaflow.records import Backend
from ollamaflow.runtime import Runtime

GB = 1_000_000_000


@attrs.define
class Shelves:
    """An inventory: each backend's models on disk and in VRAM, in bytes."""

    disk: dict[str, dict[str, dict[str, Any]]] = attrs.field(factory=dict)
    vram: dict[str, dict[str, dict[str, Any]]] = attrs.field(factory=dict)

    def entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]:
        return self.disk.get(backend_id, {})

    def loaded_entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]:
        return self.vram.get(backend_id, {})

    def box(self, backend_id: str, *, disk: dict[str, int], loaded: tuple[str, ...] = ()) -> None:
        self.disk[backend_id] = {k: {"name": k, "size": n} for k, n in disk.items()}
        self.vram[backend_id] = {k: {"name": k, "size_vram": disk[k]} for k in loaded}


@attrs.define
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


MODELS = {"llama3:latest": 4 * GB, "mistral:latest": 4 * GB, "phi3:latest": 2 * GB}


def backend(name: str, vram: int = 9 * GB) -> Backend:
    return Backend(identifier=name, vram_bytes=vram)


def fleet(
    waiting: Mapping[str, int] | None = None,
) -> tuple[Placement, Shelves, Runtime, Clock]:
    shelves, runtime, clock = Shelves(), Runtime(), Clock()
    counts = dict(waiting or {})
    placement = Placement(shelves, runtime, clock, waiting=lambda key: counts.get(key, 0))
    return placement, shelves, runtime, clock


def busy(runtime: Runtime, backend_id: str, model: str) -> None:
    runtime.state(backend_id).begin(model)


def test_a_load_is_warm_free_evicting_or_blocked() -> None:
    placement, shelves, runtime, _ = fleet()
    shelves.box("a", disk=MODELS, loaded=("llama3:latest",))
    shelves.box("b", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    a, b = backend("a"), backend("b")
    assert placement.fit(a, "llama3:latest") == (Fit.WARM, [])
    assert placement.fit(a, "phi3:latest") == (Fit.FREE, [])
    assert placement.fit(b, "phi3:latest")[0] is Fit.EVICT
    busy(runtime, "b", "llama3:latest")
    assert placement.fit(b, "phi3:latest") == (Fit.EVICT, ["mistral:latest"])
    busy(runtime, "b", "mistral:latest")
    assert placement.fit(b, "phi3:latest") == (Fit.BLOCKED, [])


def test_a_model_waiting_in_the_queue_is_not_evicted_either() -> None:
    placement, shelves, _, _ = fleet(waiting={"mistral:latest": 1})
    shelves.box("b", disk=MODELS, loaded=("mistral:latest",))
    small = backend("b", vram=5 * GB)
    assert placement.fit(small, "llama3:latest") == (Fit.BLOCKED, [])


def test_the_least_recently_used_idle_model_goes_first() -> None:
    placement, shelves, _, clock = fleet()
    shelves.box("b", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    b = backend("b")
    placement.sent(b, "mistral")
    clock.now += 10
    placement.sent(b, "llama3")
    assert placement.fit(b, "phi3:latest") == (Fit.EVICT, ["mistral:latest"])


def test_capacity_unset_is_learned_from_what_was_seen_loaded() -> None:
    placement, shelves, _, _ = fleet()
    unknown = backend("a", vram=0)
    shelves.box("a", disk=MODELS)
    assert placement.fit(unknown, "llama3:latest")[0] is Fit.FREE  # an empty box takes one
    shelves.box("a", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    placement.refreshed("a")
    shelves.box("a", disk=MODELS, loaded=("llama3:latest",))
    placement.refreshed("a")
    # 8 GB were seen loaded at once: 4 GB more fit without evicting.
    assert placement.fit(unknown, "mistral:latest")[0] is Fit.FREE
    shelves.box("a", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    assert placement.fit(unknown, "phi3:latest")[0] is Fit.EVICT


def test_warm_copies_first_and_no_load_while_one_is_warm() -> None:
    placement, shelves, _, _ = fleet()
    shelves.box("a", disk=MODELS)
    shelves.box("b", disk=MODELS, loaded=("llama3:latest",))
    shelves.box("c", disk=MODELS, loaded=("llama3:latest",))
    order = placement.order([backend("a"), backend("b"), backend("c")], "llama3")
    assert [b.identifier for b in order] == ["b", "c"]


def test_no_warm_copy_free_vram_before_evicting_and_never_blocked() -> None:
    placement, shelves, runtime, clock = fleet()
    shelves.box("full-old", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    shelves.box("full-new", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    shelves.box("roomy", disk=MODELS, loaded=("llama3:latest",))
    shelves.box("stuck", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    for name in ("full-old", "full-new"):
        placement.sent(backend(name), "llama3")
        placement.sent(backend(name), "mistral")
        clock.now += 5
    busy(runtime, "stuck", "llama3:latest")
    busy(runtime, "stuck", "mistral:latest")
    boxes = [backend(n) for n in ("full-new", "stuck", "full-old", "roomy")]
    order = placement.order(boxes, "phi3")
    assert [b.identifier for b in order] == ["roomy", "full-old", "full-new"]


def test_a_long_queue_may_load_another_copy() -> None:
    placement, shelves, _, _ = fleet(waiting={"llama3:latest": 4})
    shelves.box("a", disk=MODELS, loaded=("llama3:latest",))
    shelves.box("b", disk=MODELS)
    order = placement.order([backend("a"), backend("b")], "llama3")
    assert [b.identifier for b in order] == ["a", "b"]
    assert [b.identifier for b in placement.admissible([backend("b")], "llama3")] == ["b"]


def test_a_waiting_request_takes_a_cold_slot_only_when_nothing_is_warm() -> None:
    placement, shelves, _, _ = fleet()
    shelves.box("a", disk=MODELS, loaded=("llama3:latest",))
    shelves.box("b", disk=MODELS)
    both = [backend("a"), backend("b")]
    assert [b.identifier for b in placement.admissible(both, "llama3")] == ["a"]
    assert [b.identifier for b in placement.admissible([backend("b")], "llama3")] == ["b"]


def test_a_load_sent_counts_and_is_warm_until_the_next_reading_says_otherwise() -> None:
    placement, shelves, _, clock = fleet()
    shelves.box("b", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    b = backend("b")
    placement.sent(b, "llama3")
    clock.now += 1
    placement.sent(b, "phi3")
    stats = placement.stats["b"]
    assert (stats.loads, stats.evictions) == (1, 1)
    assert set(placement.loaded("b")) == {"llama3:latest", "phi3:latest"}
    assert placement.fit(b, "phi3:latest")[0] is Fit.WARM
    placement.refreshed("b")  # the reading does not show phi3 yet: a load takes seconds
    assert "phi3:latest" in placement.loaded("b")
    assert "mistral:latest" in placement.loaded("b")  # the reading wins for evictions
    clock.now += 600
    placement.refreshed("b")
    assert "phi3:latest" not in placement.loaded("b")
    placement.sent(b, "llama3")
    assert placement.stats["b"].loads == 1, "a warm model is no load"


def test_holds_agrees_with_loaded() -> None:
    placement, shelves, _, clock = fleet()
    shelves.box("b", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    b = backend("b")
    keys = ("llama3:latest", "mistral:latest", "phi3:latest")
    assert [placement.holds("b", k) for k in keys] == [True, True, False]
    placement.sent(b, "llama3")
    clock.now += 1
    placement.sent(b, "phi3")  # loads phi3, evicts mistral
    for k in keys:
        assert placement.holds("b", k) == (k in placement.loaded("b"))
    assert [placement.holds("b", k) for k in keys] == [True, False, True]
    assert not placement.holds("nobody", "llama3:latest")


def test_a_preload_counts_as_a_load_and_a_preload() -> None:
    placement, shelves, _, _ = fleet()
    shelves.box("b", disk=MODELS)
    placement.sent(backend("b"), "llama3", preload=True)
    assert placement.stats["b"].to_wire() == {
        "Loads": 1,
        "Evictions": 0,
        "Preloads": 1,
        "AffinityHits": 0,
    }


def chat(*contents: str) -> dict[str, Any]:
    roles = ["user", "assistant"]
    return {
        "model": "llama3",
        "messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)],
    }


def test_the_next_turn_of_a_conversation_goes_where_the_last_one_went() -> None:
    placement, shelves, _, _ = fleet()
    for name in ("a", "b"):
        shelves.box(name, disk=MODELS, loaded=("llama3:latest",))
    a, b = backend("a"), backend("b")
    first = conversation_of(chat("hi"))
    assert first is not None
    placement.served(first, b)
    second = conversation_of(chat("hi", "hello!", "how are you?"))
    assert second is not None
    order = placement.order([a, b], "llama3", second)
    assert [x.identifier for x in order] == ["b", "a"]
    assert placement.stats["b"].affinity_hits == 1
    # Without a free slot there, normal routing.
    order = placement.order([a, b], "llama3", second, has_slot=lambda x: x.identifier != "b")
    assert [x.identifier for x in order] == ["a", "b"]
    other = conversation_of(chat("something else", "ok", "more"))
    assert other is not None
    assert [x.identifier for x in placement.order([a, b], "llama3", other)] == ["a", "b"]


def test_a_conversation_is_digests_of_its_prefixes_never_the_text() -> None:
    one = conversation_of(chat("secret words", "reply"))
    two = conversation_of({"messages": [{"content": "secret words", "role": "user"}]})
    assert one is not None and two is not None
    assert one.prefixes[0] == two.prefixes[0], "key order does not matter"
    assert all(len(p) == 16 and b"secret" not in p for p in one.prefixes)
    assert conversation_of({"messages": []}) is None
    assert conversation_of({"prompt": "hi"}) is None


def test_conversations_remembered_are_bounded() -> None:
    remembered = Conversations(limit=3)
    for n in range(10):
        found = conversation_of(chat(str(n)))
        assert found is not None
        remembered.served(found, f"b{n}")
    assert len(remembered) == 3


@given(st.lists(st.sampled_from(list(MODELS)), max_size=30))
def test_the_order_never_offers_a_load_that_would_evict_a_busy_model(asked: list[str]) -> None:
    """Whatever was sent before, with one model busy on each box, no box whose load would
    evict it is ever in the order."""
    placement, shelves, runtime, clock = fleet()
    boxes = [backend(n, vram=8 * GB) for n in ("a", "b", "c")]
    for b in boxes:
        shelves.box(b.identifier, disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
        busy(runtime, b.identifier, "mistral:latest")
    for model in asked:
        clock.now += 1
        order = placement.order(boxes, model)
        for chosen in order[:1]:
            placement.sent(chosen, model)
    for b in boxes:
        assert "mistral:latest" in placement.loaded(b.identifier)


def test_a_model_asked_for_often_is_hot() -> None:
    placement, shelves, _, clock = fleet()
    shelves.box("a", disk=MODELS, loaded=("llama3:latest",))
    assert not placement.is_hot("llama3")
    for _ in range(int(HOT_PER_MINUTE) + 1):
        placement.order([backend("a")], "llama3")
        clock.now += 5
    assert placement.is_hot("llama3")
    clock.now += 3600
    placement.order([backend("a")], "phi3")
    assert not placement.is_hot("phi3")


def test_deleted_backends_are_forgotten() -> None:
    placement, shelves, _, _ = fleet()
    shelves.box("a", disk=MODELS)
    placement.sent(backend("a"), "llama3")
    found = conversation_of(chat("x"))
    assert found is not None
    placement.served(found, backend("a"))
    placement.forget_all_but(["b"])
    assert placement.stats == {}
    assert len(placement.conversations) == 0


def test_a_model_loaded_elsewhere_too_is_evicted_before_the_last_copy_of_another() -> None:
    placement, shelves, _, clock = fleet()
    shelves.box("a", disk=MODELS, loaded=("llama3:latest",))
    shelves.box("b", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    b = backend("b")
    placement.refreshed("a")
    placement.sent(b, "mistral")
    clock.now += 10
    placement.sent(b, "llama3")  # used more lately, but a holds it too
    assert placement.fit(b, "phi3:latest") == (Fit.EVICT, ["llama3:latest"])
    placement.refreshed("b")
    shelves.box("a", disk=MODELS)
    placement.refreshed("a")
    assert placement.fit(b, "phi3:latest") == (Fit.EVICT, ["mistral:latest"]), "LRU again"
    assert placement.copy_counts()["llama3:latest"] == 1
