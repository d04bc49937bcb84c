"""Pinned properties: operator-chosen JSON merged into request bodies, pinned values winning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def deep_merge(body: Mapping[str, Any], pinned: Mapping[str, Any]) -> dict[str, Any]:
    """Objects merge recursively; anything else (arrays included) is replaced by the pin."""
    merged = dict(body)
    for key, value in pinned.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged
