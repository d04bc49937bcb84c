"""Several backends' progress streams (pull, create) as one, in Ollama's own shapes.

The client sees what one Ollama would send: each status line once, when every backend still
running has reached it (the slowest sets the pace), and per-layer lines (``digest``, ``total``,
``completed``) whose ``completed`` is the least any running backend has of that layer, so the
``ollama`` CLI's per-layer bars and Open WebUI's progress read as they do against one box.
Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: Distinct status lines and layers followed per operation; a backend sending more (it would
#: be broken or hostile) has the rest ignored.
MAX_STATUSES = 256
MAX_LAYERS = 256
#: Status strings and digests longer than this are cut (Ollama's are under 100 characters).
MAX_TEXT = 200
#: Lines the merged stream never passes on: each backend's end, said once for all by the caller.
_FINAL = "success"


def _text(value: object) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@attrs.define
class _Source:
    """One backend's stream as read so far."""

    seen: set[str] = attrs.field(factory=set)
    layers: dict[str, tuple[int, int]] = attrs.field(factory=dict)
    running: bool = True


@attrs.define
class _Layer:
    status: str
    total: int
    #: Statuses the first backend to report it had sent before: they go out first.
    after: frozenset[str]
    sent: int | None = None


@attrs.define
class ProgressMerger:
    """Fold each backend's progress messages in; get back the messages for the client."""

    backends: Iterable[str]
    _sources: dict[str, _Source] = attrs.field(init=False)
    _order: list[str] = attrs.field(init=False, factory=list)
    _sent: set[str] = attrs.field(init=False, factory=set)
    _layers: dict[str, _Layer] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._sources = {identifier: _Source() for identifier in self.backends}

    def message(self, backend: str, message: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A progress message from ``backend``; the messages the client can be sent now."""
        source = self._sources.get(backend)
        status = _text(message.get("status"))
        if source is None or not source.running or status is None or status == _FINAL:
            return []
        digest = _text(message.get("digest"))
        total = _count(message.get("total"))
        if digest is not None and total is not None:
            layer = self._layers.get(digest)
            if layer is None:
                if len(self._layers) >= MAX_LAYERS:
                    return []
                layer = self._layers[digest] = _Layer(status, total, frozenset(source.seen))
            completed = _count(message.get("completed"))
            if completed is None:
                completed = source.layers.get(digest, (0, 0))[0]
            source.layers[digest] = (min(completed, total), total)
        elif status not in source.seen:
            if status not in self._sent and status not in self._order:
                if len(self._order) >= MAX_STATUSES:
                    return []
                self._order.append(status)
            source.seen.add(status)
        return self._flush()

    def already_sent(self, status: str) -> None:
        """The caller sent ``status`` itself (the first line, before any backend spoke)."""
        self._sent.add(status)
        if status in self._order:
            self._order.remove(status)

    def ended(self, backend: str) -> list[dict[str, Any]]:
        """``backend`` finished (well or not): it no longer holds the others back."""
        source = self._sources.get(backend)
        if source is None or not source.running:
            return []
        source.running = False
        for digest, (_, total) in source.layers.items():
            source.layers[digest] = (total, total)
        return self._flush()

    def _flush(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            out.extend(self._layer_lines())
            status = self._next_status()
            if status is None:
                return out
            self._order.remove(status)
            self._sent.add(status)
            out.append({"status": status})

    def _next_status(self) -> str | None:
        """The oldest status not sent yet, once every running backend has reached it."""
        if not self._order:
            return None
        status = self._order[0]
        running = [s for s in self._sources.values() if s.running]
        return status if all(status in s.seen for s in running) else None

    def _layer_lines(self) -> list[dict[str, Any]]:
        out = []
        running = [s for s in self._sources.values() if s.running]
        for digest, layer in self._layers.items():
            if not layer.after <= self._sent:
                continue
            if running:
                completed = min(s.layers.get(digest, (0, 0))[0] for s in running)
            else:
                completed = layer.total
            if layer.sent is not None and completed <= layer.sent:
                continue  # a bar never moves back
            layer.sent = completed
            line: dict[str, Any] = {"status": layer.status, "digest": digest, "total": layer.total}
            if completed:
                line["completed"] = completed
            out.append(line)
        return out
