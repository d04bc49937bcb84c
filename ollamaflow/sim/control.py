"""`/_sim/`: read the simulator's knobs and counters, change knobs, reset counters.

    GET  /_sim/state    {"config", "counters", "models", "loaded", "ps", "vram_used" (bytes of
                        the models loading or loaded), "blobs", and the model operations done
                        here: "pulled", "created", "copied", "deleted", "pushed", "unloaded"
                        (see `events.Events`)}
    GET  /_sim/config   the knobs
    POST /_sim/config   a JSON object of knobs to change; unknown knob or bad value → 400
    POST /_sim/reset    zero the counters and forget the model operations (blobs stay)
    POST /_sim/unload   unload every model (busy ones when idle)

Control requests bypass faults and are not counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.web.server import Request

from ollamaflow.sim.responses import json_response
from ollamaflow.sim.state import SimState

ConfigHook = Callable[[dict[str, Any]], None]
"""Called with the knobs that just changed (the listener reacts to `refuse`)."""


@attrs.define
class ControlAPI:
    """Renders every `/_sim/` request."""

    state: SimState
    on_change: ConfigHook = lambda _changes: None

    def render(self, request: Request) -> bytes:
        path = request.path
        method = request.method
        if path == b"/_sim/state" and method == b"GET":
            return json_response(request, self.snapshot())
        if path == b"/_sim/config" and method == b"GET":
            return json_response(request, self.state.config.as_json())
        if path == b"/_sim/config" and method == b"POST":
            return self._patch(request)
        if path == b"/_sim/reset" and method == b"POST":
            self.state.counters.reset()
            self.state.events.clear()
            return json_response(request, self.state.counters.as_json())
        if path == b"/_sim/unload" and method == b"POST":
            self.state.scheduler.unload_all()
            return json_response(request, {"loaded": self.state.scheduler.loaded()})
        known = path in (b"/_sim/state", b"/_sim/config", b"/_sim/reset", b"/_sim/unload")
        status = 405 if known else 404
        return json_response(request, {"error": f"{status} {path.decode('latin-1')}"}, status)

    def snapshot(self) -> dict[str, Any]:
        """Knobs, counters, installed and loaded models, uploaded blobs, model operations."""
        state = self.state
        ps = state.scheduler.loaded()
        return {
            "config": state.config.as_json(),
            "counters": state.counters.as_json(),
            "models": [m.name for m in state.catalog],
            "loaded": [entry["name"] for entry in ps],
            "ps": ps,
            "vram_used": state.scheduler.vram_used,
            "blobs": [{"digest": blob.digest, "size": blob.size} for blob in state.blobs],
            **state.events.as_json(),
        }

    def _patch(self, request: Request) -> bytes:
        try:
            raw = request.content.read() if request.content is not None else b""
            changes = json.loads(raw or b"{}")
        except ValueError as e:
            return json_response(request, {"error": f"invalid JSON: {e}"}, 400)
        if not isinstance(changes, dict):
            return json_response(request, {"error": "expected a JSON object of knobs"}, 400)
        try:
            applied = self.state.config.patch(changes)
        except (TypeError, ValueError) as e:
            return json_response(request, {"error": str(e)}, 400)
        self.on_change(applied)
        return json_response(request, self.state.config.as_json())
