"""Placement decisions with no reactor: what a load would mean on each backend, the order of
candidates for ``ModelAware`` frontends, what a load started changes, conversations."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ollamaflow.gateway.placement import (
    DEMAND_HORIZON,
    DEMAND_KEYS,
    FILL_PER_COPY,
    HOT_PER_MINUTE,
    UNUSED,
    Conversations,
    Demand,
    Fit,
    Move,
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


def test_a_long_queue_waits_for_a_warm_copy_the_plan_adds_copies() -> None:
    placement, shelves, _, _ = fleet(waiting={"llama3:latest": 40})
    shelves.box("a", disk=MODELS, loaded=("llama3:latest",))
    shelves.box("b", disk=MODELS)
    both = [backend("a"), backend("b")]
    assert [b.identifier for b in placement.order(both, "llama3")] == ["a"]
    assert [b.identifier for b in placement.admissible(both, "llama3")] == ["a"]


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


# -- demand and the plan -----------------------------------------------------------------------


def test_demand_is_the_latest_count_or_its_average_whichever_is_more() -> None:
    demand = Demand(horizon=10.0)
    demand.sample(0.0, {"llama3:latest": 4})
    assert demand.of("llama3:latest") == demand.smoothed("llama3:latest") == 4.0
    demand.sample(10.0, {})
    faded = 4 * math.exp(-1)
    assert demand.smoothed("llama3:latest") == pytest.approx(faded)
    assert demand.of("llama3:latest") == pytest.approx(faded), "the average outlives the count"
    demand.sample(10.5, {"phi3:latest": 6})
    assert demand.of("phi3:latest") == 6.0, "a burst is seen at once"
    assert demand.smoothed("phi3:latest") < 1.0, "and counts little yet on average"
    demand.sample(200.0, {})
    assert demand.of("llama3:latest") == demand.of("phi3:latest") == 0.0


def test_demand_counts_requests_asked_per_second_too() -> None:
    demand = Demand(horizon=10.0)
    demand.sample(0.0, {})
    for _ in range(20):
        demand.asked("llama3:latest")
    for _ in range(5):
        demand.asked("phi3:latest")
    demand.sample(2.0, {})
    weight = 1 - math.exp(-0.2)
    assert demand.rate("llama3:latest") == pytest.approx(10 * weight)
    assert demand.rate("phi3:latest") == pytest.approx(2.5 * weight)
    demand.sample(4.0, {})
    assert demand.rate("llama3:latest") < 10 * weight, "nothing asked since: it fades"
    assert demand.rate("mistral:latest") == 0.0


def test_models_remembered_in_the_demand_are_bounded() -> None:
    demand = Demand()
    demand.sample(0.0, {f"m{n}:latest": 1 for n in range(DEMAND_KEYS + 50)})
    for n in range(DEMAND_KEYS + 50):
        demand.asked(f"a{n}:latest")
    demand.sample(1.0, {f"x{n}:latest": 1 for n in range(50)})
    assert len(demand._level) <= DEMAND_KEYS
    assert len(demand._rate) <= DEMAND_KEYS


def sustained(placement: Placement, clock: Clock, counts: Mapping[str, float]) -> None:
    """``counts`` in flight and waiting for three horizons: what the plan sees as sustained."""
    for _ in range(60):
        placement.demand.sample(clock(), counts)
        clock.now += DEMAND_HORIZON / 20


def test_a_waiting_model_is_preloaded_into_free_vram_first() -> None:
    placement, shelves, _, _ = fleet(waiting={"phi3:latest": 1})
    shelves.box("full", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    shelves.box("roomy", disk=MODELS, loaded=("llama3:latest",))
    for name in ("full", "roomy"):
        placement.refreshed(name)
    full, roomy = backend("full"), backend("roomy")
    move = placement.next_move({"phi3:latest": [full, roomy]}, {"phi3:latest": 1})
    assert move == Move(roomy, "phi3:latest")


def test_copies_go_one_at_a_time_to_the_most_demand_per_copy() -> None:
    placement, shelves, _, clock = fleet()
    placement.preload_queue_depth = 2
    boxes = [backend(name) for name in ("a", "b", "c", "d")]
    for box in boxes:
        shelves.box(box.identifier, disk=MODELS)
        placement.refreshed(box.identifier)
    keys = ("llama3:latest", "mistral:latest")
    assert placement.next_move({k: boxes for k in keys}, dict.fromkeys(keys, 1)) is None
    placement.demand.sample(clock(), {"llama3:latest": 5, "mistral:latest": 2})
    waiting = {"llama3:latest": 4, "mistral:latest": 2}
    dealt = []
    for box in boxes:
        move = placement.next_move({k: [box] for k in keys}, waiting)
        assert move is not None and move.backend == box
        placement.sent(move.backend, move.key, preload=True)
        dealt.append(move.key)
    # demand per copy 5 against 2, 5 against 2, 2.5 against 2, then 1.67 against 2
    assert dealt == ["llama3:latest"] * 3 + ["mistral:latest"]
    assert placement.copy_counts() == {"llama3:latest": 3, "mistral:latest": 1}


def test_copies_follow_the_requests_asked_not_the_queue_they_made() -> None:
    placement, shelves, _, clock = fleet()
    shelves.box("a", disk=MODELS, loaded=("llama3:latest",))
    shelves.box("b", disk=MODELS, loaded=("mistral:latest",))
    shelves.box("c", disk=MODELS)
    for name in ("a", "b", "c"):
        placement.refreshed(name)
    c = backend("c")
    placement.demand.sample(clock(), {})
    for _ in range(8):
        placement.order([backend("a")], "llama3")
    for _ in range(6):
        placement.order([backend("b")], "mistral")
    clock.now += 1
    # mistral's one copy has the longer queue, llama3's one copy was asked for more
    placement.demand.sample(clock(), {"llama3:latest": 3, "mistral:latest": 6})
    waiting = {"llama3:latest": 1, "mistral:latest": 4}
    move = placement.next_move({"llama3:latest": [c], "mistral:latest": [c]}, waiting)
    assert move == Move(c, "llama3:latest")


def test_free_vram_is_filled_while_one_more_copy_would_still_be_busy() -> None:
    placement, shelves, _, clock = fleet()
    shelves.box("a", disk=MODELS, loaded=("llama3:latest",))
    shelves.box("b", disk=MODELS)
    for name in ("a", "b"):
        placement.refreshed(name)
    b = backend("b")
    placement.demand.sample(clock(), {"llama3:latest": 1})
    assert placement.next_move({"llama3:latest": [b]}, {}) is None, "one copy serves one"
    clock.now += 1
    placement.demand.sample(clock(), {"llama3:latest": 2})
    assert placement.next_move({"llama3:latest": [b]}, {}) == Move(b, "llama3:latest")


def test_no_replacement_while_a_box_loading_something_else_has_room() -> None:
    placement, shelves, _, clock = fleet()
    shelves.box("loading", disk=MODELS)
    shelves.box("full", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    shelves.box("other", disk=MODELS, loaded=("llama3:latest",))
    for name in ("loading", "full", "other"):
        placement.refreshed(name)
    loading, full = backend("loading"), backend("full", vram=8 * GB)
    waiting = {"phi3:latest": 4}
    sustained(placement, clock, {"phi3:latest": 6})
    candidates = {"phi3:latest": [full, loading]}
    assert placement.next_move(candidates, waiting, busy={"loading"}) is None
    move = placement.next_move(candidates, waiting)
    assert move == Move(loading, "phi3:latest")
    move = placement.next_move({"phi3:latest": [full]}, waiting, busy={"loading"})
    assert move == Move(full, "phi3:latest", ("llama3:latest",)), "llama3 is loaded elsewhere"


def replacement_fleet(
    waiting: int,
) -> tuple[Placement, Clock, dict[str, list[Backend]], dict[str, int]]:
    """Three full boxes: llama3 on all of them, mistral on two, phi3 on one; phi3's
    requests wait."""
    placement, shelves, _, clock = fleet()
    shelves.box("a", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    shelves.box("b", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    shelves.box("c", disk=MODELS, loaded=("llama3:latest", "phi3:latest"))
    boxes = [backend(n, vram=8 * GB) for n in ("a", "b", "c")]
    for b in boxes:
        placement.refreshed(b.identifier)
    return placement, clock, {"phi3:latest": boxes}, {"phi3:latest": waiting}


def test_a_long_queue_with_sustained_demand_replaces_an_idle_copy_with_less() -> None:
    placement, clock, candidates, waiting = replacement_fleet(waiting=3)
    sustained(placement, clock, {"phi3:latest": 4, "mistral:latest": 1, "llama3:latest": 3})
    move = placement.next_move(candidates, waiting)
    assert move is not None
    assert move.key == "phi3:latest" and move.backend.identifier in ("a", "b")
    assert move.victims == ("mistral:latest",), "1 request per copy left, not llama3's 1.5"


def test_no_replacement_for_a_short_queue_a_burst_or_a_small_margin() -> None:
    placement, clock, candidates, _ = replacement_fleet(waiting=1)
    sustained(placement, clock, {"phi3:latest": 4, "mistral:latest": 1})
    assert placement.next_move(candidates, {"phi3:latest": 1}) is None, "the queue is short"

    placement, clock, candidates, waiting = replacement_fleet(waiting=3)
    sustained(placement, clock, {"mistral:latest": 1, "llama3:latest": 1})
    placement.demand.sample(clock(), {"phi3:latest": 8, "mistral:latest": 1, "llama3:latest": 1})
    assert placement.next_move(candidates, waiting) is None, "a burst is not sustained"

    placement, clock, candidates, waiting = replacement_fleet(waiting=3)
    sustained(placement, clock, {"phi3:latest": 2, "mistral:latest": 2, "llama3:latest": 4})
    assert placement.next_move(candidates, waiting) is None, "mistral is needed as much"


def test_a_last_copy_is_replaced_only_when_its_model_is_unused() -> None:
    placement, shelves, _, clock = fleet()
    shelves.box("a", disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
    a = backend("a", vram=8 * GB)
    placement.refreshed("a")
    waiting = {"phi3:latest": 5}
    sustained(placement, clock, {"phi3:latest": 5, "mistral:latest": 0.2, "llama3:latest": 1})
    assert placement.next_move({"phi3:latest": [a]}, waiting) is None
    sustained(placement, clock, {"phi3:latest": 5, "llama3:latest": 1})
    move = placement.next_move({"phi3:latest": [a]}, waiting)
    assert move == Move(a, "phi3:latest", ("mistral:latest",))


def test_victims_go_by_the_demand_per_copy_they_leave() -> None:
    placement, shelves, _, clock = fleet()
    for name in ("a", "b"):
        shelves.box(name, disk=MODELS, loaded=("llama3:latest", "mistral:latest"))
        placement.refreshed(name)
    b = backend("b", vram=8 * GB)
    placement.sent(b, "llama3")
    clock.now += 10
    placement.sent(b, "mistral")  # used more lately than llama3 ...
    sustained(placement, clock, {"llama3:latest": 6, "mistral:latest": 1})
    # ... but llama3's one copy left would have six requests, mistral's one
    assert placement.fit(b, "phi3:latest") == (Fit.EVICT, ["mistral:latest"])


@given(
    st.dictionaries(st.sampled_from(list(MODELS)), st.integers(0, 6), max_size=3),
    st.dictionaries(st.sampled_from(list(MODELS)), st.integers(0, 8), max_size=3),
    st.lists(st.sets(st.sampled_from(list(MODELS)), max_size=2), min_size=1, max_size=5),
)
def test_a_move_never_evicts_what_is_used_nor_the_last_copy_of_a_model_in_use(
    busy_counts: dict[str, int],
    waiting: dict[str, int],
    held: list[set[str]],
) -> None:
    """Whatever each box holds and whatever is busy or waiting: a move is for a model that
    waits or has the demand for one more copy, onto a box that has it on disk and not loaded,
    evicting (only for a long queue) no model busy there or waited for, nor the last copy of a
    model with demand, and leaving its VRAM within bounds."""
    placement, shelves, runtime, clock = fleet(waiting=waiting)
    boxes = [backend(f"b{i}", vram=8 * GB) for i in range(len(held))]
    for box, models in zip(boxes, held, strict=True):
        shelves.box(box.identifier, disk=MODELS, loaded=tuple(sorted(models)))
        placement.refreshed(box.identifier)
    for i, (model, count) in enumerate(sorted(busy_counts.items())):
        for _ in range(count):
            busy(runtime, boxes[i % len(boxes)].identifier, model)
    sustained(placement, clock, {k: busy_counts.get(k, 0) + waiting.get(k, 0) for k in MODELS})
    copies = placement.copy_counts()
    move = placement.next_move({k: boxes for k in waiting}, waiting)
    if move is None:
        return
    queued = waiting.get(move.key, 0)
    if move.victims:
        assert queued >= placement.evict_queue_depth
    else:
        more = placement.demand.of(move.key) / (copies.get(move.key, 0) + 1)
        assert queued >= placement.preload_queue_depth or more >= FILL_PER_COPY
    held_there = placement.loaded(move.backend.identifier)
    assert move.key not in held_there
    state = runtime.states.get(move.backend.identifier)
    for victim in move.victims:
        assert not waiting.get(victim)
        assert state is None or not state.active_by_model.get(victim)
        assert copies[victim] > 1 or placement.demand.smoothed(victim) < UNUSED
    left = sum(n for k, n in held_there.items() if k not in move.victims)
    assert left + MODELS[move.key] <= 8 * GB
