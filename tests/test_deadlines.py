"""Deadlines: many timeouts of a few lengths, one reactor call per length."""

from __future__ import annotations

import functools

from logcapture import keeping
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from ollamaflow.gateway.deadlines import Deadlines


def test_a_deadline_fires_after_its_length_and_not_before() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[str] = []
    deadlines.add(2.0, lambda: fired.append("a"))
    clock.advance(1.0)
    deadlines.add(2.0, lambda: fired.append("b"))
    clock.advance(0.999)
    assert fired == []
    clock.advance(0.001)
    assert fired == ["a"]
    clock.advance(1.0)
    assert fired == ["a", "b"]
    assert deadlines.pending() == 0 and not clock.getDelayedCalls()


def test_one_reactor_call_per_length_however_many_deadlines() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    for _ in range(100):
        deadlines.add(5.0, lambda: None)
        deadlines.add(0.5, lambda: None)
    assert len(clock.getDelayedCalls()) == 2
    assert deadlines.pending() == 200


def test_a_cancelled_deadline_never_fires_and_the_rest_still_do() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[int] = []
    made = [deadlines.add(1.0, functools.partial(fired.append, i)) for i in range(5)]
    made[0].cancel()
    made[3].cancel()
    made[3].cancel()  # twice is harmless
    assert deadlines.pending() == 3
    clock.advance(1.0)
    assert fired == [1, 2, 4]
    assert not clock.getDelayedCalls()


def test_lengths_are_independent_and_fire_in_time_order() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[str] = []
    deadlines.add(3.0, lambda: fired.append("long"))
    deadlines.add(1.0, lambda: fired.append("short"))
    clock.advance(1.0)
    assert fired == ["short"]
    clock.advance(2.0)
    assert fired == ["short", "long"]


def test_cancelled_deadlines_do_not_pile_up() -> None:
    """A minute-long TimeoutMs at thousands of requests a second: finished requests' deadlines
    are dropped long before their time comes."""
    clock = Clock()
    deadlines = Deadlines(clock)
    for _ in range(10_000):
        deadlines.add(60.0, lambda: None).cancel()
    queue = deadlines._queues[60.0]
    assert len(queue.pending) <= 2 * 1024 + 2
    assert deadlines.pending() == 0


def test_a_callback_may_add_and_cancel_deadlines_of_its_own_length() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[str] = []

    def first() -> None:
        fired.append("first")
        later.cancel()
        deadlines.add(1.5, lambda: fired.append("added"))

    deadlines.add(1.5, first)
    later = deadlines.add(1.5, lambda: fired.append("later"))  # due at the same moment
    clock.advance(1.5)
    assert fired == ["first"]
    clock.advance(1.5)
    assert fired == ["first", "added"]
    assert not clock.getDelayedCalls()


def test_a_failing_callback_is_logged_and_the_others_still_fire() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[int] = []

    def broken() -> None:
        raise RuntimeError("bug")

    deadlines.add(1.0, broken)
    deadlines.add(1.0, lambda: fired.append(1))
    logged: list[dict[str, object]] = []
    observer = keeping(logged)
    globalLogPublisher.addObserver(observer)
    try:
        clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert fired == [1]
    failures = [e["log_failure"] for e in logged if "log_failure" in e]
    assert [f.value.args for f in failures] == [("bug",)]  # type: ignore[attr-defined]
