"""Simulator timing on a `task.Clock`: pacing, loads, slots, queue, keep_alive, pulls, faults.

Requests go through the real HTTP channel over in-memory transports, so what is asserted is
what a client would see on the wire, at the simulated instant it would see it.
"""

from __future__ import annotations

from typing import Any

import pytest
from simwire import Sim

from ollamaflow.sim.scheduler import parse_keep_alive


def chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    body.update(extra)
    return body


def test_tokens_are_paced_after_time_to_first_token() -> None:
    sim = Sim(tokens=4, tokens_per_second=10, ttft=0.5)
    conn = sim.request("POST", "/api/chat", chat())
    assert conn.raw() == b""  # not even headers while "thinking"
    sim.advance(0.5)
    assert [m["message"]["content"] for m in conn.lines()] == ["The"]
    assert b"content-type: application/x-ndjson" in conn.headers()
    sim.advance(0.1)
    assert len(conn.lines()) == 2
    sim.advance(0.2)
    lines = conn.lines()
    assert len(lines) == 5 and lines[-1]["done"] is True
    final = lines[-1]
    assert final["done_reason"] == "stop" and final["eval_count"] == 4
    assert final["prompt_eval_duration"] == pytest.approx(0.5e9, rel=1e-3)
    assert final["eval_duration"] == pytest.approx(0.3e9, rel=1e-3)
    assert final["total_duration"] == pytest.approx(0.8e9, rel=1e-3)
    assert sim.state.counters.in_flight == 0


def test_non_streaming_waits_then_answers_with_content_length() -> None:
    sim = Sim(tokens=3, tokens_per_second=10, ttft=0.2)
    conn = sim.request("POST", "/api/generate", {"model": "llama3", "prompt": "x", "stream": False})
    sim.advance(0.39)
    assert conn.raw() == b""
    sim.advance(0.01)
    assert b"content-length:" in conn.headers()
    assert conn.json()["response"] == "The quick brown"


def test_model_load_delays_first_byte_and_shows_in_ps() -> None:
    sim = Sim(load_time=2.0)
    assert sim.ps() == []
    conn = sim.request("POST", "/api/chat", chat())
    sim.advance(1.9)
    assert conn.raw() == b""
    sim.advance(0.1)
    final = conn.lines()[-1]
    assert final["load_duration"] == pytest.approx(2e9, rel=1e-3)
    (loaded,) = sim.ps()
    assert loaded["name"] == "llama3:latest"
    assert loaded["expires_at"].startswith("2023-11-14T22:18:22")  # START + 2 s + 5 min
    assert sim.state.counters.loads == 1
    # Already loaded: no load wait the second time.
    again = sim.request("POST", "/api/chat", chat())
    assert again.lines()[-1]["done"] is True


def test_keep_alive_expiry_unloads() -> None:
    sim = Sim()
    sim.request("POST", "/api/chat", chat(keep_alive="10s"))
    (loaded,) = sim.ps()
    assert loaded["expires_at"].startswith("2023-11-14T22:13:30")
    sim.advance(9.9)
    assert len(sim.ps()) == 1
    sim.advance(0.1)
    assert sim.ps() == []
    assert sim.state.counters.unloads == 1


def test_keep_alive_zero_unloads_at_once_and_negative_keeps_forever() -> None:
    sim = Sim()
    sim.request("POST", "/api/chat", chat(keep_alive=0))
    assert sim.ps() == []
    sim.request("POST", "/api/chat", chat(keep_alive=-1))
    sim.clock.advance(10 * 365 * 86400)
    (loaded,) = sim.ps()
    assert loaded["expires_at"] > "2300"


def test_empty_prompt_loads_or_unloads() -> None:
    sim = Sim(load_time=1.0)
    conn = sim.request("POST", "/api/generate", {"model": "llama3"})
    sim.advance(1.0)
    (line,) = conn.lines()
    assert line["done_reason"] == "load" and line["response"] == ""
    assert len(sim.ps()) == 1
    conn = sim.request("POST", "/api/generate", {"model": "llama3", "keep_alive": 0})
    assert conn.lines()[0]["done_reason"] == "unload"
    assert sim.ps() == []


def test_requests_beyond_parallel_slots_wait_silently() -> None:
    sim = Sim(tokens=3, tokens_per_second=10)
    first = sim.request("POST", "/api/chat", chat())
    second = sim.request("POST", "/api/chat", chat())
    assert len(first.lines()) == 1
    assert second.raw() == b""
    assert sim.state.counters.in_flight == 2
    sim.advance(0.2)
    assert first.lines()[-1]["done"] is True
    assert len(second.lines()) == 1  # got the slot the moment the first released it
    sim.advance(0.2)
    assert second.lines()[-1]["done"] is True
    assert sim.state.counters.peak_in_flight == 2


def test_num_parallel_two_serves_two_at_once() -> None:
    sim = Sim(tokens=3, tokens_per_second=10, num_parallel=2)
    conns = [sim.request("POST", "/api/chat", chat()) for _ in range(3)]
    assert [len(c.lines()) for c in conns] == [1, 1, 0]


def test_queue_full_while_loading_answers_503_but_loaded_models_never_do() -> None:
    sim = Sim(load_time=5.0, max_queue=2, tokens=2, tokens_per_second=1)
    waiting = [sim.request("POST", "/api/chat", chat()) for _ in range(2)]
    busy = sim.request("POST", "/api/chat", chat())
    assert busy.status() == 503
    assert busy.json() == {
        "error": "server busy, please try again.  maximum pending requests exceeded"
    }
    assert sim.state.counters.busy_rejections == 1
    sim.advance(5.0)
    more = [sim.request("POST", "/api/chat", chat()) for _ in range(5)]
    assert all(c.raw() == b"" for c in more)  # queued for a slot, silently
    sim.advance(60, step=0.1)
    assert all(c.lines()[-1]["done"] for c in waiting + more)


def test_disconnect_while_waiting_releases_nothing_and_is_counted() -> None:
    sim = Sim(tokens=3, tokens_per_second=10)
    first = sim.request("POST", "/api/chat", chat())
    second = sim.request("POST", "/api/chat", chat())
    second.hang_up()
    counters = sim.state.counters
    assert counters.client_disconnects == 1 and counters.in_flight == 1
    sim.advance(1)
    assert first.lines()[-1]["done"] is True
    assert counters.in_flight == 0


def test_disconnect_mid_stream_frees_the_slot_and_timers() -> None:
    sim = Sim(tokens=50, tokens_per_second=10, keep_alive=-1)
    first = sim.request("POST", "/api/chat", chat())
    second = sim.request("POST", "/api/chat", chat())
    first.hang_up()
    assert len(second.lines()) == 1  # the slot passed on immediately
    second.hang_up()
    counters = sim.state.counters
    assert (counters.client_disconnects, counters.in_flight) == (2, 0)
    # Only the HTTP channels' idle timeouts remain: no token timers, no expiry (keep forever).
    pending = [
        c for c in sim.clock.getDelayedCalls() if "Emitter" in repr(getattr(c, "func", None))
    ]
    assert pending == []


def test_backpressure_pauses_the_stream() -> None:
    sim = Sim(tokens=5, tokens_per_second=10)
    conn = sim.request("POST", "/api/chat", chat())
    conn.proto.pauseProducing()
    sim.advance(1)
    assert len(conn.lines()) == 1
    conn.proto.resumeProducing()
    sim.advance(1)
    assert conn.lines()[-1]["done"] is True


def test_stall_fault_pauses_once() -> None:
    sim = Sim(tokens=4, stall_after=2, stall_seconds=3.0)
    conn = sim.request("POST", "/api/generate", {"model": "llama3", "prompt": "x"})
    assert len(conn.lines()) == 2
    sim.advance(2.9)
    assert len(conn.lines()) == 2
    sim.advance(0.1)
    assert conn.lines()[-1]["done"] is True


def test_drop_fault_aborts_after_n_messages() -> None:
    sim = Sim(tokens=10, drop_mid_stream_after=3)
    conn = sim.request("POST", "/api/chat", chat())
    assert len(conn.lines()) == 3
    assert conn.transport.disconnecting
    counters = sim.state.counters
    assert (counters.dropped_streams, counters.in_flight, counters.client_disconnects) == (1, 0, 0)


def test_pull_progress_timeline_and_result() -> None:
    sim = Sim(pull_time=1.0, pull_tick=0.1)
    conn = sim.request("POST", "/api/pull", {"model": "mistral"})
    first = conn.lines()
    assert first[0] == {"status": "pulling manifest"}
    assert "completed" not in first[1] and first[1]["total"] > 0
    assert first[1]["status"] == "pulling " + first[1]["digest"][7:19]
    sim.advance(0.5)
    middle = conn.lines()[-1]
    assert 0 < middle["completed"] < middle["total"]
    sim.advance(0.6)
    lines = conn.lines()
    assert [m["status"] for m in lines[-3:]] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    layers = [m for m in lines if "digest" in m]
    for digest in {m["digest"] for m in layers}:
        progress = [m.get("completed", 0) for m in layers if m["digest"] == digest]
        assert progress == sorted(progress)
        last = [m for m in layers if m["digest"] == digest][-1]
        assert last["completed"] == last["total"]
    tags = sim.request("GET", "/api/tags").json()["models"]
    assert "mistral:latest" in [m["name"] for m in tags]
    assert sim.state.counters.pulls == 1


def test_pull_of_unknown_model() -> None:
    sim = Sim()
    conn = sim.request("POST", "/api/pull", {"name": "no-such-model"})
    assert conn.status() == 200
    assert conn.lines() == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    conn = sim.request("POST", "/api/pull", {"model": "no-such-model", "stream": False})
    assert conn.status() == 500
    assert conn.json() == {"error": "pull model manifest: file does not exist"}
    assert sim.state.counters.pull_failures == 2


def test_pull_without_stream_waits_and_returns_success() -> None:
    sim = Sim(pull_time=2.0)
    conn = sim.request("POST", "/api/pull", {"model": "phi3", "stream": False})
    sim.advance(1.9)
    assert conn.raw() == b""
    sim.advance(0.2)
    assert conn.json() == {"status": "success"}


def test_hang_fault_holds_requests_until_the_client_leaves() -> None:
    sim = Sim(hang=True)
    conn = sim.request("GET", "/api/tags")
    sim.advance(100, step=1)
    assert conn.raw() == b""
    assert sim.state.counters.in_flight == 1
    conn.hang_up()
    assert sim.state.counters.in_flight == 0
    assert sim.state.counters.client_disconnects == 1


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 300.0),
        (0, 0.0),
        (-1, -1.0),
        (30, 30.0),
        ("30", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("-1m", -60.0),
        ("0s", 0.0),
    ],
)
def test_parse_keep_alive(value: Any, seconds: float) -> None:
    assert parse_keep_alive(value, 300.0) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5x", "m", "", True, [1], "5m junk"])
def test_parse_keep_alive_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(value, 300.0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("-0", 0.0), ("5m", 300.0), ("-1s", -1.0), (1e300, -1.0)],
)
def test_parse_keep_alive_as_a_request_gives_it(value: Any, seconds: float) -> None:
    assert parse_keep_alive(value, 300.0, units_required=True) == seconds


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("30", 'time: missing unit in duration "30"'),
        (" 5m", "invalid duration"),
        ("inf", "invalid duration"),
        ("1e3s", "invalid duration"),
        ("9999999999h", "invalid duration"),
        (float("nan"), "invalid keep_alive"),
    ],
)
def test_parse_keep_alive_as_a_request_refuses(value: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_keep_alive(value, 300.0, units_required=True)


def test_a_huge_keep_alive_keeps_the_model_forever() -> None:
    sim = Sim()
    conn = sim.request("POST", "/api/chat", chat(keep_alive=1e300))
    assert conn.status() == 200
    (loaded,) = sim.ps()
    assert loaded["expires_at"] > "2300"


def test_bad_keep_alive_is_a_400() -> None:
    sim = Sim()
    conn = sim.request("POST", "/api/chat", chat(keep_alive="soon"))
    assert conn.status() == 400
    assert "invalid duration" in conn.json()["error"]
    conn = sim.request("POST", "/api/chat", chat(keep_alive="30"))
    assert (conn.status(), conn.json()) == (400, {"error": 'time: missing unit in duration "30"'})
