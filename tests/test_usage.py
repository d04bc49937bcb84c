"""The usage ledger on a fake clock and a fake store: what one request adds, hours, flushing
(batched, retried after failures, never two at once, once more at shutdown), the cap on pending
rows, and the admin API's view merging stored and pending rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
from completions import completed as any_completed
from hypothesis import given
from hypothesis import strategies as st
from logcapture import keeping
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from ollamaflow.gateway.completed import Completed
from ollamaflow.records import UsageRow
from ollamaflow.store.errors import StoreUnavailable
from ollamaflow.usage import UsageFlusher, UsageLedger

#: 2024-05-01 10:00:00 UTC, an hour's start.
T0 = 1714557600.0


def hour(n: int) -> datetime:
    """The start of the ``n``-th hour after :data:`T0`."""
    return datetime.fromtimestamp(T0 + 3600 * n, UTC)


def completed(**kw: Any) -> Completed:
    """A request made with the key ``key1``."""
    return any_completed(**{"api_key": "key1", **kw})


Counts = tuple[int, int, int, int]


@attrs.define
class FakeStore:
    """Usage rows in a dict; ``fail`` makes writes fail, ``gate`` holds them until fired."""

    stored: dict[tuple[str, str, datetime], list[int]] = attrs.field(factory=dict)
    calls: list[list[UsageRow]] = attrs.field(factory=list)
    reads: int = 0
    fail: bool = False
    unsure: bool = False
    gate: Deferred[None] | None = None

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        self.calls.append(list(rows))
        if self.gate is not None:
            await self.gate
        if self.fail:
            raise StoreUnavailable("connection refused", unsure=self.unsure)
        for r in rows:
            counts = self.stored.setdefault((r.key_id, r.model, r.hour), [0, 0, 0, 0])
            for i, n in enumerate((r.requests, r.errors, r.prompt_tokens, r.completion_tokens)):
                counts[i] += n

    async def read_usage(self, key_id: str, since: datetime, limit: int) -> list[UsageRow]:
        self.reads += 1
        rows = [
            UsageRow(key, model, when, *counts)
            for (key, model, when), counts in self.stored.items()
            if key == key_id and when > since - timedelta(hours=1)
        ]
        return sorted(rows, key=lambda r: (r.hour, r.model))[:limit]

    def table(self) -> dict[tuple[str, str, datetime], Counts]:
        return {k: (v[0], v[1], v[2], v[3]) for k, v in self.stored.items()}


def ledger_on(store: FakeStore, **kw: Any) -> tuple[UsageLedger, Clock]:
    clock = Clock()
    clock.advance(T0)
    return UsageLedger(store, clock, **kw), clock


def fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (the fakes never wait on the reactor)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


@contextmanager
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_level") == LogLevel.warn]


def test_requests_errors_and_tokens_per_key_model_and_hour() -> None:
    store = FakeStore()
    ledger, clock = ledger_on(store)
    ledger(completed(prompt_eval_count=11, eval_count=30))
    ledger(completed(prompt_eval_count=5, eval_count=None))
    ledger(completed(status=500))
    ledger(completed(status=200, outcome="aborted", eval_count=3))  # cut short: an error
    ledger(completed(status=200, outcome="client_gone"))
    ledger(completed(status=429, outcome="refused"))
    ledger(completed(model="qwen:7b", api_key="key2", eval_count=1))
    ledger(completed(model=None, api_key="anonymous", path="/api/version"))
    ledger(completed(model=None, api_key="admin", status=404, outcome="refused"))
    clock.advance(3599)  # 10:59:59, still the first hour
    ledger(completed(eval_count=2))
    clock.advance(1)  # 11:00:00
    ledger(completed())
    assert ledger.pending_rows == 5
    fired(ledger.flush())
    assert store.table() == {
        ("key1", "llama3:latest", hour(0)): (7, 4, 16, 35),
        ("key2", "qwen:7b", hour(0)): (1, 0, 0, 1),
        ("anonymous", "", hour(0)): (1, 0, 0, 0),
        ("admin", "", hour(0)): (1, 1, 0, 0),
        ("key1", "llama3:latest", hour(1)): (1, 0, 0, 0),
    }
    assert ledger.pending_rows == 0


def test_a_flush_is_one_add_usage_call_and_nothing_to_write_is_no_call() -> None:
    store = FakeStore()
    ledger, clock = ledger_on(store)
    fired(ledger.flush())
    assert store.calls == []
    for key in ("b", "a"):
        ledger(completed(api_key=key))
        ledger(completed(api_key=key, model="m"))
    clock.advance(7200)
    ledger(completed(api_key="a"))
    fired(ledger.flush())
    assert len(store.calls) == 1
    assert sorted(store.calls[0], key=lambda r: (r.hour, r.key_id, r.model)) == [
        UsageRow("a", "llama3:latest", hour(0), 1),
        UsageRow("a", "m", hour(0), 1),
        UsageRow("b", "llama3:latest", hour(0), 1),
        UsageRow("b", "m", hour(0), 1),
        UsageRow("a", "llama3:latest", hour(2), 1),
    ]  # the store writes them in one order (tests/test_postgresql.py)
    fired(ledger.flush())
    assert len(store.calls) == 1


def test_a_failed_flush_keeps_the_counts_and_merges_them_once() -> None:
    store = FakeStore(fail=True)
    ledger, clock = ledger_on(store)
    ledger(completed(eval_count=10))
    with logged() as events:
        for _ in range(3):
            assert fired(ledger.flush()) is None  # never fails
            ledger(completed(eval_count=1, status=502))
    assert len(store.calls) == 3
    assert len(warnings(events)) == 1  # when the failures began, not at every try
    assert "connection refused" in str(warnings(events)[0]["error"])
    assert store.stored == {}
    clock.advance(3600)
    ledger(completed(prompt_eval_count=4))
    store.fail = False
    with logged() as events:
        fired(ledger.flush())
    assert [e["log_format"] for e in events if "n" in e] == [
        "usage written again after {n} failed flushes"
    ]
    assert store.table() == {
        ("key1", "llama3:latest", hour(0)): (4, 3, 0, 13),
        ("key1", "llama3:latest", hour(1)): (1, 0, 4, 0),
    }
    assert ledger.pending_rows == 0
    fired(ledger.flush())
    assert len(store.calls) == 4


def test_a_flush_that_may_have_been_committed_is_kept_and_says_so() -> None:
    store = FakeStore(fail=True, unsure=True)
    ledger, _clock = ledger_on(store)
    ledger(completed())
    with logged() as events:
        fired(ledger.flush())
        fired(ledger.flush())
    assert len(warnings(events)) == 2  # every time: the counts may be doubled
    assert "count twice" in warnings(events)[0]["log_format"]
    assert ledger.pending_rows == 1


def test_past_the_cap_the_oldest_hours_are_dropped_with_one_warning() -> None:
    store = FakeStore()
    ledger, clock = ledger_on(store, max_rows=4)
    for _ in range(2):  # hours 0, 1, 2: one row, one row, two rows
        ledger(completed(api_key="a"))
        clock.advance(3600)
    ledger(completed(api_key="a"))
    ledger(completed(api_key="b"))
    assert ledger.pending_rows == 4
    with logged() as events:
        ledger(completed(api_key="c"))  # needs one row: hour 0 goes
        ledger(completed(api_key="a"))  # an existing row
    assert ledger.pending_rows == 4
    [warning] = warnings(events)
    assert warning["hours"] == "2024-05-01 10:00Z"
    assert warning["rows"] == 1
    with logged() as events:
        ledger(completed(api_key="d"))  # hour 1 goes
        ledger(completed(api_key="e"))  # the hour alone fills the cap: not counted
        ledger(completed(api_key="f"))  # ... without another warning
        ledger(completed(api_key="d"))  # an existing row still counts
    assert [w["log_format"].split()[0:3] for w in warnings(events)] == [
        ["usage", "of", "{hours}"],
        ["usage", "not", "counted:"],
    ]
    fired(ledger.flush())
    assert {(k, when) for k, _m, when in store.stored} == {
        ("a", hour(2)),
        ("b", hour(2)),
        ("c", hour(2)),
        ("d", hour(2)),
    }
    assert store.stored["d", "llama3:latest", hour(2)][0] == 2
    assert fired(ledger.flush()) is None


def test_a_failed_flush_merged_back_past_the_cap_drops_the_oldest() -> None:
    store = FakeStore(fail=True)
    ledger, clock = ledger_on(store, max_rows=2)
    ledger(completed(api_key="a"))
    ledger(completed(api_key="b"))
    flushing = store.gate = Deferred()
    running = ledger.flush()
    clock.advance(3600)
    ledger(completed(api_key="c"))
    ledger(completed(api_key="d"))
    with logged() as events:
        flushing.callback(None)
    assert fired(running) is None
    assert [w["hours"] for w in warnings(events) if "hours" in w] == ["2024-05-01 10:00Z"]
    assert ledger.pending_rows == 2
    store.fail, store.gate = False, None
    fired(ledger.flush())
    assert set(store.stored) == {
        ("c", "llama3:latest", hour(1)),
        ("d", "llama3:latest", hour(1)),
    }


def test_the_flusher_flushes_every_interval_and_once_more_when_stopped() -> None:
    store = FakeStore()
    ledger, clock = ledger_on(store)
    flusher = UsageFlusher(ledger, clock)
    flusher.startService()
    ledger(completed())
    clock.advance(9)
    assert store.calls == []
    clock.advance(1)
    assert len(store.calls) == 1
    ledger(completed(eval_count=5))
    stopped = flusher.stopService()
    assert fired(stopped) is None
    assert len(store.calls) == 2
    assert store.table() == {("key1", "llama3:latest", hour(0)): (2, 0, 0, 5)}
    assert not clock.getDelayedCalls()


def test_a_flusher_stopped_without_starting_still_flushes() -> None:
    store = FakeStore()
    ledger, clock = ledger_on(store)
    ledger(completed())
    fired(UsageFlusher(ledger, clock, interval=1).stopService())
    assert len(store.calls) == 1


def test_flushes_never_overlap_and_shutdown_waits_for_the_last() -> None:
    store = FakeStore()
    ledger, clock = ledger_on(store)
    flusher = UsageFlusher(ledger, clock, interval=10)
    flusher.startService()
    ledger(completed())
    slow = store.gate = Deferred()
    clock.advance(10)
    ledger(completed(eval_count=1))
    clock.pump([10, 10, 10])
    assert len(store.calls) == 1  # the loop waits for the flush under way
    ledger(completed(eval_count=2))
    extra = ledger.flush()  # a flush asked for meanwhile waits its turn
    stopped = flusher.stopService()
    assert len(store.calls) == 1
    store.gate = None
    slow.callback(None)
    assert fired(extra) is None
    assert fired(stopped) is None
    assert len(store.calls) == 2  # the extra flush took everything; the last had nothing
    assert store.table() == {("key1", "llama3:latest", hour(0)): (3, 0, 0, 3)}


def test_usage_merges_stored_and_pending_rows() -> None:
    store = FakeStore()
    ledger, clock = ledger_on(store)
    ledger(completed(eval_count=10))
    ledger(completed(model="zeta", prompt_eval_count=2))
    ledger(completed(api_key="other"))
    clock.advance(3600)
    ledger(completed(model=None, status=401, outcome="refused"))
    fired(ledger.flush())
    ledger(completed(model=None))
    ledger(completed(eval_count=1))
    clock.advance(1800)
    ledger(completed(model="alpha"))
    clock.advance(3600)
    ledger(completed())
    assert fired(ledger.usage("key1", hour(0), 10_000)) == [
        UsageRow("key1", "llama3:latest", hour(0), 1, 0, 0, 10),
        UsageRow("key1", "zeta", hour(0), 1, 0, 2, 0),
        UsageRow("key1", "", hour(1), 2, 1, 0, 0),
        UsageRow("key1", "alpha", hour(1), 1),
        UsageRow("key1", "llama3:latest", hour(1), 1, 0, 0, 1),
        UsageRow("key1", "llama3:latest", hour(2), 1),
    ]
    since = datetime.fromtimestamp(T0 + 7200 - 1, UTC)  # 11:59:59: hours from 11:00
    assert [(r.model, r.hour) for r in fired(ledger.usage("key1", since, 10_000))] == [
        ("", hour(1)),
        ("alpha", hour(1)),
        ("llama3:latest", hour(1)),
        ("llama3:latest", hour(2)),
    ]
    assert len(fired(ledger.usage("key1", hour(2), 10_000))) == 1
    assert len(fired(ledger.usage("key1", hour(0), limit=3))) == 3
    assert fired(ledger.usage("other", hour(0), 10_000)) == [
        UsageRow("other", "llama3:latest", hour(0), 1)
    ]
    assert fired(ledger.usage("nobody", hour(0), 10_000)) == []
    assert ledger.pending_rows == 4  # reading flushes nothing


def test_usage_waits_for_a_flush_under_way_and_counts_it_once() -> None:
    store = FakeStore()
    ledger, _clock = ledger_on(store)
    ledger(completed())
    slow = store.gate = Deferred()
    flushing = ledger.flush()
    read = ledger.usage("key1", hour(0), 10_000)
    assert store.reads == 0
    slow.callback(None)
    assert fired(flushing) is None
    assert fired(read) == [UsageRow("key1", "llama3:latest", hour(0), 1)]


# -- flushing at any point, with any failures, never changes the totals -----------------------

record = st.tuples(
    st.just("record"),
    st.sampled_from(["a", "b", "anonymous"]),
    st.sampled_from(["m1", "m2", None]),
    st.sampled_from([200, 404, 500]),
    st.integers(0, 5),
    st.integers(0, 5),
)
advance = st.tuples(st.just("advance"), st.integers(0, 7200))
flush = st.tuples(st.just("flush"), st.booleans())
#: A flush held until after the next operations, then failing or not.
held = st.tuples(st.just("held"), st.booleans())
operations = st.lists(st.one_of(record, advance, flush, held), max_size=60)


@given(operations)
def test_flushes_and_failures_never_change_the_totals(ops: list[tuple[Any, ...]]) -> None:
    store = FakeStore()
    ledger, clock = ledger_on(store)
    expected: dict[tuple[str, str, datetime], list[int]] = {}
    release: Deferred[None] | None = None
    for op in ops:
        if release is not None and op[0] != "record":
            store.gate, gate = None, release
            release = None
            gate.callback(None)
        if op[0] == "record":
            _, key, model, status, prompt, completion = op
            ledger(
                completed(
                    api_key=key,
                    model=model,
                    status=status,
                    prompt_eval_count=prompt,
                    eval_count=completion,
                )
            )
            when = datetime.fromtimestamp(int(clock.seconds()) // 3600 * 3600, UTC)
            counts = expected.setdefault((key, model or "", when), [0, 0, 0, 0])
            for i, n in enumerate((1, int(status >= 400), prompt, completion)):
                counts[i] += n
        elif op[0] == "advance":
            clock.advance(op[1])
        elif op[0] == "flush":
            store.fail = op[1]
            ledger.flush()
        else:
            store.fail = op[1]
            release = store.gate = Deferred()
            ledger.flush()
    if release is not None:
        store.gate = None
        release.callback(None)
    store.fail = False
    # The admin view counts everything once, flushed or not...
    for key in ("a", "b", "anonymous"):
        seen = {(r.model, r.hour): r for r in fired(ledger.usage(key, hour(0), 10_000))}
        assert seen == {
            (model, when): UsageRow(key, model, when, *counts)
            for (k, model, when), counts in expected.items()
            if k == key
        }
    # ...and so does the store once the last flush went through.
    fired(ledger.flush())
    assert store.stored == expected
    assert ledger.pending_rows == 0


def test_a_deleted_keys_pending_counts_are_forgotten_not_written_back() -> None:
    """Deleting a key deletes its stored usage; what this instance still holds for it must not
    bring the rows back at the next flush. Anonymous and admin are never forgotten."""
    store = FakeStore()
    ledger, _ = ledger_on(store)
    for key in ("gone", "kept", "anonymous", "admin"):
        ledger(completed(api_key=key))
    ledger.forget_keys(["kept"])
    assert ledger.pending_rows == 3
    fired(ledger.flush())
    assert sorted(key for key, _, _ in store.table()) == ["admin", "anonymous", "kept"]


def test_models_no_backend_lists_count_as_other_so_made_up_names_make_no_rows() -> None:
    """A client asking for random model names (404s) adds one row, not one per name, and a
    key's real usage is still counted however many it tries."""
    store = FakeStore()
    known = {"llama3:latest": "llama3:latest"}
    ledger = UsageLedger(store, Clock(), known_model=known.get, max_rows=3)
    for i in range(50):
        ledger(completed(api_key="anonymous", model=f"made-up-{i}:latest", status=404))
    ledger(completed(api_key="key1", model="llama3:latest"))
    ledger(completed(api_key="key1", model=None, path="/api/version"))
    assert ledger.pending_rows == 3
    fired(ledger.flush())
    assert {(k, m): c for (k, m, _), c in store.table().items()} == {
        ("anonymous", "other"): (50, 50, 0, 0),
        ("key1", "llama3:latest"): (1, 0, 0, 0),
        ("key1", ""): (1, 0, 0, 0),
    }
