"""RFC 3339 timestamps as Ollama writes them, from reactor seconds."""

from __future__ import annotations

import time

_cached_second = -1
_cached_prefix = ""


def rfc3339(seconds: float) -> str:
    """Format epoch `seconds` as `2024-05-20T10:23:45.123456Z` (cached per second; hot path)."""
    global _cached_second, _cached_prefix
    whole = int(seconds)
    if whole != _cached_second:
        _cached_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _cached_second = whole
    micros = int((seconds - whole) * 1_000_000)
    return f"{_cached_prefix}.{micros:06d}Z"


FOREVER_SECONDS = 292 * 365 * 24 * 3600
"""How far Ollama's `expires_at` lies for a model kept loaded forever (Go's max duration)."""
