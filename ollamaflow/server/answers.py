"""What a handler's return value means for its request, in one place."""

from __future__ import annotations

from twisted.web.server import NOT_DONE_YET

from ollamaflow.server.interfaces import ClientRequest


def deliver(request: ClientRequest, answer: bytes | int) -> None:
    """Bytes are the whole response body (its Content-Length set unless the handler set one);
    ``NOT_DONE_YET`` means the handler finishes the request itself."""
    if answer is NOT_DONE_YET:
        return
    assert isinstance(answer, bytes)
    if request.responseHeader(b"content-length") is None:
        request.setHeader(b"Content-Length", b"%d" % len(answer))
    request.write(answer)
    request.finish()
