"""Rate limits in memory: the sliding window's arithmetic (property tests against an oracle in
exact fractions), this instance's counts on a fake clock, the RESP client on an in-memory
transport, and SharedLimits' degraded paths against a scripted Redis."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import Any

import hiredis
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from logcapture import keeping
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from ollamaflow.ratelimits import window
from ollamaflow.ratelimits.contracts import Admitted, Limits, OverLimit
from ollamaflow.ratelimits.local import IDLE_SECONDS, SWEEP_BATCH, SWEEP_SECONDS, LocalLimits
from ollamaflow.ratelimits.redisclient import (
    RedisAddress,
    RedisError,
    RedisProtocol,
    RedisUnavailable,
    encode,
)
from ollamaflow.ratelimits.shared import ADMIT, SCRIPTS, SharedLimits

W = window.MINUTE_MS

# -- the window's arithmetic ----------------------------------------------------------------


def oracle_fits(previous: int, current: int, elapsed_ms: int, limit: int, need: int) -> bool:
    """The rule in exact fractions: one more request fits when the estimate plus one is within
    the limit; tokens (need ANY_ROOM) when the estimate is below it."""
    estimate = previous * Fraction(W - elapsed_ms, W) + current
    return estimate + 1 <= limit if need == window.ONE_MORE else estimate < limit


def later(previous: int, current: int, elapsed_ms: int, wait: int) -> tuple[int, int, int]:
    """The counts ``wait`` ms on, nothing else counted."""
    minutes, elapsed = divmod(elapsed_ms + wait, W)
    if minutes == 0:
        return previous, current, elapsed
    if minutes == 1:
        return current, 0, elapsed
    return 0, 0, elapsed


counts = st.integers(min_value=0, max_value=10_000)
elapsed_ms = st.integers(min_value=0, max_value=W - 1)
limits = st.integers(min_value=1, max_value=10_000)
needs = st.sampled_from([window.ONE_MORE, window.ANY_ROOM])


@given(counts, counts, elapsed_ms, limits, needs)
def test_fits_is_the_rule_in_exact_fractions(
    previous: int, current: int, elapsed: int, limit: int, need: int
) -> None:
    assert window.fits(previous, current, elapsed, limit, need) == oracle_fits(
        previous, current, elapsed, limit, need
    )


@settings(max_examples=500)
@given(counts, counts, elapsed_ms, limits, needs)
def test_the_wait_is_exact_and_retry_after_honest(
    previous: int, current: int, elapsed: int, limit: int, need: int
) -> None:
    assume(not window.fits(previous, current, elapsed, limit, need))
    wait = window.wait_ms(previous, current, elapsed, limit, need)
    # Exact: it fits after the wait, not a millisecond sooner; and never after two minutes.
    assert oracle_fits(*later(previous, current, elapsed, wait), limit, need)
    assert not oracle_fits(*later(previous, current, elapsed, wait - 1), limit, need)
    assert 0 < wait <= 2 * W - elapsed
    # Retry-After: the wait rounded up to whole seconds, from 1 to 60.
    retry = window.retry_after(previous, current, elapsed, limit, need)
    assert retry == min(60, max(1, -(-wait // 1000)))
    if wait <= 60_000:
        assert oracle_fits(*later(previous, current, elapsed, retry * 1000), limit, need)
    else:
        # Past the cap, asking again after it gives the rest, and that is honest too.
        then = later(previous, current, elapsed, 60_000)
        assert not window.fits(*then, limit, need)
        again = window.retry_after(*then, limit, need)
        assert oracle_fits(*later(*then, again * 1000), limit, need)


@settings(max_examples=300)
@given(
    st.integers(min_value=1, max_value=8),
    st.lists(st.integers(min_value=0, max_value=5 * W), max_size=120),
)
def test_admitting_with_fits_keeps_every_guarantee(limit: int, arrivals: list[int]) -> None:
    """Admit arrivals (ms) as a limiter does with the window functions, then check what the
    module promises against the admitted timestamps themselves."""
    arrivals.sort()
    minute, previous, current = 0, 0, 0
    admitted: list[int] = []
    for t in arrivals:
        now_minute, elapsed = window.minute_of(t)
        previous, current = window.rolled(minute, previous, current, now_minute)
        minute = now_minute
        if window.fits(previous, current, elapsed, limit):
            current += 1
            admitted.append(t)
        else:
            # Refused only when the rule refuses: the arithmetic is not stricter than promised.
            per_minute = Counter(a // W for a in admitted)
            assert not oracle_fits(
                per_minute[now_minute - 1], per_minute[now_minute], elapsed, limit, W
            )
    per_minute = Counter(t // W for t in admitted)
    for i, t in enumerate(admitted):
        m, elapsed = divmod(t, W)
        so_far = sum(1 for a in admitted[: i + 1] if a // W == m)
        # The weighted estimate, this admission included, is within the limit...
        assert per_minute[m - 1] * Fraction(W - elapsed, W) + so_far <= limit
        # ...so is each aligned minute, and any 60 s span holds at most 2 * limit - 1.
        assert per_minute[m] <= limit
        assert sum(1 for a in admitted if t <= a < t + W) <= 2 * limit - 1


def test_a_request_late_in_a_minute_still_weighs_at_the_start_of_the_next() -> None:
    assert window.fits(0, 0, 59_999, 1)
    assert not window.fits(1, 0, 0, 1)
    assert window.wait_ms(1, 0, 0, 1) == W


def test_refusal_names_the_limit_to_wait_longest_for() -> None:
    both = Limits(requests_per_minute=2, tokens_per_minute=10, max_concurrent=1)
    # Requests: 2 of 2 this minute, 30 s in: they weigh 1 only 30 s into the next minute.
    # Tokens: 10 in the previous minute, weighing 5 of 10 now; one request in flight of one.
    refused = window.refusal(both, 30_000, (0, 2), (10, 0), 1)
    assert refused == OverLimit("requests per minute", 2, 60)
    refused = window.refusal(both, 30_000, (0, 0), (0, 50), 0)
    assert refused == OverLimit("tokens per minute", 10, 60)
    assert window.refusal(both, 30_000, (0, 0), (0, 0), 1) == OverLimit("concurrent requests", 1, 1)
    assert window.refusal(both, 30_000, (0, 1), (0, 9), 0) is None
    assert window.refusal(Limits(), 0, (99, 99), (99, 99), 99) is None


# -- LocalLimits on a fake clock -------------------------------------------------------------


def admitted(answer: Any) -> str:
    assert isinstance(answer, Admitted), answer
    return answer.lease


def test_requests_per_minute_and_an_honest_retry_after() -> None:
    clock = Clock()
    clock.advance(30)  # half a minute in
    local = LocalLimits(clock)
    rpm = Limits(requests_per_minute=3)
    for _ in range(3):
        admitted(local.admit("k", rpm))
    # Three in this minute: in the next, they weigh 3 * (1 - elapsed/60); 2 at 20 s in.
    assert local.admit("k", rpm) == OverLimit("requests per minute", 3, 50)
    admitted(local.admit("other", rpm))
    clock.advance(49)
    assert local.admit("k", rpm) == OverLimit("requests per minute", 3, 1)
    clock.advance(1)
    admitted(local.admit("k", rpm))
    assert isinstance(local.admit("k", rpm), OverLimit)


def test_tokens_per_minute_count_what_was_spent() -> None:
    clock = Clock()
    local = LocalLimits(clock)
    tpm = Limits(tokens_per_minute=100)
    admitted(local.admit("k", tpm))
    local.spend("k", tpm, 99)
    admitted(local.admit("k", tpm))  # 99 < 100: room for more
    local.spend("k", tpm, 1)
    refused = local.admit("k", tpm)
    # 100 tokens at 0 s: below the limit once the next minute has begun.
    assert refused == OverLimit("tokens per minute", 100, 60)
    clock.advance(61)
    admitted(local.admit("k", tpm))
    local.spend("k", Limits(), 10_000)  # no tokens limit: nothing counted
    admitted(local.admit("k", tpm))


def test_concurrency_is_freed_by_release() -> None:
    local = LocalLimits(Clock())
    two = Limits(max_concurrent=2)
    first, second = admitted(local.admit("k", two)), admitted(local.admit("k", two))
    assert first != second
    assert local.admit("k", two) == OverLimit("concurrent requests", 2, 1)
    local.release("k", first)
    local.release("k", first)  # twice: harmless
    local.release("k", "no-such-lease")
    local.release("no-such-key", second)
    third = admitted(local.admit("k", two))
    assert local.in_flight("k") == 2
    assert local.admit("k", two) == OverLimit("concurrent requests", 2, 1)
    local.release("k", second)
    local.release("k", third)
    assert local.in_flight("k") == 0


def test_no_limits_admit_without_keeping_anything() -> None:
    local = LocalLimits(Clock())
    leases = {admitted(local.admit(f"k{i}", Limits())) for i in range(100)}
    assert leases == {""} and len(local) == 0, "nothing to release"


def test_only_a_concurrency_limit_hands_out_leases_each_its_own() -> None:
    local = LocalLimits(Clock())
    assert admitted(local.admit("k", Limits(requests_per_minute=10))) == ""
    leases = {admitted(local.admit("k", Limits(max_concurrent=100))) for _ in range(50)}
    assert len(leases) == 50 and "" not in leases and local.in_flight("k") == 50


def test_idle_keys_are_forgotten_but_not_those_in_flight() -> None:
    clock = Clock()
    local = LocalLimits(clock)
    rpm = Limits(requests_per_minute=100)
    keys = 3 * SWEEP_BATCH + 10
    for i in range(keys):
        admitted(local.admit(f"k{i}", rpm))
    busy = admitted(local.admit("busy", Limits(max_concurrent=1)))
    assert len(local) == keys + 1
    clock.advance(IDLE_SECONDS - 1)
    admitted(local.admit("fresh", rpm))
    assert len(local) == keys + 2  # not idle for two minutes yet
    clock.advance(1 + SWEEP_SECONDS)
    # Looked at every few seconds, a batch per call: a few calls forget all but the busy one.
    for _ in range(5):
        admitted(local.admit("fresh", rpm))
    assert len(local) == 2
    assert local.admit("busy", Limits(max_concurrent=1)) == OverLimit("concurrent requests", 1, 1)
    local.release("busy", busy)
    clock.advance(IDLE_SECONDS + 1)
    admitted(local.admit("fresh", rpm))
    assert len(local) == 1


# -- the RESP client on an in-memory transport ----------------------------------------------


class Wire(StringTransport):
    """An in-memory transport whose closing tells its protocol at once."""

    def __init__(self, protocol: Any) -> None:
        super().__init__()
        self.closed = False
        self.protocol = protocol
        protocol.makeConnection(self)

    def loseConnection(self) -> None:
        self._close()

    def abortConnection(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def commands(self) -> list[list[bytes]]:
        """The commands written so far (and clears them)."""
        reader = hiredis.Reader()
        reader.feed(self.value())
        self.clear()
        out = []
        while (command := reader.gets()) is not False:
            out.append(command)
        return out


def connected() -> tuple[RedisProtocol, Wire]:
    proto = RedisProtocol()
    return proto, Wire(proto)


def results(*answers: Any) -> list[Any]:
    """What each answer is or, for a Deferred, has fired with so far."""
    out: list[Any] = []
    for answer in answers:
        if isinstance(answer, Deferred):
            answer.addBoth(out.append)
        else:
            out.append(answer)
    return out


def test_commands_are_written_as_resp_arrays() -> None:
    assert encode(["SET", b"k\r\n", 12]) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"
    proto, wire = connected()
    proto.call(("GET", "é"))
    assert wire.commands() == [[b"GET", "é".encode()]]


def test_replies_split_across_reads_are_matched_in_order() -> None:
    proto, wire = connected()
    got = results(*(proto.call(("X",)) for _ in range(6)))
    stream = (
        b"$3\r\nabc\r\n"  # a bulk string
        b"$-1\r\n"  # nil
        b"-ERR wrong kind\r\n"  # an error reply
        b"*4\r\n:1\r\n$-1\r\n*1\r\n+OK\r\n$0\r\n\r\n"  # an array: integer, nil, array, empty
        b"*-1\r\n"  # a nil array
        b":-7\r\n"
    )
    for i in range(len(stream)):
        proto.dataReceived(stream[i : i + 1])
    assert got[:2] == [b"abc", None]
    assert isinstance(got[2], Failure) and got[2].check(RedisError)
    assert str(got[2].value) == "ERR wrong kind"
    assert got[3:] == [[1, None, [b"OK"], b""], None, -7]
    assert not wire.closed


def test_a_garbled_stream_or_a_lost_connection_fails_what_waits() -> None:
    proto, wire = connected()
    got = results(proto.call(("A",)), proto.call(("B",)))
    proto.dataReceived(b"+OK\r\n!nonsense\r\n")
    assert got[0] == b"OK"
    assert got[1].check(RedisUnavailable) and wire.closed
    proto, wire = connected()
    got = results(proto.call(("A",)))
    proto.dataReceived(b"$10\r\nhalf")
    wire.loseConnection()
    assert got[0].check(RedisUnavailable)
    assert results(proto.call(("late",)))[0].check(RedisUnavailable)
    proto, wire = connected()
    proto.dataReceived(b"+unasked\r\n")
    assert wire.closed


@pytest.mark.parametrize(
    ("url", "address", "described"),
    [
        ("redis://localhost", RedisAddress("localhost"), "redis://localhost:6379/0"),
        ("redis://:s%40crét@10.0.0.1:7000/3", RedisAddress("10.0.0.1", 7000, 3, None, "s@crét"),
         "redis://10.0.0.1:7000/3"),
        ("redis://ann:pw@[::1]/", RedisAddress("::1", 6379, 0, "ann", "pw"),
         "redis://ann@[::1]:6379/0"),
    ],
)  # fmt: skip
def test_urls(url: str, address: RedisAddress, described: str) -> None:
    parsed = RedisAddress.from_url(url)
    assert parsed == address
    assert parsed.describe() == described
    assert "pw" not in repr(parsed) and "crét" not in repr(parsed)


@pytest.mark.parametrize(
    "url", ["http://localhost", "redis://h/db", "redis://h:99999", "redis://h/1?x=1", "rediss://h"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        RedisAddress.from_url(url)


# -- SharedLimits against a scripted Redis ----------------------------------------------------


@implementer(IStreamClientEndpoint)
class Endpoint:
    """Connects in memory (or is refused), counting the attempts."""

    def __init__(self) -> None:
        self.wires: list[Wire] = []
        self.attempts = 0
        self.refusing = False

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.attempts += 1
        if self.refusing:
            return defer.fail(ConnectionRefusedError())
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6379))
        assert proto is not None
        self.wires.append(Wire(proto))
        return defer.succeed(proto)


class Scripted:
    """A SharedLimits on a fake clock and an in-memory Redis the test answers."""

    def __init__(self, url: str = "redis://:hunter2@redis.example:6379/2") -> None:
        self.clock = Clock()
        self.endpoint = Endpoint()
        self.limits = SharedLimits(
            self.clock, url, endpoint=self.endpoint, backoff=(1.0, 4.0), namespace="t:"
        )
        self.events: list[dict[str, Any]] = []

    @property
    def wire(self) -> Wire:
        return self.endpoint.wires[-1]

    def answer(self, *replies: bytes) -> None:
        self.wire.protocol.dataReceived(b"".join(replies))

    def log_in(self) -> None:
        """Answer AUTH, SELECT and the SCRIPT LOADs."""
        commands = self.wire.commands()
        assert commands[:2] == [[b"AUTH", b"hunter2"], [b"SELECT", b"2"]]
        assert [c[:2] for c in commands[2:]] == [[b"SCRIPT", b"LOAD"]] * len(SCRIPTS)
        self.answer(b"+OK\r\n+OK\r\n", *(b"$40\r\n%s\r\n" % s.sha.encode() for s in SCRIPTS))
        assert self.limits.shared

    def logged(self, level: LogLevel) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("log_level") == level and e.get("log_namespace", "").endswith(".shared")
        ]

    def __enter__(self) -> Scripted:
        self._observer = keeping(self.events)
        globalLogPublisher.addObserver(self._observer)
        self.limits.startService()
        return self

    def __exit__(self, *exc: object) -> None:
        self.limits.stopService()
        globalLogPublisher.removeObserver(self._observer)


RPM2 = Limits(requests_per_minute=2, max_concurrent=5)


def test_one_round_trip_admits_and_a_forgotten_script_is_sent_again() -> None:
    with Scripted() as s:
        s.log_in()
        answer = s.limits.admit("key", RPM2)
        assert isinstance(answer, Deferred)
        [command] = s.wire.commands()
        assert command[:5] == [b"EVALSHA", ADMIT.sha.encode(), b"2", b"t:{key}:w", b"t:{key}:l"]
        assert command[5:8] == [b"2", b"0", b"5"]
        s.answer(b"*7\r\n:1\r\n:0\r\n:0\r\n:1\r\n:0\r\n:0\r\n:1\r\n")
        first = admitted(results(answer)[0])
        # Redis lost its scripts (a restart, SCRIPT FLUSH): EVAL, once.
        answer = s.limits.admit("key", RPM2)
        s.wire.clear()
        s.answer(b"-NOSCRIPT No matching script\r\n")
        [command] = s.wire.commands()
        assert command[0] == b"EVAL" and command[1] == ADMIT.source.encode()
        # Redis counted 2 this minute (one from another instance), 6 s in: refused.
        s.answer(b"*7\r\n:0\r\n:6000\r\n:0\r\n:2\r\n:0\r\n:0\r\n:1\r\n")
        assert results(answer)[0] == OverLimit("requests per minute", 2, 60)
        s.limits.release("key", first)
        assert s.wire.commands() == [[b"ZREM", b"t:{key}:l", first.encode()]]
        assert s.logged(LogLevel.warn) == []


def test_a_slow_redis_is_answered_locally_logged_once_and_not_called_per_request() -> None:
    with Scripted() as s:
        s.log_in()
        asked = s.limits.admit("key", RPM2)
        s.clock.advance(0.25)  # no answer within the call's timeout
        lease = admitted(results(asked)[0])
        assert s.wire.closed and not s.limits.shared
        # Down: answered at once from this instance's counts (one admitted already).
        admitted(s.limits.admit("key", RPM2))
        assert s.limits.admit("key", RPM2) == OverLimit("requests per minute", 2, 60)
        s.limits.release("key", lease)
        for _ in range(100):
            s.limits.admit("other", RPM2)
        assert s.endpoint.attempts == 1
        # Reconnections back off (1 s, then 2 s, 4 s, 4 s), refused meanwhile; logged once.
        s.endpoint.refusing = True
        for delay in [1.0, 2.0, 4.0, 4.0]:
            s.clock.advance(delay)
        assert s.endpoint.attempts == 5
        [warning] = s.logged(LogLevel.warn)
        assert warning["redis"] == "redis://redis.example:6379/2"
        assert warning["why"] == "no answer within 0.25 s"
        assert "hunter2" not in repr(s.events)
        s.endpoint.refusing = False
        s.clock.advance(4.0)
        s.log_in()
        assert len(s.logged(LogLevel.info)) == 1
        assert len(s.logged(LogLevel.warn)) == 1


def test_an_error_reply_is_answered_locally_and_logged_at_most_once_a_minute() -> None:
    with Scripted() as s:
        s.log_in()
        replies = []
        for _ in range(3):
            replies.append(s.limits.admit("key", Limits(tokens_per_minute=10)))
            s.answer(b"-OOM command not allowed when used memory > 'maxmemory'\r\n")
        assert all(isinstance(r, Admitted) for r in results(*replies))
        assert s.limits.shared
        [warning] = s.logged(LogLevel.warn)
        assert warning["why"].startswith("OOM command not allowed")
        s.clock.advance(60)
        s.limits.admit("key", Limits(tokens_per_minute=10))
        s.answer(b"*3\r\n:1\r\n:2\r\n:3\r\n")  # not what the script returns
        assert len(s.logged(LogLevel.warn)) == 2


def test_leases_taken_while_redis_was_away_are_put_there_when_it_is_back() -> None:
    s = Scripted()
    s.endpoint.refusing = True
    with s:
        assert s.endpoint.attempts == 1 and not s.limits.shared
        one = Limits(max_concurrent=1)
        lease = admitted(s.limits.admit("key", one))  # down: answered at once
        assert s.limits.admit("key", one) == OverLimit("concurrent requests", 1, 1)
        [warning] = s.logged(LogLevel.warn)
        assert warning["why"].startswith("cannot connect: Connection was refused")
        s.endpoint.refusing = False
        s.clock.advance(1.0)
        s.log_in()
        [command] = s.wire.commands()
        assert command[0] == b"EVALSHA" and command[3:] == [b"t:{key}:l", b"30000", lease.encode()]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50)), max_size=30))
def test_finish_is_release_then_spend(ends: list[tuple[bool, int]]) -> None:
    """The gateway ends every limited request with one ``finish``: the same counts as
    ``release`` and ``spend`` one after the other."""
    limits = Limits(requests_per_minute=1000, tokens_per_minute=200, max_concurrent=100)
    one, two = LocalLimits(Clock()), LocalLimits(Clock())
    for release, tokens in ends:
        answer_one, answer_two = one.admit("k", limits), two.admit("k", limits)
        assert type(answer_one) is type(answer_two)
        if release and isinstance(answer_one, Admitted) and isinstance(answer_two, Admitted):
            one.finish("k", limits, answer_one.lease, tokens)
            two.release("k", answer_two.lease)
            two.spend("k", limits, tokens)
        assert one.in_flight("k") == two.in_flight("k")
        assert one.check("k", limits) == two.check("k", limits)


@given(
    st.lists(
        st.tuples(st.integers(0, 90_000), st.integers(0, 40), st.booleans()),
        min_size=1,
        max_size=60,
    ),
    st.integers(0, 8),
    st.integers(0, 120),
    st.integers(0, 4),
)
def test_admit_decides_as_the_window_does(
    steps: list[tuple[int, int, bool]], rpm: int, tpm: int, most: int
) -> None:
    """``admit`` writes the window's test out for speed: whatever the counts and the time, it
    admits exactly when :func:`window.refusal` (through ``check``) finds nothing to refuse, and
    refuses with what it names."""
    clock = Clock()
    clock.advance(1_800_000_000)
    local = LocalLimits(clock)
    limits = Limits(requests_per_minute=rpm, tokens_per_minute=tpm, max_concurrent=most)
    held: list[str] = []
    for advance_ms, tokens, end_one in steps:
        clock.advance(advance_ms / 1000)
        expected = local.check("k", limits)
        answer = local.admit("k", limits)
        if expected is None:
            assert isinstance(answer, Admitted)
            held.append(answer.lease)
        else:
            assert answer == expected
        if end_one and held:
            local.finish("k", limits, held.pop(0), tokens)


def test_the_tokens_of_a_request_longer_than_the_idle_time_still_count() -> None:
    """A key without a concurrency limit holds no lease, so its counts may be forgotten while
    a long generation runs: the tokens it reports at the end count all the same."""
    clock = Clock()
    local = LocalLimits(clock)
    limits = Limits(tokens_per_minute=100)
    admitted(local.admit("k", limits))
    clock.advance(130)
    admitted(local.admit("other", limits))  # a sweep: "k" has been idle for two minutes
    local.finish("k", limits, "", 5000)
    assert isinstance(local.admit("k", limits), OverLimit)
