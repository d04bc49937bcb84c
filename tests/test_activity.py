"""The dashboard's memory of what the fleet did: buckets of 10 seconds over 15 minutes, the
latest requests, forgetting what the configuration deleted."""

from __future__ import annotations

from typing import Any

import attrs
from completions import completed
from hypothesis import given
from hypothesis import strategies as st

from ollamaflow.activity import (
    BUCKET_SECONDS,
    BUCKETS,
    RECENT_REQUESTS,
    SHOWN_CHARACTERS,
    Activity,
    Buckets,
    request_line,
)


@attrs.define
class Now:
    seconds: float = 1_000_000.0

    def __call__(self) -> float:
        return self.seconds


def test_a_window_ends_with_the_bucket_asked_for_oldest_first() -> None:
    b = Buckets()
    b.add(100, 2)
    b.add(101, 3)
    assert b.window(101)[-2:] == [2, 3]
    assert b.window(102)[-3:] == [2, 3, 0]
    assert len(b.window(102)) == BUCKETS


def test_a_window_that_ends_before_the_newest_bucket_leaves_the_newest_out() -> None:
    b = Buckets()
    b.add(500, 7)
    b.add(501, 1)
    window = b.window(500)
    assert window[-1] == 7
    assert sum(window) == 7  # the 1 of bucket 501 is not the oldest bucket's count


def test_counts_older_than_the_window_are_gone() -> None:
    b = Buckets()
    b.add(10, 5)
    assert b.total(10 + BUCKETS - 1) == 5
    assert b.total(10 + BUCKETS) == 0
    b.add(10 + 5 * BUCKETS, 1)
    assert b.total(10 + 5 * BUCKETS) == 1


@given(
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 5)), max_size=60), st.integers(0, 500)
)
def test_a_window_is_the_counts_of_its_buckets(adds: list[tuple[int, int]], end: int) -> None:
    """Whatever order buckets are written in (time only goes on in practice, but a late one
    must not corrupt the ring), a window holds what was added to buckets still held."""
    adds.sort()
    b = Buckets()
    for bucket, amount in adds:
        b.add(bucket, amount)
    newest = max([end, *(bucket for bucket, _ in adds)])
    expected = [
        sum(a for bucket, a in adds if bucket == wanted and bucket > newest - BUCKETS)
        for wanted in range(end - BUCKETS + 1, end + 1)
    ]
    assert b.window(end) == expected


def test_requests_and_tokens_count_per_backend_per_whole_bucket() -> None:
    now = Now()
    activity = Activity(now)
    activity(completed(backend="a", eval_count=30))
    activity(completed(backend="a", eval_count=12))
    activity(completed(backend="b"))
    # The bucket filling now is not in the series yet.
    assert sum(activity.series(["a"])["a"]["Requests"]) == 0
    now.seconds += BUCKET_SECONDS
    series = activity.series(["a", "b", "c"])
    assert series["a"]["Requests"][-1] == 2
    assert series["a"]["Tokens"][-1] == 42
    assert series["b"]["Requests"][-1] == 1
    assert series["c"] == {"Requests": [0] * BUCKETS, "Tokens": [0] * BUCKETS}


def test_a_frontends_recent_counts_say_where_requests_went_and_what_failed() -> None:
    activity = Activity(Now())
    activity(completed(frontend="f", backend="a"))
    activity(completed(frontend="f", backend="a", status=500, outcome="ok"))
    activity(completed(frontend="f", backend=None, status=429, outcome="refused"))
    activity(completed(frontend="f", backend="b", outcome="aborted"))
    assert activity.recent_counts("f") == {
        "Requests": 4,
        "Errors": 3,
        "TooManyRequests": 1,
        "Backends": {"a": 2, "b": 1},
    }
    assert activity.recent_counts("unknown")["Requests"] == 0


def test_deleted_frontends_and_backends_are_forgotten() -> None:
    activity = Activity(Now())
    activity(completed(frontend="f", backend="a"))
    activity(completed(frontend="g", backend="b"))
    activity.forget_all_but(["f"], ["b"])
    assert set(activity.frontends) == {"f"}
    assert set(activity.backends) == {"b"}
    assert activity.frontends["f"].routes == {}


def test_the_latest_requests_are_kept_in_order_and_bounded() -> None:
    activity = Activity(Now())
    for n in range(RECENT_REQUESTS + 10):
        activity(completed(request_id=str(n)))
    assert len(activity.recent) == RECENT_REQUESTS
    after = [f.completed.request_id for f in activity.after(activity.sequence - 3)]
    assert after == [str(RECENT_REQUESTS + 7), str(RECENT_REQUESTS + 8), str(RECENT_REQUESTS + 9)]
    assert list(activity.after(activity.sequence)) == []


def test_a_request_line_bounds_what_the_client_chose() -> None:
    activity = Activity(Now())
    activity(
        completed(path="/api/" + "x" * 10_000, model="m" * 10_000, eval_count=20, backend=None)
    )
    line: dict[str, Any] = request_line(activity.recent[-1], lambda s: f"t{s:.0f}")
    assert len(line["Path"]) == SHOWN_CHARACTERS
    assert len(line["Model"]) == SHOWN_CHARACTERS
    assert line["Time"] == "t1000000"
    assert line["Tokens"] == 20
