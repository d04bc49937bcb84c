"""What model operations did to a simulator, in order, for tests that assert fleet-wide effects.

Read through `/_sim/state`; `/_sim/reset` clears it with the counters. Each list keeps only its
latest `MAX_EVENTS` entries.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

MAX_EVENTS = 1000


def _log() -> deque[dict[str, Any]]:
    return deque(maxlen=MAX_EVENTS)


@attrs.define
class Events:
    """Model operations that succeeded here, oldest first."""

    pulled: deque[dict[str, Any]] = attrs.Factory(_log)
    """`{"model"}` per finished pull."""
    created: deque[dict[str, Any]] = attrs.Factory(_log)
    """`{"model", "from", "files", "adapters", "quantize"}` per finished create."""
    copied: deque[dict[str, Any]] = attrs.Factory(_log)
    """`{"source", "destination"}` per copy."""
    deleted: deque[dict[str, Any]] = attrs.Factory(_log)
    """`{"model"}` per delete."""
    pushed: deque[dict[str, Any]] = attrs.Factory(_log)
    """`{"model", "digests"}` per finished push: the layers it sent."""
    unloaded: deque[dict[str, Any]] = attrs.Factory(_log)
    """`{"model", "reason"}` per unload; reason `keep_alive` (a request's keep_alive 0, as
    `ollama stop` sends), `expired`, `evicted` (to make room in `vram_bytes`), `deleted` or
    `control` (`POST /_sim/unload`)."""

    def clear(self) -> None:
        """Forget everything (`/_sim/reset`)."""
        for field in attrs.fields(Events):
            getattr(self, field.name).clear()

    def as_json(self) -> dict[str, list[dict[str, Any]]]:
        """Each list as JSON."""
        return {field.name: list(getattr(self, field.name)) for field in attrs.fields(Events)}
