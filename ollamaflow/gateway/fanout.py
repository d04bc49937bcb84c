"""Model management across a frontend: a client's delete (and pull) reaches every healthy
backend, and the frontend's RequiredModels follows, so boxes that join later agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from ollamaflow import modelnames
from ollamaflow.catalog import Registry
from ollamaflow.gateway import headers as hdrs
from ollamaflow.records import Backend, Frontend


def forwarded_headers(request: Request, backend: Backend) -> Headers:
    return hdrs.to_backend(
        request.requestHeaders,
        backend,
        client_ip=str(request.getClientAddress().host),
        host=request.getHeader(b"host"),
        proto=b"https" if request.isSecure() else b"http",
    )


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


@attrs.frozen
class Outcome:
    backend: Backend
    status: int | None
    error: str


async def delete_everywhere(
    http: HTTPClient,
    request: Request,
    backends: Sequence[Backend],
    body: bytes,
    seconds: float | None,
) -> list[Outcome]:
    """``DELETE /api/delete`` on every backend at once (``seconds``: a timeout, None for none);
    one outcome each, never raises."""

    async def one(backend: Backend) -> Outcome:
        try:
            response = await http.request(
                "DELETE",
                backend.base_url + "/api/delete",
                headers=forwarded_headers(request, backend),
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
