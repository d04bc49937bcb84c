"""Times as 1.2 writes them: ISO-8601 UTC dates and .NET TimeSpans, from an injected clock."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from ollamaflow.utctime import format_timespan, format_utc, utc_clock

#: .NET's constant ("c") TimeSpan format.
TIMESPAN = re.compile(r"-?(\d+\.)?\d\d:\d\d:\d\d(\.\d{7})?")


@pytest.mark.parametrize(
    ("span", "written"),
    [
        (timedelta(0), "00:00:00"),
        (timedelta(seconds=59), "00:00:59"),
        (timedelta(hours=1, minutes=2, seconds=3), "01:02:03"),
        (timedelta(days=1), "1.00:00:00"),
        (timedelta(days=12, hours=23, minutes=59, seconds=59), "12.23:59:59"),
        (timedelta(seconds=1, microseconds=500_000), "00:00:01.5000000"),
        (timedelta(microseconds=1), "00:00:00.0000010"),
        (timedelta(days=2, seconds=5, microseconds=123_456), "2.00:00:05.1234560"),
    ],
)
def test_a_timespan_is_written_as_dotnet_writes_it(span: timedelta, written: str) -> None:
    assert format_timespan(span) == written


@pytest.mark.parametrize(
    ("span", "written"),
    [
        (timedelta(seconds=-1), "-00:00:01"),
        (timedelta(days=-1, hours=-2), "-1.02:00:00"),
        (timedelta(milliseconds=-250), "-00:00:00.2500000"),
    ],
)
def test_a_negative_timespan_is_a_sign_before_the_magnitude(span: timedelta, written: str) -> None:
    """The wall clock stepping back makes an uptime negative: .NET writes "-00:00:01", never
    "-1.23:59:59" (a negative day count plus a positive remainder)."""
    assert format_timespan(span) == written


@given(st.timedeltas(min_value=timedelta(days=-99_999), max_value=timedelta(days=99_999)))
def test_every_timespan_has_dotnets_shape_and_its_sign(span: timedelta) -> None:
    written = format_timespan(span)
    assert TIMESPAN.fullmatch(written), written
    assert written.startswith("-") == (span < timedelta(0))
    assert format_timespan(-span).lstrip("-") == written.lstrip("-")


def test_a_date_is_iso_8601_in_utc_with_a_z() -> None:
    moment = datetime(2024, 5, 6, 9, 8, 7, 654_321, tzinfo=timezone(timedelta(hours=2)))
    assert format_utc(moment) == "2024-05-06T07:08:07.654321Z"


def test_the_clock_reads_the_injected_seconds_as_aware_utc() -> None:
    clock = Clock()
    now = utc_clock(clock.seconds)
    assert now() == datetime(1970, 1, 1, tzinfo=UTC)
    clock.advance(86_400.25)
    assert now() == datetime(1970, 1, 2, 0, 0, 0, 250_000, tzinfo=UTC)
    assert now().tzinfo is UTC
