"""Model management across a frontend: a client's delete (and pull) reaches every healthy
backend, and the frontend's RequiredModels follows, so boxes that join later agree.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.python.failure import Failure

from ollamaflow import modelnames
from ollamaflow.catalog import Registry
from ollamaflow.credentials import Tokens
from ollamaflow.gateway import headers as hdrs
from ollamaflow.gateway.dialect import finish_json
from ollamaflow.records import Backend, Frontend
from ollamaflow.server.request import ClientRequest
from ollamaflow.services.pull import PullProgress


async def with_required(registry: Registry, frontend: Frontend, model: str, keep: bool) -> None:
    """Add ``model`` to (or drop it from) the frontend's RequiredModels, persisted."""
    current = registry.catalog.frontends.get(frontend.identifier, frontend)
    listed = [m for m in current.required_models if modelnames.same_model(m, model)]
    if keep and not listed:
        models = (*current.required_models, model)
    elif not keep and listed:
        models = tuple(m for m in current.required_models if m not in listed)
    else:
        return
    await registry.replace_frontend(attrs.evolve(current, required_models=models))


class Puller(Protocol):
    """Starts (or joins) a pull of a model on a backend; fires when the backend has it."""

    def ensure(
        self,
        backend_id: str,
        model: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Deferred[None]: ...


@attrs.define
class MergedPull:
    """One pull on several backends, reported to the client as one Ollama pull: progress lines
    with ``total``/``completed`` summed over backends, then ``success`` only if all succeeded,
    else an ``error`` line naming the backends that failed."""

    request: ClientRequest
    model: str
    backends: Sequence[Backend]
    stream: bool
    progress: dict[str, PullProgress] = attrs.field(factory=dict)
    _last: tuple[int, int] = (-1, -1)

    async def run(self, puller: Puller) -> None:
        request = self.request
        if self.stream:
            request.setHeader(b"Content-Type", b"application/x-ndjson")
            self._line({"status": "pulling manifest"})
        pulls = []
        for backend in self.backends:
            self.progress[backend.identifier] = PullProgress()
            pulls.append(
                puller.ensure(
                    backend.identifier,
                    self.model,
                    on_progress=functools.partial(self._progressed, backend.identifier),
                )
            )

        def client_left(_: Failure) -> None:
            for pending in pulls:
                pending.cancel()

        request.watch(lambda: None, client_left)
        results = await DeferredList(pulls, consumeErrors=True)
        if request.disconnected or request.finished:
            return
        failed = [
            f"{backend.identifier}: {_reason(result)}"
            for backend, (ok, result) in zip(self.backends, results, strict=True)
            if not ok
        ]
        if not failed:
            self._finish({"status": "success"}, 200)
        else:
            self._finish({"error": f"pull of '{self.model}' failed on {'; '.join(failed)}"}, 500)

    def _progressed(self, backend_id: str, message: dict[str, Any]) -> None:
        self.progress[backend_id].update(message)
        if not self.stream or self.request.disconnected:
            return
        total = sum(p.total for p in self.progress.values())
        completed = sum(p.completed for p in self.progress.values())
        if total and (completed, total) != self._last:
            self._last = (completed, total)
            line: dict[str, Any] = {"status": f"pulling {self.model}", "total": total}
            if completed:
                line["completed"] = completed
            self._line(line)

    def _line(self, message: dict[str, Any]) -> None:
        self.request.write(json.dumps(message).encode() + b"\n")

    def _finish(self, message: dict[str, Any], status: int) -> None:
        if self.stream:
            self._line(message)
            self.request.finish()
        else:
            finish_json(self.request, status, message)


def _reason(failure: Any) -> str:
    value = getattr(failure, "value", failure)
    return str(value) or type(value).__name__


@attrs.frozen
class Outcome:
    backend: Backend
    status: int | None
    error: str


async def delete_everywhere(
    http: HTTPClient,
    request: ClientRequest,
    backends: Sequence[Backend],
    body: bytes,
    seconds: float | None,
    withheld: Tokens | None = None,
) -> list[Outcome]:
    """``DELETE /api/delete`` on every backend at once (``seconds``: a timeout, None for none);
    one outcome each, never raises. ``withheld``: tokens of ours never passed on."""

    async def one(backend: Backend) -> Outcome:
        try:
            response = await http.request(
                "DELETE",
                backend.base_url + "/api/delete",
                headers=hdrs.as_headers(hdrs.forwarded(request, backend, withheld)),
                data=body,
                timeout=seconds,
            )
            text = await response.text()
        except Exception as e:
            return Outcome(backend, None, str(e) or type(e).__name__)
        error = ""
        if response.code != 200:
            try:
                error = str(json.loads(text).get("error", text))
            except (ValueError, AttributeError):
                error = text[:200]
        return Outcome(backend, response.code, error)

    return await gatherResults([Deferred.fromCoroutine(one(b)) for b in backends])


def summarize_delete(model: str, outcomes: Sequence[Outcome]) -> tuple[int, dict[str, Any] | None]:
    """Ollama's answer for a fleet delete: 200 empty if nothing failed and someone had it."""
    failed = [o for o in outcomes if o.status not in (200, 404)]
    if failed:
        names = "; ".join(f"{o.backend.identifier}: {o.error}" for o in failed)
        return 502, {"error": f"delete of '{model}' failed on {names}"}
    if not any(o.status == 200 for o in outcomes):
        return 404, {"error": f"model '{model}' not found"}
    return 200, None
