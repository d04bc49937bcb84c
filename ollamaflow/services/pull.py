"""One ``POST /api/pull`` to one backend, its NDJSON progress read to the ``success`` line.

Shared by model synchronization and the gateway's client-facing pull fan-out. Ollama goes
silent for long stretches during a pull (registry round trips, re-hashing after "verifying"),
so the only limit is an idle timeout, restarted by every byte received.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone

from ollamaflow.records import Backend
from ollamaflow.services.common import backend_headers, backend_url, describe, read_body

log = Logger()

#: A progress line longer than this is not Ollama talking.
MAX_LINE = 1 << 20
_ERROR_BODY_LIMIT = 64 << 10

ProgressCallback = Callable[[dict[str, Any]], None]


class PullError(Exception):
    """A pull that did not end in ``success``; ``str()`` is a one-line reason."""


class PullFailed(PullError):
    """The backend sent an ``{"error": ...}`` line (e.g. the model does not exist)."""


class PullHTTPError(PullError):
    """The backend answered the pull request with a non-2xx status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        self.status = status


class PullIdleTimeout(PullError):
    """Nothing arrived from the backend for the idle timeout."""


class PullStreamBroken(PullError):
    """The connection failed, or the stream ended (or turned to garbage) before ``success``."""


class PullUnavailable(PullError):
    """The backend cannot be pulled to: unknown, inactive, not Ollama-format, or shut down."""


@attrs.define
class PullProgress:
    """Progress of one pull as Ollama reports it: the last status and each layer's bytes."""

    status: str = "queued"
    layers: dict[str, tuple[int, int]] = attrs.field(factory=dict)

    def update(self, message: Mapping[str, Any]) -> None:
        """Fold one progress message in (latest completed/total per layer digest)."""
        status = message.get("status")
        if isinstance(status, str):
            self.status = status
        digest, total = message.get("digest"), _int(message.get("total"))
        if isinstance(digest, str) and total is not None:
            completed = _int(message.get("completed"))
            if completed is None:
                completed = self.layers.get(digest, (0, 0))[0]
            self.layers[digest] = (completed, total)

    @property
    def completed(self) -> int:
        return sum(done for done, _ in self.layers.values())

    @property
    def total(self) -> int:
        return sum(total for _, total in self.layers.values())

    def replay(self) -> list[dict[str, Any]]:
        """Messages that bring someone joining late up to date, in Ollama's shapes."""
        out: list[dict[str, Any]] = []
        for digest, (completed, total) in self.layers.items():
            message: dict[str, Any] = {
                "status": f"pulling {digest.removeprefix('sha256:')[:12]}",
                "digest": digest,
                "total": total,
            }
            if completed:
                message["completed"] = completed
            out.append(message)
        if not self.layers or not self.status.startswith("pulling "):
            starting = self.status in ("queued", "starting")
            out.append({"status": "pulling manifest" if starting else self.status})
        return out

    def to_wire(self) -> dict[str, Any]:
        return {"Status": self.status, "Completed": self.completed, "Total": self.total}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def pull(
    http: Any,
    backend: Backend,
    model: str,
    *,
    on_progress: ProgressCallback,
    idle_timeout: float,
    clock: IReactorTime,
) -> None:
    """Pull ``model`` on ``backend``, calling ``on_progress`` with every progress message.

    Returns on ``success``; raises a :class:`PullError` subclass otherwise. Cancelling the
    coroutine's Deferred closes the connection (and so stops the pull on the backend).
    """
    requested = http.request(
        "POST",
        backend_url(backend, "/api/pull"),
        headers=backend_headers(backend, json_body=True),
        data=json.dumps({"model": model, "stream": True}).encode(),
        unbuffered=True,
        allow_redirects=False,
    )
    requested.addTimeout(idle_timeout, clock)
    try:
        response = await requested
    except defer.TimeoutError:
        raise PullIdleTimeout(f"no answer within {idle_timeout:g}s") from None
    except CancelledError:
        raise
    except Exception as e:
        raise PullStreamBroken(describe(e)) from e
    if not 200 <= response.code < 300:
        raise PullHTTPError(response.code, await _error_message(response, idle_timeout, clock))
    reader = _ProgressReader(on_progress, idle_timeout, clock)
    response.deliverBody(reader)
    await reader.done


async def _error_message(response: Any, wait: float, clock: IReactorTime) -> str:
    """The ``error`` of an error answer's JSON body, else its first line; "" if unreadable."""
    try:
        body = await read_body(response, limit=_ERROR_BODY_LIMIT).addTimeout(wait, clock)
    except CancelledError:
        raise
    except Exception:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip().split("\n", 1)[0][:500]
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return cast(str, data["error"])
    return ""


class _ProgressReader(Protocol):
    """Splits the body into JSON lines and remembers whether ``success`` or ``error`` came."""

    def __init__(self, on_progress: ProgressCallback, idle: float, clock: IReactorTime) -> None:
        self.on_progress = on_progress
        self.idle = idle
        self.clock = clock
        self.buffer = b""
        self.error: str | None = None
        self.succeeded = False
        self.cancelled = False
        self.timer: IDelayedCall | None = None
        self.done: Deferred[None] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        self.timer = self.clock.callLater(self.idle, self._idle)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.idle)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self._line(line)
            if self.done.called:
                return
        if len(self.buffer) > MAX_LINE:
            self._fail(PullStreamBroken(f"pull progress line longer than {MAX_LINE} bytes"))

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            message = json.loads(line)
        except ValueError:
            self._fail(PullStreamBroken("pull progress is not JSON lines"))
            return
        if not isinstance(message, dict):
            return
        error = message.get("error")
        if error is not None:
            self.error = error if isinstance(error, str) else json.dumps(error)
        elif message.get("status") == "success":
            self.succeeded = True
        try:
            self.on_progress(message)
        except Exception:
            log.failure("pull progress callback failed")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self.done.called or self.cancelled:
            return
        if self.buffer:
            buffered, self.buffer = self.buffer, b""
            self._line(buffered)
            if self.done.called:
                return
        if self.error is not None:
            self.done.errback(PullFailed(self.error))
        elif self.succeeded:
            self.done.callback(None)
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.errback(PullStreamBroken("pull stream ended without success"))
        else:
            self.done.errback(PullStreamBroken(describe(reason)))

    def _idle(self) -> None:
        self.timer = None
        self._fail(PullIdleTimeout(f"no progress for {self.idle:g}s"))

    def _fail(self, error: PullError) -> None:
        self._stop_timer()
        if not self.done.called:
            self.done.errback(error)
        self._close()

    def _cancel(self, _d: Deferred[None]) -> None:
        self.cancelled = True
        self._stop_timer()
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
