"""What a bug becomes once a request is being answered: the one place that decides it."""

from __future__ import annotations

from ollamaflow.server.interfaces import ResponseWriter


def fail(request: ResponseWriter, body: bytes) -> None:
    """Answer ``request`` after a bug: nothing if its response is finished or its client gone;
    an abort if the status line went out (a response cut short must not look whole); else a
    JSON 500 with ``body``."""
    if request.finished or request.disconnected:
        return
    if request.started:
        request.abort_connection()
        return
    request.setResponseCode(500)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()
