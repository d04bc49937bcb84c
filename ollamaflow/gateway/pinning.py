"""Pinned properties: operator-chosen JSON merged into request bodies, pinned values winning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def deep_merge(body: Mapping[str, Any], pinned: Mapping[str, Any]) -> dict[str, Any]:
    """Objects merge recursively; anything else (arrays included) is replaced by the pin.

    Go's JSON decoder (Ollama's) matches object keys to fields without regard to case, the
    last one winning, so a pinned key first takes every case variant of itself out of the
    client's object (``MODEL``, ``Options``...); the last of them is what gets merged.
    """
    merged = dict(body)
    for key, value in pinned.items():
        current = _take(merged, key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def _take(body: dict[str, Any], key: str) -> Any:
    """Remove ``key`` and its case variants from ``body``; the value Go would have used."""
    lower = key.lower()
    variants = [k for k in body if k.lower() == lower]
    if not variants:
        return None
    value = body[variants[-1]]
    for variant in variants:
        del body[variant]
    return value
