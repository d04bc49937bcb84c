"""What an exchange works with, handed to it by whoever runs it: the gateway in the daemon, a
clock and fakes in the tests. Nothing here is looked up from a global or built inside."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import attrs
from twisted.internet.interfaces import IReactorTime

from ollamaflow.credentials import Tokens
from ollamaflow.gateway.balancer import StickyPins
from ollamaflow.gateway.completed import Completed
from ollamaflow.gateway.deadlines import Deadlines
from ollamaflow.gateway.routing import Forward
from ollamaflow.gateway.scheduler import Scheduler
from ollamaflow.ratelimits.contracts import Limits
from ollamaflow.records import Backend
from ollamaflow.runtime import FailureKind, Runtime
from ollamaflow.upstream.contracts import UpstreamClient


class Running(Protocol):
    """A request being forwarded, as the daemon's drain and the tests see it."""

    #: Response body bytes relayed to the client so far.
    relayed: int

    def abort(self) -> None:
        """Give up on it now."""


def settle_nothing(key_id: str, limits: Limits, lease: str, tokens: int) -> None:
    """Without a limiter, a request's end counts nothing."""


@attrs.frozen
class ExchangeContext:
    """The clock, the slots, the backend client and the callbacks an exchange uses."""

    clock: IReactorTime
    scheduler: Scheduler
    upstream: UpstreamClient
    #: Each attempt's wait for its response head (the frontend's TimeoutMs).
    deadlines: Deadlines
    runtime: Runtime
    pins: StickyPins
    #: A request's candidates as they are now (health and inventories change meanwhile).
    candidates_now: Callable[[Forward], Sequence[Backend]]
    new_id: Callable[[], str]
    #: Told about every finished request (the access log, the metrics); empty: no bookkeeping.
    observers: list[Callable[[Completed], None]]
    report: Callable[[Completed], None]
    #: A backend failed a request (passive health): (backend, reason, kind).
    backend_failed: Callable[[Backend, str, FailureKind], None]
    #: A backend answered a request in full: (forward, backend, streamed).
    answered: Callable[[Forward, Backend, bool], None]
    #: Tokens of ours that never reach a backend (admin, metrics).
    withheld: Tokens
    #: The configured backends, for redacting their secrets from a logged request head.
    configured: Callable[[], Mapping[str, Backend]]
    #: The exchanges running now (for draining, metrics and tests).
    running: set[Running] = attrs.field(factory=set)
    #: A request with an API key's limits ended: the limiter's ``finish`` (the key, its
    #: limits, its lease, the tokens the backend reported).
    settle: Callable[[str, Limits, str, int], None] = settle_nothing
    #: An attempt is about to be sent to a backend whose slot it holds: (forward, backend).
    sending: Callable[[Forward, Backend], None] = lambda forward, backend: None
