"""Helpers for end-to-end tests: a daemon built in-process on port 0, and a small admin client."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import reactor

from ollamaflow.daemon import Daemon
from ollamaflow.runtime import utc_clock
from ollamaflow.settings import load_settings
from ollamaflow.store import Store

TOKEN = "test-admin-token"


async def start_daemon(folder: Path, settings: Mapping[str, Any] | None = None) -> Daemon:
    """Write a settings file in ``folder``, open its SQLite store and serve on a free port."""
    path = folder / "ollamaflow.json"
    data = {"AdminBearerTokens": [TOKEN], "Logging": {"ConsoleLogging": False}}
    data.update(settings or {})
    path.write_text(json.dumps(data))
    loaded = load_settings(path)
    store = await Store.open_sqlite(
        str(loaded.database_path), reactor=reactor, now=utc_clock(reactor.seconds)
    )
    snapshot = await store.snapshot()
    daemon = Daemon(loaded=loaded, store=store, snapshot=snapshot, reactor=reactor, port=0)
    daemon.interface = "127.0.0.1"
    daemon.startService()
    return daemon


@attrs.frozen
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen
class Http:
    """Raw HTTP against a daemon: every call returns status, headers and the whole body."""

    base: str
    token: str | None = TOKEN

    @classmethod
    def to(cls, daemon: Daemon, token: str | None = TOKEN) -> Http:
        return cls(f"http://127.0.0.1:{daemon.address.port}", token)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        response = await treq.request(
            method, self.base + path, data=data, headers=sent, persistent=False
        )
        content = await response.content()
        return Reply(response.code, response.headers, content)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def put(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("PUT", path, body, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.request("DELETE", path, **kw)
