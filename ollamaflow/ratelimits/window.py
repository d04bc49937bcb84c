"""The sliding-window counter, as pure integer arithmetic (no clock, no I/O).

Each limit keeps two counts: the current fixed minute's and the previous minute's. What is
counted "in the last minute" is estimated as ``current + previous * (1 - elapsed / 60 s)``: the
previous minute weighted by the part of it still inside a window ending now (Cloudflare's and
many gateways' scheme: two integers per limit, no log of timestamps).

Everything is kept in integers so the Lua scripts in :mod:`.shared` reach the same answers
bit for bit: times are milliseconds, and an estimate is held scaled by :data:`MINUTE_MS`
(``previous * (MINUTE_MS - elapsed) + current * MINUTE_MS``, "weighted units").

What admitting with :func:`fits` guarantees, precisely:

- at every admission, the weighted estimate including what is admitted is at most the limit;
- hence each fixed (aligned) minute holds at most ``limit`` admissions;
- and any 60 s span holds at most ``2 * limit - 1`` of them (the approximation's known slack:
  a burst at the end of one minute is weighted down, not forgotten, in the next).
"""

from __future__ import annotations

from ollamaflow.ratelimits.contracts import Limits, OverLimit

#: One minute in milliseconds: the window, and the scale of weighted units.
MINUTE_MS = 60_000
#: The longest Retry-After ever given, in seconds.
MAX_RETRY_AFTER = 60

#: What a request needs free, in weighted units: room for one whole request...
ONE_MORE = MINUTE_MS
#: ...or, for tokens (known only once the request ends), any room at all: the estimate must be
#: below the limit.
ANY_ROOM = 1

REQUESTS_PER_MINUTE = "requests per minute"
TOKENS_PER_MINUTE = "tokens per minute"
CONCURRENT_REQUESTS = "concurrent requests"


def minute_of(now_ms: int) -> tuple[int, int]:
    """The fixed minute ``now_ms`` falls in, and the milliseconds elapsed in it."""
    return divmod(now_ms, MINUTE_MS)


def rolled(minute: int, previous: int, current: int, now_minute: int) -> tuple[int, int]:
    """``(previous, current)`` counted as of ``minute``, seen from ``now_minute`` (not earlier)."""
    if now_minute <= minute:
        return previous, current
    if now_minute == minute + 1:
        return current, 0
    return 0, 0


def fits(previous: int, current: int, elapsed_ms: int, limit: int, need: int = ONE_MORE) -> bool:
    """Whether ``need`` more weighted units stay within ``limit`` (``limit <= 0``: no limit)."""
    return (
        limit <= 0
        or previous * (MINUTE_MS - elapsed_ms) + current * MINUTE_MS + need <= limit * MINUTE_MS
    )


def wait_ms(previous: int, current: int, elapsed_ms: int, limit: int, need: int = ONE_MORE) -> int:
    """The fewest milliseconds after which :func:`fits` holds if nothing else is counted
    (0 if it holds now). Never more than two minutes, while ``need`` is at most the limit."""
    if fits(previous, current, elapsed_ms, limit, need):
        return 0
    room = limit * MINUTE_MS - need
    # Still in this minute: only the previous minute's weight shrinks.
    this_minute = room - current * MINUTE_MS
    if previous > 0 and this_minute >= 0:
        wait = MINUTE_MS - elapsed_ms - this_minute // previous
        if wait < MINUTE_MS - elapsed_ms:
            return wait
    # In the next minute this one's count is the previous one, shrinking from its start.
    to_next = MINUTE_MS - elapsed_ms
    if current == 0:
        return to_next
    if room >= current:
        return to_next + max(0, MINUTE_MS - room // current)
    # Two minutes on, nothing counted is left.
    return to_next + MINUTE_MS


def retry_after(
    previous: int, current: int, elapsed_ms: int, limit: int, need: int = ONE_MORE
) -> int:
    """Whole seconds to wait before :func:`fits` holds if nothing else is counted, from 1 to
    :data:`MAX_RETRY_AFTER`. Past that cap (a burst early in the minute against a small limit
    can take up to two), asking again after the cap gives the rest."""
    wait = wait_ms(previous, current, elapsed_ms, limit, need)
    return min(MAX_RETRY_AFTER, max(1, -(-wait // 1000)))


def refusal(
    limits: Limits,
    elapsed_ms: int,
    requests: tuple[int, int],
    tokens: tuple[int, int],
    in_flight: int,
) -> OverLimit | None:
    """Which limit refuses one more request, or ``None``; ``requests`` and ``tokens`` are
    ``(previous, current)`` counts already rolled to the current minute. When several refuse,
    the one to wait longest for is named, so its Retry-After satisfies them all."""
    worst: OverLimit | None = None
    rpm, tpm, most = limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent
    if rpm > 0 and not fits(requests[0], requests[1], elapsed_ms, rpm, ONE_MORE):
        wait = retry_after(requests[0], requests[1], elapsed_ms, rpm, ONE_MORE)
        worst = OverLimit(REQUESTS_PER_MINUTE, rpm, wait)
    if tpm > 0 and not fits(tokens[0], tokens[1], elapsed_ms, tpm, ANY_ROOM):
        wait = retry_after(tokens[0], tokens[1], elapsed_ms, tpm, ANY_ROOM)
        if worst is None or wait > worst.retry_after:
            worst = OverLimit(TOKENS_PER_MINUTE, tpm, wait)
    # When a slot frees is unknowable: a second is the shortest honest answer.
    if most > 0 and in_flight >= most and worst is None:
        worst = OverLimit(CONCURRENT_REQUESTS, most, 1)
    return worst
