"""The backend client: one request sent on a pooled connection, its outcome told once.

Twisted's ``HTTPConnectionPool`` + ``HTTP11ClientProtocol`` stack costs a third of the gateway's
CPU on small requests (a parser per request, a transport proxy, a dozen Deferreds). Here a
request is one ``transport.write`` on a pooled connection, and its outcome goes to one of two
callables (no Deferred on the hot path). A request sent on a reused connection that the server
had already closed (nothing at all came back) is sent once more on a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from functools import partial
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from ollamaflow.upstream.connection import Connection
from ollamaflow.upstream.contracts import (
    Address,
    Body,
    Fields,
    OnFailure,
    Where,
)
from ollamaflow.upstream.dial import Dialler, Dialling, TCPDialler
from ollamaflow.upstream.pool import ConnectionPool
from ollamaflow.upstream.request import Message
from ollamaflow.upstream.response import UpstreamResponse


class BackendClient:
    """Sends requests to backends on pooled connections (an
    :class:`~ollamaflow.upstream.contracts.UpstreamClient`); ``dialler`` opens the fresh ones
    (by default over TCP, each dial bounded by ``connect_timeout``)."""

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float,
        max_idle_per_backend: int = 1024,
        idle_seconds: float = 120.0,
        dialler: Dialler | None = None,
    ) -> None:
        self.pool: ConnectionPool[Connection] = ConnectionPool(
            reactor, max_idle_per_backend, idle_seconds
        )
        self.dialler: Dialler = dialler or TCPDialler(reactor, connect_timeout)

    def send(
        self,
        backend: Address,
        method: bytes,
        target: bytes,
        fields: Fields,
        body: Body,
        on_response: Callable[[UpstreamResponse], object],
        on_failure: OnFailure,
    ) -> Outcome:
        """Send a request to ``backend`` on a pooled connection (or a fresh one): the response
        head goes to ``on_response``, a failure to ``on_failure``. ``target`` is the path and
        query; ``fields`` must carry ``Host``; ``body`` is the whole body as bytes (sent with
        the head in one write), a producer, or None. Raises ValueError at once for an invalid
        method or target. (``on_response`` may take any of the response's types: the
        contract's ``BackendResponse``, or Twisted's ``IResponse``.)"""
        outcome = Outcome(on_response, on_failure)
        where = (backend.hostname, backend.port, backend.ssl)
        call = Call(self, where, Message(method, target, fields, body), outcome)
        outcome.call = call
        connection = self.pool.take(where)
        if connection is None:
            self.dial(call)
        else:
            call.conn = connection
            connection.send(call, reused=True)
        return outcome

    def dial(self, call: Call) -> None:
        """Open a fresh connection for ``call``."""
        where = call.where
        self.pool.dialled(where)
        call.dialling = self.dialler.dial(
            where, partial(Connection, self.pool, where), call.connected, call.connect_failed
        )

    def forget(self, keep: Set[Where]) -> None:
        """Drop the idle connections (and dial state) of backends that are gone."""
        self.pool.forget(keep)
        self.dialler.forget(keep)

    async def close(self) -> None:
        """Close every idle connection and wait until they are closed."""
        await self.pool.close()


class Outcome:
    """A request sent with :meth:`BackendClient.send` (an
    :class:`~ollamaflow.upstream.contracts.Attempt`): the outcome goes to one of two
    callables, once. :meth:`cancel` aborts it before the response head; ``on_failure`` then
    gets ``CancelledError``."""

    __slots__ = ("_on_failure", "_on_response", "call", "fired")

    def __init__(
        self, on_response: Callable[[UpstreamResponse], object], on_failure: OnFailure
    ) -> None:
        self._on_response = on_response
        self._on_failure = on_failure
        self.call: Call | None = None
        self.fired = False

    def callback(self, response: UpstreamResponse) -> None:
        if not self.fired:
            on_response = self._on_response
            self._fire()
            on_response(response)

    def errback(self, failure: Failure) -> None:
        if not self.fired:
            on_failure = self._on_failure
            self._fire()
            on_failure(failure)

    def _fire(self) -> None:
        """Fired once: let go of the request and the callables (which usually hold whoever
        holds this Outcome), so it is all freed without the garbage collector."""
        self.fired = True
        self.call = None
        self._on_response = self._on_failure = _fired

    def cancel(self) -> None:
        if self.fired:
            return
        if self.call is not None:
            self.call.cancel()
        self.errback(Failure(CancelledError()))


def _fired(outcome: object) -> None:
    """What a fired :class:`Outcome` calls instead of its callables (never called)."""


class Call:
    """One request on its way: its message, its outcome, and where it is (dialling, or on a
    connection until the response head)."""

    __slots__ = (
        "cancelled",
        "client",
        "conn",
        "dialling",
        "message",
        "outcome",
        "where",
    )

    def __init__(
        self, client: BackendClient, where: Where, message: Message, outcome: Outcome
    ) -> None:
        self.client = client
        self.where = where
        self.message = message
        self.outcome = outcome
        self.conn: Connection | None = None
        self.dialling: Dialling | None = None
        self.cancelled = False

    def connected(self, connection: Connection) -> None:
        self.dialling = None
        if self.cancelled:
            connection.close()
            return
        self.conn = connection
        connection.send(self, reused=False)

    def connect_failed(self, failure: Failure) -> None:
        self.dialling = None
        if not self.cancelled:
            self.outcome.errback(failure)

    def cancel(self) -> None:
        """Abort before the response head: the connection is not reused."""
        self.cancelled = True
        if self.dialling is not None:
            self.dialling.cancel()
            self.dialling = None
        elif self.conn is not None:
            self.conn.abort_request(self)

    def try_again(self) -> bool:
        """Dial again (once: a fresh connection is never "reused", so it never asks) if the
        request was not cancelled and its body is in memory."""
        if self.cancelled or not self.message.replayable:
            return False
        self.conn = None
        self.client.dial(self)
        return True
