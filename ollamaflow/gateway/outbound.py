"""What a backend is sent for a forwarded request: the request target and the body.

Plain functions of the request, the routing decision and the backend chosen: each attempt asks
them again, because each backend may pin other properties and add its own query.
"""

from __future__ import annotations

from typing import IO, Protocol

from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer

from ollamaflow import jsonlimits
from ollamaflow.gateway.classify import RequestClass
from ollamaflow.gateway.completed import LOGGED_BODY_BYTES, logged_text
from ollamaflow.gateway.pinning import deep_merge
from ollamaflow.gateway.requestdoc import body_size
from ollamaflow.gateway.routing import Forward, frontend_pins
from ollamaflow.records import Backend

#: Bodies up to this size are replayed from memory on a retry; larger ones from the spool file.
IN_MEMORY_BODY = 1 << 20
#: Methods whose empty body is no body at all.
_BODILESS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})


class OutboundRequest(Protocol):
    """What is read of the client's request to build the backend's."""

    @property
    def method(self) -> bytes: ...

    @property
    def path(self) -> bytes: ...

    @property
    def uri(self) -> bytes: ...

    @property
    def content(self) -> IO[bytes] | None: ...


def target_for(request: OutboundRequest, backend: Backend) -> bytes:
    """The path and query the backend gets: the client's query, then the backend's own."""
    query = request.uri.partition(b"?")[2]
    if backend.querystring:
        extra = backend.querystring.encode()
        query = query + b"&" + extra if query else extra
    return request.path + b"?" + query if query else request.path


def body_for(
    request: OutboundRequest, forward: Forward, backend: Backend
) -> bytes | IBodyProducer | None:
    """The body to send: bytes when it is in memory (sent with the head in one write). A JSON
    body the gateway read is sent as read, with the frontend's pins (already in it) and the
    backend's merged; any other body as the client sent it."""
    document = forward.document
    request_class = forward.request_class
    if document is not None and request_class is not RequestClass.OTHER:
        pinned = (
            backend.pinned_embeddings_properties
            if request_class is RequestClass.EMBEDDINGS
            else backend.pinned_completions_properties
        )
        if forward.keep_alive is not None:
            document = {**document, "keep_alive": forward.keep_alive}
        if pinned:
            return jsonlimits.dumps(deep_merge(document, pinned))
        if forward.keep_alive is not None or frontend_pins(forward.frontend, request_class):
            return jsonlimits.dumps(document)
    content = request.content
    if content is None:
        return None
    size = body_size(content)
    if size == 0 and request.method in _BODILESS:
        return None
    if size <= IN_MEMORY_BODY:
        return content.read()
    return FileBodyProducer(content)


def logged_body(request: OutboundRequest) -> str | None:
    """The start of the client's body as text, for ``LogRequestBody``."""
    content = request.content
    if content is None:
        return None
    content.seek(0)
    raw = content.read(LOGGED_BODY_BYTES)
    size = content.seek(0, 2)
    content.seek(0)
    return logged_text(raw, size)
