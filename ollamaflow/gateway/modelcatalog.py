"""Requests answered for the whole frontend rather than by one backend: the model catalog
(``/api/tags``, ``/api/ps``, ``/v1/models``) as the union over healthy backends, from the model
inventory, so every client sees one stable list whichever box it would have landed on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from ollamaflow import modelnames
from ollamaflow.records import Backend


class Inventory(Protocol):
    """What the gateway reads of the model inventory; all in memory, no I/O."""

    def known(self, backend_id: str) -> bool: ...

    def has(self, backend_id: str, model: str) -> bool | None: ...

    def is_loaded(self, backend_id: str, model: str) -> bool: ...

    def entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]: ...

    def loaded_entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]: ...

    def add_listener(self, listener: Callable[[str], None]) -> None: ...

    def learned(self, backend_id: str, model: str) -> None:
        """The backend answered a request for ``model``: it has it, loaded."""


#: Which models a listing may show (an API key's), by the name the inventory lists;
#: None: every one.
Shown = Callable[[str], bool] | None


def _union(
    sources: Iterable[Mapping[str, dict[str, Any]]], shown: Shown = None
) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for source in sources:
        for key, entry in source.items():
            merged.setdefault(key, entry)
    entries = [merged[key] for key in sorted(merged)]
    if shown is None:
        return entries
    return [e for e in entries if shown(str(e.get("name") or e.get("model") or ""))]


def tags(inventory: Inventory, backends: Iterable[Backend], shown: Shown = None) -> bytes:
    models = _union((inventory.entries(b.identifier) for b in backends), shown)
    return json.dumps({"models": models}).encode()


def ps(inventory: Inventory, backends: Iterable[Backend], shown: Shown = None) -> bytes:
    models = _union((inventory.loaded_entries(b.identifier) for b in backends), shown)
    return json.dumps({"models": models}).encode()


def _openai_model(entry: Mapping[str, Any]) -> dict[str, Any]:
    name = str(entry.get("model") or entry.get("name") or "")
    created = 0
    modified = entry.get("modified_at")
    if isinstance(modified, str):
        try:
            created = int(datetime.fromisoformat(modified).timestamp())
        except ValueError:
            created = 0
    try:
        owner = modelnames.parse(name).namespace
    except modelnames.InvalidModelName:
        owner = modelnames.DEFAULT_NAMESPACE
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


def openai_models(inventory: Inventory, backends: Iterable[Backend], shown: Shown = None) -> bytes:
    models = _union((inventory.entries(b.identifier) for b in backends), shown)
    return json.dumps({"object": "list", "data": [_openai_model(m) for m in models]}).encode()


def openai_model(inventory: Inventory, backends: Iterable[Backend], model: str) -> bytes | None:
    """One model, its ``id`` the name as asked (as Ollama echoes it), or None if none has it."""
    try:
        key = modelnames.normalize(model)
    except modelnames.InvalidModelName:
        return None
    for backend in backends:
        entry = inventory.entries(backend.identifier).get(key)
        if entry is not None:
            return json.dumps({**_openai_model(entry), "id": model}).encode()
    return None
