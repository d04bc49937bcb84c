"""What the gateway may rely on from the upstream layer, and the least it must give it.

The gateway holds a :class:`UpstreamClient` (a :class:`~ollamaflow.upstream.client.BackendClient`
in the daemon, a fake in the gateway's own tests), sends each request with it and gets an
:class:`Attempt` back; the answer is a :class:`BackendResponse` whose body it reads through a
Twisted protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from typing import Protocol, TypeAlias

from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

#: Where a backend listens: host, port, and whether it speaks TLS (the pool's key).
Where: TypeAlias = tuple[str, int, bool]
#: Request header fields: (name, value) pairs, in order, as the gateway builds them.
Fields: TypeAlias = Sequence[tuple[bytes, bytes]]
#: A request body: all of it in memory, a producer streaming it, or none.
Body: TypeAlias = "bytes | IBodyProducer | None"


class Address(Protocol):
    """A backend as far as this layer cares (``ollamaflow.records.Backend`` is one)."""

    @property
    def hostname(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def ssl(self) -> bool: ...


class BackendResponse(Protocol):
    """A backend's final response head, its body still to be read.

    ``headers`` lacks the hop-by-hop fields and ``Content-Length`` (except in an answer to
    HEAD); ``length`` is the body's size, or ``twisted.web.iweb.UNKNOWN_LENGTH``.
    ``deliverBody(protocol)`` connects a protocol to the body, once: it gets the bytes in
    ``dataReceived``, then ``connectionLost`` with ``ResponseDone`` (complete),
    ``PotentialDataLoss`` (ended by a close, as HTTP/1.0 allows) or ``ResponseFailed``; its
    transport is an ``IPushProducer`` to pause, resume or stop (abort) the backend."""

    @property
    def version(self) -> tuple[bytes, int, int]: ...

    @property
    def code(self) -> int: ...

    @property
    def phrase(self) -> bytes: ...

    @property
    def headers(self) -> Headers: ...

    @property
    def length(self) -> int | str: ...

    def deliverBody(self, protocol: IProtocol) -> None: ...


#: Told of the response head (once the read that brought it is parsed).
OnResponse: TypeAlias = Callable[[BackendResponse], object]
#: Told why no response head will come (``CancelledError`` after :meth:`Attempt.cancel`).
OnFailure: TypeAlias = Callable[[Failure], object]


class Attempt(Protocol):
    """One request sent: its outcome goes to exactly one of the two callables, once."""

    @property
    def fired(self) -> bool:
        """Whether the outcome was told already."""
        ...

    def cancel(self) -> None:
        """Abort before the response head (the connection is not reused); the failure
        callable then gets ``CancelledError``. Does nothing once fired."""


class UpstreamClient(Protocol):
    """Sends requests to backends on pooled connections."""

    def send(
        self,
        backend: Address,
        method: bytes,
        target: bytes,
        fields: Fields,
        body: Body,
        on_response: OnResponse,
        on_failure: OnFailure,
    ) -> Attempt:
        """Send a request: ``target`` is the path and query, ``fields`` must carry ``Host``.
        Raises ValueError at once for an invalid method or target; every other failure goes
        to ``on_failure``."""
        ...

    def forget(self, keep: Set[Where]) -> None:
        """Close the idle connections to backends not in ``keep`` (removed ones)."""

    async def close(self) -> None:
        """Close every idle connection, and wait until they are closed."""
