"""Time as OllamaFlow 1.2 writes it: a UTC clock, ISO-8601 dates and .NET TimeSpans.

The admin API, the store and the health records all write times through these three, so a date
or a duration looks the same wherever it appears. No reactor here: a clock is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

#: .NET counts a TimeSpan in ticks of 100 ns.
_TICKS_PER_SECOND = 10_000_000


def utc_clock(seconds: Callable[[], float]) -> Callable[[], datetime]:
    """Turn a reactor's ``seconds`` into a ``now()`` giving aware UTC datetimes."""
    return lambda: datetime.fromtimestamp(seconds(), UTC)


def format_utc(moment: datetime) -> str:
    """ISO-8601 in UTC with a ``Z``, as OllamaFlow 1.2 writes dates."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_timespan(span: timedelta) -> str:
    """A duration as .NET writes a TimeSpan (``[-][d.]hh:mm:ss[.fffffff]``), as 1.2 did.

    A negative span (the wall clock stepped back) keeps .NET's form: a sign before the
    magnitude, never a negative day count with a positive remainder.
    """
    ticks = int(span.total_seconds() * _TICKS_PER_SECOND)
    sign = "-" if ticks < 0 else ""
    days, rest = divmod(abs(ticks), 86400 * _TICKS_PER_SECOND)
    hours, rest = divmod(rest, 3600 * _TICKS_PER_SECOND)
    minutes, rest = divmod(rest, 60 * _TICKS_PER_SECOND)
    seconds, fraction = divmod(rest, _TICKS_PER_SECOND)
    text = f"{hours:02}:{minutes:02}:{seconds:02}"
    if days:
        text = f"{days}.{text}"
    if fraction:
        text = f"{text}.{fraction:07}"
    return sign + text
