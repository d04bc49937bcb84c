"""Which class a client request belongs to, from its path alone."""

from __future__ import annotations

from enum import Enum


class RequestClass(Enum):
    EMBEDDINGS = "embeddings"
    COMPLETIONS = "completions"
    OTHER = "other"


_BY_PATH = {
    b"/api/embed": RequestClass.EMBEDDINGS,
    b"/api/embeddings": RequestClass.EMBEDDINGS,
    b"/v1/embeddings": RequestClass.EMBEDDINGS,
    b"/api/generate": RequestClass.COMPLETIONS,
    b"/api/chat": RequestClass.COMPLETIONS,
    b"/v1/completions": RequestClass.COMPLETIONS,
    b"/v1/chat/completions": RequestClass.COMPLETIONS,
    b"/v1/responses": RequestClass.COMPLETIONS,
    b"/v1/messages": RequestClass.COMPLETIONS,
}

#: Paths whose streams have long silent gaps (registry round trips, hashing gigabytes).
MODEL_TRANSFER_PATHS = frozenset({b"/api/pull", b"/api/push", b"/api/create"})

#: Requests that change which models the fleet holds (a frontend's AllowModelManagement).
_MANAGING_MODELS = frozenset(
    {b"/api/pull", b"/api/delete", b"/api/copy", b"/api/create", b"/api/push"}
)
_BLOBS = b"/api/blobs/"


def classify(path: bytes) -> RequestClass:
    return _BY_PATH.get(path.rstrip(b"/") or b"/", RequestClass.OTHER)


def manages_models(method: bytes, path: bytes) -> bool:
    """Pull, delete, copy, create, push, and blob uploads (a blob's HEAD only asks)."""
    path = path.rstrip(b"/")
    return path in _MANAGING_MODELS or (path.startswith(_BLOBS) and method != b"HEAD")


_GET = (b"GET", b"HEAD")
_POST = (b"POST",)
#: The methods Ollama serves on each of its routes (HEAD wherever GET is); any other method on
#: them is answered 405 by Ollama, and by the gateway without asking a backend.
_METHODS: dict[bytes, tuple[bytes, ...]] = {
    b"/api/version": _GET,
    b"/api/tags": _GET,
    b"/api/ps": _GET,
    b"/api/status": _GET,
    b"/api/delete": (b"DELETE",),
    b"/v1/models": _GET,
    **{
        path: _POST
        for path in (
            *_BY_PATH,
            b"/api/pull",
            b"/api/push",
            b"/api/create",
            b"/api/copy",
            b"/api/show",
            b"/api/me",
            b"/api/signout",
            b"/v1/audio/transcriptions",
        )
    },
}
_BLOB_METHODS = (b"HEAD", b"POST")
_MODEL_PREFIX = b"/v1/models/"


def allowed_methods(path: bytes) -> tuple[bytes, ...] | None:
    """The methods Ollama answers on ``path``; None for a path it does not route (left to the
    backend to answer)."""
    path = path.rstrip(b"/") or b"/"
    found = _METHODS.get(path)
    if found is not None:
        return found
    if path.startswith(_BLOBS):
        return _BLOB_METHODS
    if path.startswith(_MODEL_PREFIX):
        return _GET
    return None
