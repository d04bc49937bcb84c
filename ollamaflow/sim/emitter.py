"""Run a response script against a request: pauses, waits, paced writes, faults and cleanup.

A script is a generator yielding steps: a `float` pauses that many seconds, `bytes` is one message
written with one `request.write()`, a `Deferred` is waited for and its result sent back in. When
no step needs to wait the whole response is written synchronously, without a reactor hop; only a
script that really waits registers for disconnects and backpressure.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from ollamaflow.sim.counters import Counters
from ollamaflow.sim.scheduler import Lease

Step = float | bytes | Deferred[Any]
Script = Generator[Step, Any, None]

_log = Logger()
_NOTHING = object()


@attrs.frozen
class Faults:
    """The stream faults in force when a response started."""

    drop_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0


NO_FAULTS = Faults()


@implementer(IPushProducer)
@attrs.define(eq=False)
class Emitter:
    """Drives one script for one request and accounts for how the request ended."""

    request: Request
    clock: IReactorTime
    counters: Counters
    script: Script
    streaming: bool
    """Chunked, one write per message; otherwise exactly one message sent with Content-Length."""
    faults: Faults = NO_FAULTS
    sent: int = 0
    _ready: bool = False
    _next: Any = None
    _paused: bool = False
    _done: bool = False
    _went_async: bool = False
    _stalled: bool = False
    _held: bytes | None = None
    _timer: IDelayedCall | None = None
    _due: float | None = None
    """When the last pause was due to end; pacing is anchored to it so timer lateness does
    not accumulate into a slower stream."""
    _waiting: Deferred[Any] | None = None

    def start(self) -> None:
        """Run the script as far as it goes without waiting."""
        self._ready = True
        self._advance()

    # IPushProducer: the transport's buffer is full / drained / gone.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._advance()

    def stopProducing(self) -> None:
        self._abandon(disconnect=True)

    def _advance(self) -> None:
        while self._ready and not self._paused and not self._done:
            value, self._next = self._next, None
            try:
                if isinstance(value, Failure):
                    step = value.throwExceptionIntoGenerator(self.script)
                else:
                    step = self.script.send(value)
            except StopIteration:
                self._finish()
                return
            except Exception:
                _log.failure("simulator response script failed")
                self._fail()
                return
            if isinstance(step, bytes):
                if self.streaming and self._fault_before_write(step):
                    return
                self._write(step)
            elif isinstance(step, Deferred):
                self._due = None
                result = self._await(step)
                if result is _NOTHING:
                    return
                self._next = result
            elif step > 0:
                now = self.clock.seconds()
                due = (self._due if self._due is not None else now) + step
                self._due = due
                if due > now:
                    self._wait_for(due - now, self._wake)
                    return

    def _fault_before_write(self, data: bytes) -> bool:
        """Apply drop/stall before a message; True when the script must not continue now."""
        faults = self.faults
        if faults.drop_after is not None and self.sent >= faults.drop_after:
            self._drop()
            return True
        if faults.stall_after is not None and self.sent == faults.stall_after and not self._stalled:
            self._stalled = True
            if faults.stall_seconds > 0:
                self._held = data
                self._wait_for(faults.stall_seconds, self._release_held)
                return True
        return False

    def _write(self, data: bytes) -> None:
        if not self.streaming:
            self.request.setHeader(b"content-length", b"%d" % len(data))
        self.sent += 1
        self.request.write(data)

    def _wait_for(self, seconds: float, then: Any) -> None:
        self._ready = False
        self._go_async()
        self._timer = self.clock.callLater(seconds, then)

    def _wake(self) -> None:
        self._timer = None
        self._ready = True
        self._advance()

    def _release_held(self) -> None:
        self._timer = None
        self._due = None
        held, self._held = self._held, None
        if held is not None and not self._done:
            self._write(held)
        self._ready = True
        self._advance()

    def _await(self, deferred: Deferred[Any]) -> Any:
        """The Deferred's result if it has one now, else `_NOTHING` after arranging to resume."""
        box: list[Any] = []
        synchronous = True

        def got(result: Any) -> None:
            if synchronous:
                box.append(result)
                return
            self._waiting = None
            if self._done:
                if isinstance(result, Lease):
                    result.release()
                return
            self._next = result
            self._ready = True
            self._advance()

        deferred.addBoth(got)
        synchronous = False
        if box:
            return box[0]
        self._ready = False
        self._waiting = deferred
        self._go_async()
        return _NOTHING

    def _go_async(self) -> None:
        """From now on the response outlives `render`: watch for disconnects and backpressure."""
        if self._went_async:
            return
        self._went_async = True
        self.request.notifyFinish().addErrback(self._lost)
        if self.streaming:
            self.request.registerProducer(self, True)

    def _lost(self, _reason: Failure) -> None:
        self._abandon(disconnect=True)

    def _abandon(self, disconnect: bool) -> None:
        """Stop for good: cancel timers and waits, close the script (releasing its lease)."""
        if self._done:
            return
        self._done = True
        if disconnect:
            self.counters.client_disconnects += 1
        self.counters.finished(None)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.addErrback(lambda f: f.trap(CancelledError))
            waiting.cancel()
        self.script.close()

    def _drop(self) -> None:
        self._done = True
        self.counters.dropped_streams += 1
        self.counters.finished(None)
        self._cleanup()
        # Close after flushing what was written (FIN, like a crashed server's kernel), so the
        # client sees exactly `drop_after` messages and then a truncated chunked body.
        transport = self.request.channel.transport
        if transport is not None:
            transport.loseConnection()

    def _finish(self) -> None:
        self._done = True
        if self._went_async and self.streaming:
            self.request.unregisterProducer()
        self.counters.finished(self.request.code)
        self.request.finish()

    def _fail(self) -> None:
        """A bug in a script: answer 500, or an error line when the stream has begun."""
        self._done = True
        self._cleanup()
        error = json.dumps({"error": "internal simulator error"}).encode() + b"\n"
        if self.sent == 0:
            self.request.setResponseCode(500)
            self.request.setHeader(b"content-type", b"application/json; charset=utf-8")
            self.request.setHeader(b"content-length", b"%d" % len(error))
        if self._went_async and self.streaming:
            self.request.unregisterProducer()
        self.counters.finished(self.request.code)
        self.request.write(error)
        self.request.finish()
