"""The admin routes of API keys: create (the secret is shown once), read, replace, rotate,
delete, and what a key used, hour by hour.

Registered on the admin API's one Klein app (:data:`~ollamaflow.admin.routing.routes`), so its
bearer token check and error answers apply; :class:`AdminApi` takes them in as a base class.
Neither a secret nor its hash is ever in a listing, a read or a log line.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from ollamaflow.admin.errors import ApiError
from ollamaflow.admin.routing import answer, parsed, query_values, read_json, routes
from ollamaflow.apikeys import hash_secret, new_secret, shown
from ollamaflow.catalog import Registry
from ollamaflow.fielderrors import FieldError
from ollamaflow.fieldkinds import Timestamp
from ollamaflow.jsonfields import to_wire
from ollamaflow.records import RESERVED_KEY_IDENTIFIERS, ApiKey, UsageRow
from ollamaflow.store import hour_start
from ollamaflow.utctime import format_utc

#: A key's usage from the hour containing a time, at most so many rows, by hour then model:
#: its stored rows with the counts not written yet (the daemon's usage ledger).
UsageSource = Callable[[str, datetime, int], Deferred[list[UsageRow]]]

#: Usage rows in one answer, at most; ``"Truncated": true`` says there were more.
MAX_USAGE_ROWS = 10_000
#: How far back usage goes unless ``since`` says.
DEFAULT_USAGE_SPAN = timedelta(hours=24)
_TIME = Timestamp()


class ApiKeyRoutes:
    """The ``/v1.0/apikeys`` routes, a base of :class:`~ollamaflow.admin.app.AdminApi`."""

    __slots__ = ()

    # What AdminApi provides.
    registry: Registry
    now: Callable[[], datetime]
    usage_of: UsageSource

    app = routes

    @app.route("/v1.0/apikeys", methods=["GET"])
    def list_api_keys(self, request: IRequest) -> bytes:
        return answer(request, [to_wire(key) for key in self.registry.catalog.api_keys.values()])

    @app.route("/v1.0/apikeys", methods=["PUT", "POST"])
    async def create_api_key(self, request: IRequest) -> bytes:
        """Identifier optional (``key-`` and 12 hex digits when absent); the answer carries
        the secret, ``Key``, which is never shown again."""
        data = read_json(request)
        generated: str | None = None
        if isinstance(data, dict) and all(
            v is None for k, v in data.items() if k.lower() == "identifier"
        ):
            generated = f"key-{secrets.token_hex(6)}"
        key = parsed(ApiKey, data, generated)  # a reserved Identifier is the store's 400
        secret = new_secret()
        key = attrs.evolve(key, secret_hash=hash_secret(secret), key_prefix=shown(secret))
        stored = await self.registry.create_api_key(key)
        return _with_key(request, stored, secret, 201)

    @app.route("/v1.0/apikeys/<string:identifier>", methods=["GET"])
    def get_api_key(self, request: IRequest, identifier: str) -> bytes:
        return answer(request, to_wire(self._api_key(identifier)))

    @app.route("/v1.0/apikeys/<string:identifier>", methods=["PUT"])
    async def replace_api_key(self, request: IRequest, identifier: str) -> bytes:
        """A full replace of the fields; the secret stays (rotate changes it)."""
        stored = await self.registry.replace_api_key(parsed(ApiKey, read_json(request), identifier))
        return answer(request, to_wire(stored))

    @app.route("/v1.0/apikeys/<string:identifier>", methods=["DELETE"])
    async def delete_api_key(self, request: IRequest, identifier: str) -> bytes:
        """The key and its usage."""
        await self.registry.delete_api_key(identifier)
        request.setResponseCode(204)
        return b""

    @app.route("/v1.0/apikeys/<string:identifier>/rotate", methods=["POST"])
    async def rotate_api_key(self, request: IRequest, identifier: str) -> bytes:
        """A new secret for the same key: the old one stops working at once."""
        secret = new_secret()
        stored = await self.registry.rotate_api_key(identifier, hash_secret(secret), shown(secret))
        return _with_key(request, stored, secret)

    @app.route("/v1.0/apikeys/<string:identifier>/usage", methods=["GET"])
    async def api_key_usage(self, request: IRequest, identifier: str) -> bytes:
        """Hour by hour and model by model, from the hour containing ``since`` (an ISO 8601
        time; default 24 hours ago). "anonymous" and "admin" are requests without a key."""
        if identifier not in RESERVED_KEY_IDENTIFIERS:
            self._api_key(identifier)
        since = hour_start(_since(request, self.now()))
        rows = await self.usage_of(identifier, since, MAX_USAGE_ROWS + 1)
        kept = rows[:MAX_USAGE_ROWS]
        out: dict[str, Any] = {
            "Identifier": identifier,
            "SinceUtc": format_utc(since),
            "Usage": [_usage_wire(row) for row in kept],
            "Totals": {
                "Requests": sum(r.requests for r in kept),
                "Errors": sum(r.errors for r in kept),
                "PromptTokens": sum(r.prompt_tokens for r in kept),
                "CompletionTokens": sum(r.completion_tokens for r in kept),
            },
        }
        if len(rows) > MAX_USAGE_ROWS:
            out["Truncated"] = True
        return answer(request, out)

    def _api_key(self, identifier: str) -> ApiKey:
        found = self.registry.catalog.api_keys.get(identifier)
        if found is None:
            raise ApiError(404, f"API key {identifier!r} does not exist")
        return found


def _with_key(request: IRequest, key: ApiKey, secret: str, status: int = 200) -> bytes:
    """The record and its secret: the one answer that shows it, kept out of every cache."""
    request.setHeader(b"Cache-Control", b"no-store")
    return answer(request, {**to_wire(key), "Key": secret}, status)


def _since(request: IRequest, now: datetime) -> datetime:
    """The ``since`` query parameter (without an offset: UTC), or 24 hours before ``now``."""
    values = query_values(request, b"since")
    if not values:
        return now - DEFAULT_USAGE_SPAN
    try:
        return _TIME.parse(values[-1].decode("utf-8", "replace"), "since", [])
    except FieldError as e:
        raise ApiError(
            400, "query parameter since: expected an ISO 8601 time such as 2025-01-02T03:00:00Z"
        ) from e


def _usage_wire(row: UsageRow) -> dict[str, object]:
    return {
        "HourUtc": format_utc(row.hour),
        "Model": row.model,
        "Requests": row.requests,
        "Errors": row.errors,
        "PromptTokens": row.prompt_tokens,
        "CompletionTokens": row.completion_tokens,
    }
