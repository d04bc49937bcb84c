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


def classify(path: bytes) -> RequestClass:
    return _BY_PATH.get(path.rstrip(b"/") or b"/", RequestClass.OTHER)
