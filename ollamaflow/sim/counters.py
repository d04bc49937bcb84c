"""What the simulator saw: request counts, concurrency and lifecycle events."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class Counters:
    """Plain counters the request path bumps; read through `/_sim/state` or in-process."""

    requests: dict[str, int] = attrs.Factory(dict)
    """API requests per route path (unknown paths count under `other`)."""
    statuses: dict[int, int] = attrs.Factory(dict)
    """Finished API responses per HTTP status."""
    in_flight: int = 0
    peak_in_flight: int = 0
    client_disconnects: int = 0
    """Requests whose client went away before the response finished."""
    dropped_streams: int = 0
    """Streams cut by the `drop_mid_stream_after` fault."""
    reset_heads: int = 0
    """Requests answered with part of a head and a TCP reset by the `reset_head` fault."""
    busy_rejections: int = 0
    """Requests answered 503 because the load queue was full."""
    loads: int = 0
    """Model loads started."""
    unloads: int = 0
    """Models unloaded, for any reason (evictions too)."""
    evictions: int = 0
    """Idle models unloaded to make room in `vram_bytes` for a load."""
    cache_hits: int = 0
    """Requests that reused a slot's cached prompt prefix (at least one whole message)."""
    cached_prompt_tokens: int = 0
    """Prompt tokens not evaluated because a slot's cache held them."""
    evaluated_prompt_tokens: int = 0
    """Prompt tokens evaluated (the uncached part); the last three move only while prompts are
    cached (`vram_bytes` or `prompt_tokens_per_second` set)."""
    pulls: int = 0
    """Pulls that finished with `success`."""
    pull_failures: int = 0
    creates: int = 0
    """Creates that finished with `success`."""
    create_failures: int = 0
    pushes: int = 0
    """Pushes that finished with `success`."""
    push_failures: int = 0
    blob_uploads: int = 0
    """Blob uploads stored (201)."""
    tokens: int = 0
    """Tokens streamed or returned by generate, chat and the OpenAI routes."""

    def started(self, path: str) -> None:
        """Count an API request entering the server."""
        self.requests[path] = self.requests.get(path, 0) + 1
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def finished(self, status: int | None) -> None:
        """Count an API request leaving the server; `None` when it ended without a response."""
        self.in_flight -= 1
        if status is not None:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def reset(self) -> None:
        """Zero everything except the live `in_flight` gauge."""
        in_flight = self.in_flight
        fresh = Counters()
        for field in attrs.fields(Counters):
            setattr(self, field.name, getattr(fresh, field.name))
        self.in_flight = in_flight
        self.peak_in_flight = in_flight

    def as_json(self) -> dict[str, Any]:
        """The counters as a JSON-able dict (status keys become strings)."""
        data = attrs.asdict(self)
        data["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        return data
