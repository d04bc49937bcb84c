"""What every background request to a backend shares: its URL, its credentials, reading or
draining a response body, and one-line descriptions of failures for logs and the admin API.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ollamaflow.records import Backend
from ollamaflow.twisted_internals import CLIENT_FAILURES, REQUEST_NOT_SENT

#: Bodies we parse (tags, ps, error answers) larger than this are refused, not buffered.
MAX_BODY = 16 << 20


class BodyTooLarge(Exception):
    """A response body we meant to parse exceeded :data:`MAX_BODY`."""


#: Failures that are a backend's doing (refused, reset, cut short), not a bug of ours: logged
#: without a traceback.
NETWORK_ERRORS: tuple[type[Exception], ...] = (
    ConnectError,
    ConnectionClosed,
    *CLIENT_FAILURES,
    REQUEST_NOT_SENT,
    BodyTooLarge,
)


def backend_url(backend: Backend, path: str) -> str:
    """``base_url + path``, with the backend's Querystring appended (merged with any query)."""
    url = backend.base_url + path
    if backend.querystring:
        url += ("&" if "?" in path else "?") + backend.querystring
    return url


def backend_headers(backend: Backend, *, json_body: bool = False) -> Headers:
    """The backend's credentials: its BearerToken, then its Headers (which win on a clash,
    as in the proxy)."""
    headers = Headers()
    if json_body:
        headers.setRawHeaders(b"Content-Type", [b"application/json"])
    if backend.bearer_token:
        headers.setRawHeaders(b"Authorization", [b"Bearer " + backend.bearer_token.encode()])
    for name, value in backend.headers.items():
        headers.setRawHeaders(name.encode(), [value.encode()])
    return headers


def describe(error: BaseException | Failure) -> str:
    """A failure in one line, naming every reason of a wrapped client error."""
    value = error.value if isinstance(error, Failure) else error
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(describe(r) for r in reasons)
    if isinstance(value, defer.TimeoutError):
        return "timed out"
    text = str(value) or type(value).__name__
    return text.splitlines()[0]


class _Reader(Protocol):
    """Collects a body to its end (or, with ``keep=False``, discards it)."""

    def __init__(self, keep: bool, limit: int) -> None:
        self.keep = keep
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _d: Deferred[bytes]) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self.keep or self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.chunks = []
            self.done.errback(BodyTooLarge(f"response body larger than {self.limit} bytes"))
            self._cancel(self.done)
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: IResponse | Any, *, limit: int = MAX_BODY) -> Deferred[bytes]:
    """The whole body (cancellable: cancelling closes the connection)."""
    reader = _Reader(True, limit)
    response.deliverBody(reader)
    return reader.done


def drain(response: IResponse | Any) -> Deferred[bytes]:
    """Read a body to its end and drop it, so the connection can be reused; fires with b""."""
    reader = _Reader(False, 0)
    response.deliverBody(reader)
    return reader.done
