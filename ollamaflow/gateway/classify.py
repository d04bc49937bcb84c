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
