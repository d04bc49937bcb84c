"""The ``Date`` header's value, formatted once a second for every response of the server."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web.http import datetimeToString


class DateCache:
    """The HTTP date of ``clock``'s current second; formatting costs more than a response's
    other header fields together, so it is done once a second, not once a response."""

    __slots__ = ("_clock", "_second", "_value")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(self._clock.seconds())
        if now != self._second:
            self._second = now
            self._value = datetimeToString(now)
        return self._value
