"""Model operations in memory: the order in which a fleet-wide pull tells the client and the
configuration, with fake pulls, a fake store and a fake client request."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
from fakerequest import Request
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from ollamaflow.catalog import Registry
from ollamaflow.credentials import NO_TOKENS
from ollamaflow.gateway.modelops import ModelOperations
from ollamaflow.records import Backend, Frontend


@attrs.define
class Pulls:
    """Pulls a test finishes by hand, one per backend."""

    running: dict[str, list[Deferred[None]]] = attrs.field(factory=dict)

    def ensure(
        self,
        backend_id: str,
        model: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Deferred[None]:
        joined: Deferred[None] = Deferred()
        self.running.setdefault(backend_id, []).append(joined)
        return joined

    def done(self, backend_id: str) -> None:
        for joined in self.running.pop(backend_id):
            joined.callback(None)


@attrs.define
class Catalog:
    frontends: dict[str, Frontend]


@attrs.define
class Store:
    """The registry's frontend writes, each finished when the test says so."""

    catalog: Catalog
    writes: list[tuple[Frontend, Deferred[None]]] = attrs.field(factory=list)

    def replace_frontend(self, frontend: Frontend) -> Deferred[None]:
        written: Deferred[None] = Deferred()
        self.writes.append((frontend, written))
        return written


@attrs.define
class Answers:
    def refuse(self, request: Any, frontend: Any, status: int, message: str, **_: Any) -> bytes:
        raise AssertionError(f"refused {status}: {message}")

    def answering(
        self, request: Any, frontend: Any, model: Any, backends: Sequence[Backend], size: int = 0
    ) -> str:
        return "id"


def test_a_pull_says_success_only_once_the_model_is_required() -> None:
    """A client that reads the frontend right after ``success`` finds the model required."""
    frontend = Frontend(identifier="f", backends=("a", "b"))
    store = Store(Catalog({"f": frontend}))
    pulls = Pulls()
    operations = ModelOperations(
        registry=cast(Registry, store),
        http=cast(Any, None),
        answers=Answers(),
        clock=Clock(),
        withheld=NO_TOKENS,
        sync=pulls,
        refresh=lambda _: succeed(None),
    )
    request = Request(path=b"/api/pull", uri=b"/api/pull", body=b'{"model": "mistral"}')
    backends = [Backend(identifier="a"), Backend(identifier="b")]
    operations.pull(cast(Any, request), frontend, backends)

    pulls.done("a")
    pulls.done("b")
    assert [f.required_models for f, _ in store.writes] == [("mistral",)]
    assert not request.finished, "success before RequiredModels is written"
    store.writes[0][1].callback(None)
    assert request.finished
    assert json.loads(request.body_out.splitlines()[-1]) == {"status": "success"}
