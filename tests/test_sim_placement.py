"""The simulator's placement model on a `task.Clock`: VRAM and LRU eviction, load time by size,
per-slot prompt caches, empty-prompt loads and their counters.

Requests go through the real HTTP channel over in-memory transports (`simwire`); the VRAM
property drives the `Scheduler` directly.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simwire import Conn, Sim
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from ollamaflow.sim import content, prompts
from ollamaflow.sim.catalog import InstalledModel, spec_for
from ollamaflow.sim.config import SimConfig
from ollamaflow.sim.counters import Counters
from ollamaflow.sim.scheduler import Lease, Scheduler, human_bytes
from ollamaflow.sim.tap import Options

GB = 1_000_000_000
SIZES = {  # the catalog's sizes (what /api/ps reports as size_vram)
    "llama3": 4_661_224_676,
    "mistral": 4_113_301_824,
    "phi3": 2_176_178_913,
}
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
ASK = {"role": "user", "content": "Why is the sky blue?"}
FOLLOW_UP = {"role": "user", "content": "And at sunset?"}
REPLY = {"role": "assistant", "content": "".join(content.tokens(10))}
"""What the simulator answers with its default 10 tokens."""


def placed(**knobs: Any) -> Sim:
    """A simulator with llama3, llama3.2, mistral, phi3 and all-minilm installed."""
    sim = Sim(**knobs)
    for name in ("mistral", "phi3", "llama3.2"):
        sim.state.catalog.add(name, sim.clock.seconds())
    return sim


def generate(sim: Sim, model: str, **extra: Any) -> Conn:
    body = {"model": model, "prompt": "hi", "stream": False, **extra}
    return sim.request("POST", "/api/generate", body)


def chat(sim: Sim, messages: list[dict[str, str]], **extra: Any) -> Conn:
    body = {"model": "llama3", "messages": messages, "stream": False, **extra}
    return sim.request("POST", "/api/chat", body)


def answer(sim: Sim, conn: Conn) -> dict[str, Any]:
    """The reply once the prompt is evaluated (within a second here)."""
    sim.advance(1.0, step=0.01)
    reply: dict[str, Any] = conn.json()
    return reply


def ask(sim: Sim, messages: list[dict[str, str]]) -> dict[str, Any]:
    """A chat turn on llama3, answered."""
    return answer(sim, chat(sim, messages))


def loaded(sim: Sim) -> set[str]:
    return {m["name"].removesuffix(":latest") for m in sim.ps()}


# -- VRAM and eviction -------------------------------------------------------------------------


def test_a_load_that_does_not_fit_evicts_the_least_recently_used_idle_model() -> None:
    sim = placed(vram_bytes=10 * GB)
    generate(sim, "llama3")
    generate(sim, "mistral")
    generate(sim, "llama3")  # mistral is now the least recently used
    assert loaded(sim) == {"llama3", "mistral"}
    assert generate(sim, "phi3").json()["done"] is True
    assert loaded(sim) == {"llama3", "phi3"}
    state = sim.sim_state()
    assert state["unloaded"] == [{"model": "mistral:latest", "reason": "evicted"}]
    assert state["vram_used"] == SIZES["llama3"] + SIZES["phi3"]
    counters = state["counters"]
    assert (counters["loads"], counters["evictions"], counters["unloads"]) == (3, 1, 1)
    assert {m["name"]: m["size_vram"] for m in sim.ps()} == {
        "llama3:latest": SIZES["llama3"],
        "phi3:latest": SIZES["phi3"],
    }


def test_eviction_frees_as_many_idle_models_as_the_load_needs() -> None:
    sim = placed(vram_bytes=9 * GB)
    generate(sim, "phi3")
    generate(sim, "llama3.2")
    sim.request("POST", "/api/embed", {"model": "all-minilm", "input": "x"})
    generate(sim, "mistral")
    # llama3 (4.66 GB) lacks 4.01 GB: phi3 (2.18, the least recently used) and llama3.2 (2.02).
    generate(sim, "llama3")
    assert loaded(sim) == {"mistral", "all-minilm", "llama3"}
    assert sim.state.counters.evictions == 2


def test_a_busy_model_is_never_evicted_the_load_waits_until_it_is_idle() -> None:
    sim = placed(vram_bytes=5 * GB, tokens=5, tokens_per_second=5, load_time=0.5)
    busy = generate(sim, "llama3")
    sim.advance(0.6)  # loaded at 0.5 s, generating until 1.3 s
    waiting = generate(sim, "mistral")
    sim.advance(0.5)
    assert waiting.raw() == b"" and loaded(sim) == {"llama3"}
    sim.advance(0.4)  # llama3 done at 1.3 s: evicted, mistral loads until 1.8 s
    assert busy.json()["done"] is True
    assert loaded(sim) == set()
    assert sim.sim_state()["unloaded"] == [{"model": "llama3:latest", "reason": "evicted"}]
    sim.advance(0.5 + 0.8)
    answer = waiting.json()
    assert answer["done"] is True
    assert answer["load_duration"] == pytest.approx(1.2e9, rel=1e-2), "the wait counts as load"
    assert loaded(sim) == {"mistral"}


def test_while_a_load_waits_for_room_every_request_waits_behind_it() -> None:
    """As in Ollama's scheduler queue: so the busy model drains, and the queue is bounded."""
    sim = placed(vram_bytes=5 * GB, tokens=5, tokens_per_second=5, max_queue=2)
    first = generate(sim, "llama3")
    waiting = generate(sim, "mistral")
    again = generate(sim, "llama3")  # loaded, but behind the waiting load
    assert again.raw() == b""
    refused = generate(sim, "phi3")
    assert refused.status() == 503 and sim.state.counters.busy_rejections == 1
    sim.advance(1.0)
    assert first.json()["done"] is True and waiting.raw() == b""
    sim.advance(1.0)  # mistral served; llama3 comes back in its place
    assert waiting.json()["done"] is True and again.raw() == b""
    sim.advance(1.0)
    assert again.json()["done"] is True
    assert loaded(sim) == {"llama3"}
    assert sim.state.counters.loads == 3 and sim.state.counters.evictions == 2


def test_a_client_leaving_a_load_that_waits_for_room_lets_the_others_in() -> None:
    sim = placed(vram_bytes=5 * GB, tokens=5, tokens_per_second=5)
    generate(sim, "llama3")
    waiting = generate(sim, "mistral")
    behind = generate(sim, "llama3")
    waiting.hang_up()
    sim.advance(1.0)
    assert sim.state.counters.loads == 1, "mistral never loaded"
    sim.advance(1.0)
    assert behind.json()["done"] is True


def test_a_model_larger_than_the_vram_is_a_500() -> None:
    sim = placed(vram_bytes=3 * GB)
    message = "model requires more system memory (4.3 GiB) than is available (2.8 GiB)"
    conn = generate(sim, "llama3")
    assert (conn.status(), conn.json()) == (500, {"error": message})
    conn = sim.request("POST", "/v1/chat/completions", {"model": "llama3", "messages": [ASK]})
    assert conn.status() == 500
    assert conn.json()["error"] == {
        "message": message,
        "type": "api_error",
        "param": None,
        "code": None,
    }
    assert generate(sim, "phi3").status() == 200
    assert sim.state.counters.loads == 1


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 * GB, "2.8 GiB")],
)
def test_human_bytes_as_ollama_writes_them(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_load_time_is_proportional_to_the_size() -> None:
    sim = placed(load_time=0.5, load_seconds_per_gb=1.0)
    for model in ("llama3", "phi3"):
        conn = generate(sim, model)
        expected = 0.5 + SIZES[model] / GB
        sim.advance(expected - 0.01)
        assert conn.raw() == b"", model
        sim.advance(0.01)
        assert conn.json()["load_duration"] == pytest.approx(expected * 1e9, rel=1e-3)


# -- prompt caches -----------------------------------------------------------------------------


def test_a_chat_turn_extending_the_previous_one_evaluates_only_what_is_new() -> None:
    sim = placed(prompt_tokens_per_second=100, ttft=0.1)
    first = chat(sim, [SYSTEM, ASK])
    sim.advance(0.3)  # ttft + 20 prompt tokens / 100
    one = first.json()
    assert one["prompt_eval_count"] == 20
    assert one["prompt_eval_duration"] == pytest.approx(0.3e9, rel=1e-3)
    second = chat(sim, [SYSTEM, ASK, REPLY, FOLLOW_UP])
    sim.advance(0.179)
    assert second.raw() == b""
    sim.advance(0.001)  # ttft + 8 new tokens: the reply came back unchanged, so it is cached
    two = second.json()
    assert two["prompt_eval_count"] == 8
    assert two["prompt_eval_duration"] == pytest.approx(0.18e9, rel=1e-3)
    counters = sim.state.counters
    assert (counters.cache_hits, counters.cached_prompt_tokens) == (1, 37)
    assert counters.evaluated_prompt_tokens == 20 + 8


def test_an_edited_reply_keeps_only_the_messages_before_it_cached() -> None:
    sim = placed(prompt_tokens_per_second=1000)
    ask(sim, [SYSTEM, ASK])
    edited = {"role": "assistant", "content": "Rayleigh scattering."}
    reply = ask(sim, [SYSTEM, ASK, edited, FOLLOW_UP])
    assert reply["prompt_eval_count"] == prompts.of_messages([edited, FOLLOW_UP]).total
    assert sim.state.counters.cached_prompt_tokens == 20


def test_the_same_prompt_again_still_evaluates_one_token() -> None:
    sim = placed(prompt_tokens_per_second=1000)
    answer(sim, generate(sim, "llama3", system="Be brief."))
    again = answer(sim, generate(sim, "llama3", system="Be brief."))
    assert again["prompt_eval_count"] == 1
    total = prompts.of_text("hi", "Be brief.").total
    assert len(again["context"]) == total + 10, "context holds the whole prompt"
    assert sim.state.counters.cached_prompt_tokens == total - 1


def test_alternating_conversations_keep_their_caches_on_two_slots() -> None:
    other = {"role": "user", "content": "Write a haiku about load balancers, please."}
    a_turns = [[SYSTEM, ASK], [SYSTEM, ASK, REPLY, FOLLOW_UP]]
    b_turns = [[other], [other, REPLY, FOLLOW_UP]]
    one_slot = [prompts.of_messages(t[1]).total for t in (a_turns, b_turns)]
    for parallel, expected, hits in ((1, one_slot, 0), (2, [8, 8], 2)):
        sim = placed(prompt_tokens_per_second=1000, num_parallel=parallel)
        evaluated = []
        for a_messages, b_messages in zip(a_turns, b_turns, strict=True):
            evaluated.append(ask(sim, a_messages)["prompt_eval_count"])
            evaluated.append(ask(sim, b_messages)["prompt_eval_count"])
        assert evaluated[2:] == expected, parallel
        assert sim.state.counters.cache_hits == hits, parallel


def test_the_longest_shared_prefix_beats_the_least_recently_used_slot() -> None:
    sim = placed(prompt_tokens_per_second=1000, num_parallel=2)
    ask(sim, [ASK])  # slot 1
    ask(sim, [SYSTEM, ASK])  # shares nothing with slot 1: slot 2, the least recently used
    reply = ask(sim, [SYSTEM, FOLLOW_UP])  # slot 2 shares the system prompt
    system = prompts.of_messages([SYSTEM]).total
    assert reply["prompt_eval_count"] == prompts.of_messages([SYSTEM, FOLLOW_UP]).total - system
    assert ask(sim, [ASK, REPLY, FOLLOW_UP])["prompt_eval_count"] == 8, "slot 1 kept its cache"


def test_a_new_conversation_takes_the_least_recently_used_slot() -> None:
    sim = placed(prompt_tokens_per_second=1000, num_parallel=2)
    ask(sim, [ASK])  # slot 1
    ask(sim, [FOLLOW_UP])  # slot 2, the unused one, keeps slot 1's cache
    ask(sim, [{"role": "user", "content": "Something else."}])  # slot 1, the older
    assert ask(sim, [FOLLOW_UP, REPLY, ASK])["prompt_eval_count"] == (
        prompts.of_messages([ASK]).total
    )
    assert ask(sim, [ASK])["prompt_eval_count"] == prompts.of_messages([ASK]).total


def test_eviction_empties_the_slot_caches() -> None:
    sim = placed(prompt_tokens_per_second=1000, vram_bytes=6 * GB)
    ask(sim, [SYSTEM, ASK])
    answer(sim, generate(sim, "mistral"))  # evicts llama3
    assert ask(sim, [SYSTEM, ASK])["prompt_eval_count"] == 20
    assert sim.state.counters.cache_hits == 0


def test_default_mode_keeps_no_prompt_caches() -> None:
    sim = placed()
    assert not sim.state.config.caches_prompts()
    ask(sim, [SYSTEM, ASK])
    reply = ask(sim, [SYSTEM, ASK])
    assert reply["prompt_eval_count"] == content.count_message_tokens([SYSTEM, ASK])
    counters = sim.state.counters
    assert (counters.cache_hits, counters.evaluated_prompt_tokens) == (0, 0)


def test_openai_chat_shares_the_cache_and_reports_uncached_prompt_tokens() -> None:
    sim = placed(prompt_tokens_per_second=1000)
    ask(sim, [SYSTEM, ASK])
    body = {"model": "llama3", "messages": [SYSTEM, ASK, REPLY, FOLLOW_UP]}
    usage = answer(sim, sim.request("POST", "/v1/chat/completions", body))["usage"]
    assert usage["prompt_tokens"] == 8


# -- empty prompts and keep_alive --------------------------------------------------------------


@pytest.mark.parametrize("route", ["/api/generate", "/api/chat"])
def test_an_empty_request_loads_the_model_and_answers_done_reason_load(route: str) -> None:
    sim = placed(load_time=1.0, vram_bytes=20 * GB)
    conn = sim.request("POST", route, {"model": "llama3", "keep_alive": "1h"})
    sim.advance(0.99)
    assert conn.raw() == b"", "nothing before the model is loaded"
    sim.advance(0.01)
    assert conn.status() == 200
    assert b"content-type: application/json" in conn.headers()
    reply = conn.json()
    assert reply.pop("created_at").startswith("2023-11-14T22:13:21")
    said: dict[str, Any] = {"response": ""}
    if route == "/api/chat":
        said = {"message": {"role": "assistant", "content": ""}}
    assert reply == {"model": "llama3", **said, "done": True, "done_reason": "load"}
    (entry,) = sim.ps()
    assert entry["expires_at"].startswith("2023-11-14T23:13:21"), "the request's keep_alive"
    assert sim.state.counters.loads == 1


def test_an_empty_request_for_a_busy_model_needs_no_slot() -> None:
    sim = placed(tokens=5, tokens_per_second=5)
    busy = generate(sim, "llama3")
    conn = sim.request("POST", "/api/generate", {"model": "llama3", "keep_alive": -1})
    assert conn.json()["done_reason"] == "load", "answered at once, as Ollama does"
    sim.advance(1.0)
    assert busy.json()["done"] is True
    sim.advance(3600)
    assert loaded(sim) == {"llama3"}, "kept forever, as the last request asked"


def test_keep_alive_zero_unloads_and_frees_the_vram() -> None:
    sim = placed(vram_bytes=6 * GB)
    generate(sim, "llama3")
    assert sim.sim_state()["vram_used"] == SIZES["llama3"]
    conn = sim.request("POST", "/api/generate", {"model": "llama3", "keep_alive": 0})
    assert conn.json()["done_reason"] == "unload"
    assert sim.sim_state()["vram_used"] == 0
    generate(sim, "mistral")
    assert sim.state.counters.evictions == 0


def test_a_request_keep_alive_sets_the_expiry() -> None:
    sim = placed(vram_bytes=20 * GB, keep_alive=300)
    generate(sim, "llama3", keep_alive="2s")
    sim.advance(1.9)
    assert loaded(sim) == {"llama3"}
    sim.advance(0.1)
    assert loaded(sim) == set()
    assert sim.sim_state()["vram_used"] == 0


# -- counters and knobs ------------------------------------------------------------------------


def test_sim_state_shows_the_placement_counters_and_knobs() -> None:
    sim = placed()
    patched = sim.request(
        "POST",
        "/_sim/config",
        {"vram_bytes": 10 * GB, "load_seconds_per_gb": 0.0, "prompt_tokens_per_second": 1000},
    )
    assert patched.status() == 200
    config = sim.request("GET", "/_sim/config").json()
    assert (config["vram_bytes"], config["prompt_tokens_per_second"]) == (10 * GB, 1000.0)
    ask(sim, [SYSTEM, ASK])
    ask(sim, [SYSTEM, ASK, REPLY, FOLLOW_UP])
    answer(sim, generate(sim, "mistral"))
    answer(sim, generate(sim, "phi3"))  # evicts llama3
    counters = sim.sim_state()["counters"]
    assert {k: counters[k] for k in ("loads", "evictions", "cache_hits")} == {
        "loads": 3,
        "evictions": 1,
        "cache_hits": 1,
    }
    assert counters["cached_prompt_tokens"] == 37
    hi = prompts.of_text("hi").total
    assert counters["evaluated_prompt_tokens"] == 20 + 8 + 2 * hi
    sim.request("POST", "/_sim/reset")
    counters = sim.sim_state()["counters"]
    assert counters["evictions"] == counters["cache_hits"] == counters["loads"] == 0


@pytest.mark.parametrize(
    "bad",
    [{"vram_bytes": -1}, {"vram_bytes": 1.5}, {"load_seconds_per_gb": -1},
     {"prompt_tokens_per_second": "fast"}],
)  # fmt: skip
def test_bad_placement_knobs_are_400(bad: dict[str, Any]) -> None:
    sim = placed()
    assert sim.request("POST", "/_sim/config", bad).status() == 400


def test_tap_options() -> None:
    options = Options()
    options.parseOptions(
        ["--vram-gb=24", "--load-seconds-per-gb=0.5", "--prompt-tokens-per-second=2000"]
    )
    config = options.config
    assert config.vram_bytes == 24 * GB
    assert (config.load_seconds_per_gb, config.prompt_tokens_per_second) == (0.5, 2000.0)
    assert Options().config.vram_bytes == 0


# -- the VRAM invariant, whatever the requests -------------------------------------------------

_steps = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 5), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 50), st.none()),
        st.tuples(st.just("cancel"), st.integers(0, 50), st.none()),
        st.tuples(st.just("advance"), st.sampled_from([0.1, 1.0, 5.0]), st.none()),
    ),
    max_size=40,
)


@settings(deadline=None, max_examples=200)
@given(
    st.lists(st.integers(1, 10), min_size=6, max_size=6),
    st.integers(10, 20),
    st.integers(1, 3),
    st.sampled_from([0.0, 0.5]),
    _steps,
)
def test_loaded_bytes_never_exceed_the_vram_and_every_request_is_served(
    sizes: list[int], vram: int, parallel: int, load_time: float, steps: list[Any]
) -> None:
    clock = Clock()
    config = SimConfig(vram_bytes=vram, num_parallel=parallel, load_time=load_time, keep_alive=30)
    scheduler = Scheduler(clock, config, Counters())
    models = [
        InstalledModel(f"m{i}:latest", attrs.evolve(spec_for(f"m{i}"), size=size), 0.0)
        for i, size in enumerate(sizes)
    ]
    asked: list[Deferred[Lease]] = []
    held: list[tuple[InstalledModel, Lease]] = []

    def granted(lease: Lease, model: InstalledModel) -> None:
        held.append((model, lease))

    def check() -> None:
        assert scheduler.vram_used <= vram
        for model, _ in held:
            assert scheduler.is_loaded(model.name), "a model serving a request stays loaded"

    for op, arg, flag in steps:
        if op == "acquire":  # a load-only request (no slot) lets its lease go at once
            model = models[arg]
            prompt = prompts.of_text(str(arg))
            deferred = scheduler.acquire(model, 30.0, prompt, needs_slot=flag)
            deferred.addCallback(granted if flag else lambda lease, _m: lease.release(), model)
            deferred.addErrback(lambda f: f.trap(CancelledError))
            asked.append(deferred)
        elif op == "release" and held:
            held.pop(arg % len(held))[1].release()
        elif op == "cancel" and asked:  # the client went away (no-op once granted)
            asked[arg % len(asked)].cancel()
        elif op == "advance":
            clock.advance(arg)
        check()
    for _ in range(len(asked) + 1):
        while held:
            held.pop()[1].release()
            check()
        clock.advance(1.0)
    assert all(d.called for d in asked), "no request is left waiting"
    clock.advance(60)
    assert scheduler.vram_used == 0
