"""Log events kept for a test to read: Twisted's annotations want an ``ILogObserver`` provider
where any callable would run, so ``keeping(events)`` makes one that appends to a list."""

from __future__ import annotations

from typing import Any

from twisted.logger import ILogObserver
from zope.interface import provider


def keeping(events: list[dict[str, Any]]) -> ILogObserver:
    """An observer appending every event it sees to ``events``."""

    @provider(ILogObserver)
    def keep(event: dict[str, Any]) -> None:
        events.append(event)

    return keep
