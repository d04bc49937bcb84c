"""Placement end to end (``"LoadBalancing": "ModelAware"``): a daemon with its real inventory,
health checker and preloader, in front of simulators that model VRAM, loads, evictions and
prompt caches. Where a request lands, what the boxes load and evict, and what the counters say.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from harness import Collect, DaemonUnderTest, start_daemon, until
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from ollamaflow.sim.service import RunningSimulator

FAST = {"HealthCheckIntervalMs": 100, "ModelRefreshIntervalMs": 1000}
#: VRAM per box: llama3 (4.66 GB) and mistral (4.11 GB) fit, but leave too little for phi3
#: (2.18 GB).
VRAM = 10_000_000_000
MODELS = ("llama3", "mistral", "phi3")
ZERO = {"Loads": 0, "Evictions": 0, "Preloads": 0, "AffinityHits": 0}


class Fleet(DaemonUnderTest):
    """Simulators behind one frontend, and what a test asks of them."""

    async def box(self, name: str, *, loaded: tuple[str, ...] = (), **knobs: Any) -> None:
        """A simulator with VRAM for two models (the backend says so too), ``loaded`` already."""
        sim = await self.add(
            name,
            models=MODELS,
            backend={"VramBytes": VRAM, **knobs.pop("backend", {})},
            vram_bytes=VRAM,
            **knobs,
        )
        for model in loaded:
            response = await treq.post(
                sim.url + "/api/generate", json={"model": model}, persistent=False
            )
            assert (await response.json())["done_reason"] == "load"

    async def ready(self, *names: str, **frontend: Any) -> None:
        """Serve ``names`` and wait until the inventory shows what each simulator holds."""
        await self.serve(*names, **{"LoadBalancing": "ModelAware", **frontend})
        inventory = self.daemon.inventory
        for name in names:
            await inventory.refresh_now(name)
            for model in ps(self.sims[name]):
                await until(partial(inventory.is_loaded, name, model), what=model)

    async def post(self, path: str, body: Any) -> Any:
        return await treq.post(self.url + path, json=body, persistent=False)

    async def generate(self, model: str, **extra: Any) -> tuple[str, dict[str, Any]]:
        """A whole (non-streaming) generate: the backend that answered, and the answer."""
        body = {"model": model, "prompt": "hi", "stream": False, **extra}
        response = await self.post("/api/generate", body)
        text = await response.text()
        assert response.code == 200, text
        return served_by(response), json.loads(text)

    async def chat(self, messages: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        body = {"model": "llama3", "messages": messages, "stream": False}
        response = await self.post("/api/chat", body)
        text = await response.text()
        assert response.code == 200, text
        return served_by(response), json.loads(text)

    async def stream(self, model: str, **extra: Any) -> Stream:
        """A streaming generate, under way: its first line has arrived."""
        response = await self.post("/api/generate", {"model": model, "prompt": "hi", **extra})
        assert response.code == 200
        collect = Collect()
        response.deliverBody(collect)
        await until(lambda: collect.data, what=f"the first line of a {model} stream")
        return Stream(served_by(response), collect)

    async def health(self) -> dict[str, Any]:
        reply = await self.http.get("/v1.0/health")
        assert reply.status == 200
        health: dict[str, Any] = reply.json
        return health

    async def queue(self) -> dict[str, Any]:
        """The frontend's queue record in ``/v1.0/health``."""
        (queue,) = [q for q in (await self.health())["Queues"] if q["Identifier"] == "frontend1"]
        return dict(queue)

    async def queue_depth(self) -> int:
        return int((await self.queue())["QueueDepth"])

    async def llama3_and_room(self, slots: int, tokens: int, **b: Any) -> None:
        """Box ``a`` with llama3 loaded and ``slots`` slots, box ``b`` empty: both generate
        ``tokens`` tokens at 4 a second."""
        await self.box(
            "a",
            loaded=("llama3",),
            backend={"MaxParallelRequests": slots},
            tokens=tokens,
            tokens_per_second=4,
        )
        await self.box("b", tokens=tokens, tokens_per_second=4, **b)
        await self.ready("a", "b")

    async def metric(self, name: str, backend: str) -> float:
        reply = await self.http.get("/metrics")
        assert reply.status == 200
        return sum(
            sample.value
            for family in text_string_to_metric_families(reply.body.decode())
            for sample in family.samples
            if sample.name == name and sample.labels.get("backend") == backend
        )

    async def backend_placement(self) -> dict[str, dict[str, int]]:
        reply = await self.http.get("/v1.0/backends/health")
        assert reply.status == 200
        return {r["Identifier"]: r["Placement"] for r in reply.json if r["Identifier"] in self.sims}


class Stream:
    """A streaming response being read."""

    def __init__(self, backend: str, collect: Collect) -> None:
        self.backend = backend
        self.collect = collect

    @property
    def finished(self) -> bool:
        return self.collect.done.called

    async def lines(self) -> list[dict[str, Any]]:
        body = await self.collect.done
        return [json.loads(line) for line in body.splitlines() if line.strip()]


def served_by(response: Any) -> str:
    return str(response.headers.getRawHeaders("x-ollamaflow-backend")[0])


def ps(sim: RunningSimulator) -> dict[str, float]:
    """What the simulator has loaded (``/api/ps``, without ``:latest``): seconds until each
    expires."""
    now = reactor.seconds()
    return {
        entry["name"].removesuffix(":latest"): datetime.fromisoformat(
            entry["expires_at"]
        ).timestamp()
        - now
        for entry in sim.state.scheduler.loaded()
    }


def evicted(sim: RunningSimulator) -> list[str]:
    return [
        e["model"].removesuffix(":latest")
        for e in sim.state.events.unloaded
        if e["reason"] == "evicted"
    ]


async def whole(stream: Stream, tokens: int, reason: str = "stop") -> None:
    """The stream ended with every token and ``done``, nothing cut off (``reason``: "length"
    when ``num_predict`` ended it)."""
    lines = await stream.lines()
    assert stream.collect.reason is not None
    assert [line["done"] for line in lines] == [False] * tokens + [True]
    assert lines[-1]["done_reason"] == reason


@pytest_twisted.async_yield_fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    made = Fleet(await start_daemon(tmp_path, FAST))
    yield made
    await made.stop()


# -- cold loads --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_cold_model_goes_where_vram_is_free_not_where_it_must_evict(
    fleet: Fleet,
) -> None:
    await fleet.box("a", loaded=("llama3", "mistral"))
    await fleet.box("b", loaded=("llama3",))
    await fleet.ready("a", "b")
    for _ in range(3):  # whatever the balancer's turn
        backend, answer = await fleet.generate("phi3")
        assert backend == "b" and answer["done"] is True
    a, b = fleet.sims["a"], fleet.sims["b"]
    assert (a.counters.loads, a.counters.evictions) == (2, 0), "a never loaded phi3"
    assert (b.counters.loads, b.counters.evictions) == (2, 0)
    assert set(ps(a)) == {"llama3", "mistral"} and set(ps(b)) == {"llama3", "phi3"}
    assert (await fleet.health())["Placement"] == {**ZERO, "Loads": 1}
    placed = await fleet.backend_placement()
    assert placed == {"a": ZERO, "b": {**ZERO, "Loads": 1}}
    assert await fleet.metric("ollamaflow_model_loads_total", "b") == 1
    assert await fleet.metric("ollamaflow_model_loads_total", "a") == 0
    assert await fleet.metric("ollamaflow_model_evictions_total", "a") == 0


@pytest_twisted.ensureDeferred
async def test_a_load_evicts_the_idle_model_never_the_busy_one(fleet: Fleet) -> None:
    await fleet.box("solo", loaded=("llama3", "mistral"), tokens=30, tokens_per_second=20)
    await fleet.ready("solo")
    sim = fleet.sims["solo"]
    busy = await fleet.stream("mistral")  # 1.5 s
    backend, answer = await fleet.generate("phi3", options={"num_predict": 1})
    assert backend == "solo" and answer["done"] is True
    assert not busy.finished, "phi3 was served while mistral streamed"
    await whole(busy, 30)
    assert evicted(sim) == ["llama3"]
    assert set(ps(sim)) == {"mistral", "phi3"}
    assert (sim.counters.loads, sim.counters.evictions) == (3, 1)
    assert (await fleet.health())["Placement"] == {**ZERO, "Loads": 1, "Evictions": 1}
    assert await fleet.metric("ollamaflow_model_evictions_total", "solo") == 1


@pytest_twisted.ensureDeferred
async def test_a_busy_model_used_before_an_idle_one_does_not_block_the_load(
    fleet: Fleet,
) -> None:
    """The box evicts the least recently used *idle* model (Ollama does, and so does the
    simulator): that mistral is busy and was sent before llama3 does not make the load
    impossible, since evicting llama3 alone makes room for phi3."""
    await fleet.box("solo", loaded=("llama3", "mistral"), tokens=30, tokens_per_second=20)
    await fleet.ready("solo")
    sim = fleet.sims["solo"]
    busy = await fleet.stream("mistral")  # 1.5 s
    backend, _ = await fleet.generate("llama3", options={"num_predict": 1})  # now idle again
    assert backend == "solo"
    backend, answer = await fleet.generate("phi3", options={"num_predict": 1})
    assert backend == "solo" and answer["done"] is True
    assert not busy.finished, "phi3 waited for the mistral stream to end"
    await whole(busy, 30)
    assert evicted(sim) == ["llama3"]
    assert set(ps(sim)) == {"mistral", "phi3"}


@pytest_twisted.ensureDeferred
async def test_a_load_that_would_evict_only_busy_models_waits_in_the_queue(
    fleet: Fleet,
) -> None:
    await fleet.box("solo", loaded=("llama3", "mistral"), tokens=30, tokens_per_second=20)
    await fleet.ready("solo")
    sim = fleet.sims["solo"]
    short = await fleet.stream("llama3", options={"num_predict": 16})  # 0.8 s
    long = await fleet.stream("mistral")  # 1.5 s
    asked = reactor.seconds()
    pending = ensureDeferred(fleet.generate("phi3", options={"num_predict": 1}))
    await until(fleet.queue_depth, what="phi3 waiting in the frontend's queue")
    assert sim.counters.requests.get("/api/generate") == 4, "2 loads, 2 streams: phi3 not sent"
    assert (await fleet.health())["ActiveRequests"] == 2
    backend, answer = await pending
    waited = reactor.seconds() - asked
    assert backend == "solo" and answer["done"] is True
    assert short.finished and not long.finished, "served once llama3 was idle, not before"
    assert waited > 0.3
    await whole(short, 16, "length")
    await whole(long, 30)
    assert evicted(sim) == ["llama3"]
    assert await fleet.queue_depth() == 0
    assert (await fleet.health())["Placement"] == {**ZERO, "Loads": 1, "Evictions": 1}


# -- conversations -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_conversations_next_turn_returns_to_its_cached_prompt(fleet: Fleet) -> None:
    for name in ("x", "y"):
        await fleet.box(name, loaded=("llama3",), num_parallel=4, prompt_tokens_per_second=10_000)
    await fleet.ready("x", "y")
    first = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    home, answer = await fleet.chat(first)
    away = "y" if home == "x" else "x"
    # An even number of other requests between the turns: the balancer's own turn (ties are
    # broken round robin) would give the next one to the other backend.
    spread = [(await fleet.generate("llama3", prompt=f"unrelated {i}"))[0] for i in range(4)]
    assert sorted(spread) == ["x", "x", "y", "y"], "the other requests are spread"
    hits = fleet.sims[home].counters.cache_hits
    assert await fleet.metric("ollamaflow_affinity_hits_total", home) == 0
    second = [*first, answer["message"], {"role": "user", "content": "And at sunset?"}]
    backend, reply = await fleet.chat(second)
    assert backend == home
    assert fleet.sims[home].counters.cache_hits == hits + 1
    assert reply["prompt_eval_count"] < 20, "only the new message was evaluated"
    assert await fleet.metric("ollamaflow_affinity_hits_total", home) >= 1
    assert await fleet.metric("ollamaflow_affinity_hits_total", away) == 0
    placed = await fleet.backend_placement()
    assert placed[home]["AffinityHits"] >= 1 and placed[away]["AffinityHits"] == 0
    assert (await fleet.health())["Placement"]["Loads"] == 0


# -- preloading --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_queue_for_a_model_preloads_it_where_vram_is_free(fleet: Fleet) -> None:
    await fleet.llama3_and_room(slots=1, tokens=6, load_time=0.2)
    b = fleet.sims["b"]
    assert ps(b) == {}
    first = await fleet.stream("llama3")  # 1.5 s on a, its only slot
    assert first.backend == "a"
    queued = [ensureDeferred(fleet.stream("llama3")) for _ in range(2)]
    streams = [first, *[await s for s in queued]]
    for stream in streams:
        await whole(stream, 6)
    served = [s.backend for s in streams]
    assert "b" in served[1:], f"queued requests went to the preloaded copy: {served}"
    assert b.counters.loads == 1 and b.counters.evictions == 0
    on_b = served.count("b")
    assert b.counters.requests["/api/generate"] == on_b + 1, "and one more: the preload"
    assert b.counters.tokens == 6 * on_b, "which was empty"
    assert fleet.sims["a"].counters.loads == 1, "only the load before the test"
    health = await fleet.health()
    assert health["Placement"]["Preloads"] >= 1
    assert await fleet.metric("ollamaflow_model_preloads_total", "b") >= 1
    assert await fleet.metric("ollamaflow_model_preloads_total", "a") == 0
    assert (await fleet.backend_placement())["b"]["Preloads"] >= 1


@pytest_twisted.ensureDeferred
async def test_copies_kept_busy_get_another_in_free_vram_before_anything_waits(
    fleet: Fleet,
) -> None:
    await fleet.llama3_and_room(slots=2, tokens=12)
    b = fleet.sims["b"]
    streams = [await fleet.stream("llama3") for _ in range(2)]
    assert [s.backend for s in streams] == ["a", "a"]
    await until(lambda: "llama3" in ps(b), what="llama3 preloaded onto b")
    assert b.counters.requests["/api/generate"] == 1 and b.counters.tokens == 0, "the preload"
    assert (await fleet.queue())["Queued"] == 0, "nothing waited"
    for stream in streams:
        await whole(stream, 12)


@pytest_twisted.ensureDeferred
async def test_a_long_queue_replaces_an_idle_copy_of_a_model_held_elsewhere(fleet: Fleet) -> None:
    await fleet.box(
        "a",
        loaded=("llama3", "phi3"),
        backend={"MaxParallelRequests": 1},
        tokens=8,
        tokens_per_second=4,
    )
    await fleet.box("b", loaded=("llama3", "mistral"), tokens=8, tokens_per_second=4)
    await fleet.ready("a", "b")
    fleet.daemon.placement.demand.horizon = 0.5  # seconds of queue make the demand sustained
    b = fleet.sims["b"]
    streams = [ensureDeferred(fleet.stream("phi3")) for _ in range(4)]
    served = [(await stream).backend for stream in streams]
    assert "b" in served, f"the queue went to the copy loaded in llama3's place: {served}"
    assert evicted(b) == ["llama3"], "the copy a holds too, not mistral's only one"
    assert set(ps(b)) == {"mistral", "phi3"}
    assert set(ps(fleet.sims["a"])) == {"llama3", "phi3"}
    placement = (await fleet.backend_placement())["b"]
    assert (placement["Preloads"], placement["Evictions"]) == (1, 1)


# -- keep_alive --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_model_in_demand_is_kept_loaded_longer_unless_the_client_says(
    fleet: Fleet,
) -> None:
    await fleet.box("solo")
    await fleet.ready("solo")
    sim = fleet.sims["solo"]
    await fleet.generate("llama3")
    assert 250 < ps(sim)["llama3"] <= 300, "once is not demand: the server's default"
    for _ in range(7):
        await fleet.generate("llama3")
    assert 29 * 60 < ps(sim)["llama3"] <= 30 * 60
    await fleet.generate("llama3", keep_alive="10m")
    assert 9 * 60 < ps(sim)["llama3"] <= 10 * 60, "the client's keep_alive"
    await fleet.generate("llama3", keep_alive=-1)
    assert ps(sim)["llama3"] > 365 * 24 * 3600, "the client's forever"
    await fleet.generate("mistral")
    assert 250 < ps(sim)["mistral"] <= 300, "demand is counted per model"


# -- other policies ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_least_outstanding_frontends_are_left_alone(fleet: Fleet) -> None:
    await fleet.box("a", loaded=("llama3", "mistral"))
    await fleet.box("b", loaded=("llama3",))
    await fleet.ready("a", "b", LoadBalancing="LeastOutstanding")
    for _ in range(4):
        await fleet.generate("phi3")
    chat = [{"role": "user", "content": "Why is the sky blue?"}]
    for _ in range(2):
        await fleet.chat(chat)
    for _ in range(6):
        await fleet.generate("llama3")
    for name in ("a", "b"):
        assert all(left <= 300 for left in ps(fleet.sims[name]).values()), "no keep_alive added"
    assert (await fleet.health())["Placement"] == ZERO
    assert await fleet.backend_placement() == {"a": ZERO, "b": ZERO}
    for metric in (
        "ollamaflow_model_loads_total",
        "ollamaflow_model_evictions_total",
        "ollamaflow_model_preloads_total",
        "ollamaflow_affinity_hits_total",
    ):
        for name in ("a", "b"):
            assert await fleet.metric(metric, name) == 0, (metric, name)
