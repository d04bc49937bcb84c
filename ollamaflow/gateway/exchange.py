"""One forwarded request's trip through one or more backends: attempts, retries, the queue.

An :class:`Exchange` carries out a :class:`~ollamaflow.gateway.routing.Forward` decision. It
owns the backend slot its request holds from the moment the slot is taken to
:meth:`Exchange.end_attempt`; whatever way the request ends (finished, the client gone, a bug in
any callback, see :func:`~ollamaflow.gateway.relay.guarded`), the slot is given back. All it
talks to comes in its :class:`~ollamaflow.gateway.context.ExchangeContext`, so it runs the same
on a ``task.Clock`` with a fake backend client as on the reactor.
"""

from __future__ import annotations

import contextlib
from functools import partial

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone

from ollamaflow.gateway import headers as hdrs
from ollamaflow.gateway.classify import MODEL_TRANSFER_PATHS, RequestClass
from ollamaflow.gateway.clienterrors import error_body, refuse
from ollamaflow.gateway.completed import (
    LOGGED_BODY_BYTES,
    TAIL_BYTES,
    Completed,
    Usage,
    logged_text,
    usage,
)
from ollamaflow.gateway.context import ExchangeContext
from ollamaflow.gateway.deadlines import Deadline
from ollamaflow.gateway.outbound import body_for, logged_body, target_for
from ollamaflow.gateway.relay import Discard, Relay, describe, guarded
from ollamaflow.gateway.requesthead import logged_head
from ollamaflow.gateway.routing import Forward
from ollamaflow.gateway.scheduler import QueueRefused
from ollamaflow.records import Backend
from ollamaflow.runtime import MODEL_HOLD, FailureKind
from ollamaflow.server.failures import fail
from ollamaflow.server.interfaces import ClientRequest
from ollamaflow.upstream.contracts import Attempt, BackendResponse

log = Logger()

#: Pulls and pushes may sit silent for minutes while a registry answers or layers are hashed.
MODEL_TRANSFER_IDLE = 1800.0
#: Answers that say the backend, not the request, failed (as Envoy's gateway errors): retried
#: on another backend while nothing reached the client, and counted against its health.
GATEWAY_ERRORS = frozenset({502, 503, 504})
#: A 500 may be the request's own fault: it is retried once elsewhere, and counts against the
#: backend only when the other backend answered it (see ``Exchange._take``).
SERVER_ERROR = 500
_NOTHING_USED = Usage(None, None, None)


class Exchange:
    """One client request forwarded: attempts on backends, retries, the queue, the answer."""

    __slots__ = (
        "_active",
        "_attempt",
        "_blamed",
        "_reported",
        "_timed_out",
        "_ttfb",
        "answering",
        "captured",
        "context",
        "first_byte",
        "forward",
        "keep_tail",
        "last_error",
        "lease",
        "logged_body",
        "outcome",
        "relay",
        "relayed",
        "request",
        "request_id",
        "started",
        "status",
        "tail",
        "tried",
        "used",
        "waited",
    )

    def __init__(
        self, context: ExchangeContext, request: ClientRequest, forward: Forward, lease: str = ""
    ) -> None:
        """``lease``: what the caller's key holds of its concurrency limit, given back (with
        the tokens used) when the request ends."""
        self.context = context
        self.request = request
        self.forward = forward
        self.lease = lease
        self.request_id = context.new_id()
        #: False once nobody is to be answered the usual way: the client left, or a bug ended it.
        self.answering = True
        self.relay: Relay | None = None
        self.relayed = 0
        self.last_error = ""
        self.tried: list[str] = []
        #: The attempt in flight, or the wait for a slot; cancelled if the client leaves.
        self._attempt: Attempt | Deferred[Backend] | None = None
        self._ttfb: Deadline | None = None
        self._active: Backend | None = None
        #: A backend that answered 500 before another was tried: to blame if another answers.
        self._blamed: Backend | None = None
        self._timed_out = False  # the latest attempt ran out of time (504, not 502)
        self._reported = False
        self.started = context.clock.seconds()
        self.waited = 0.0
        self.first_byte: float | None = None
        self.status = 0
        self.outcome = "ok"
        self.keep_tail = forward.request_class is not RequestClass.OTHER and bool(
            context.observers or forward.caller.limits.tokens_per_minute
        )
        self.tail = b""
        #: What the backend reported using, once read from the tail (None: not yet).
        self.used: Usage | None = None
        self.captured: bytearray | None = None
        self.logged_body: str | None = None

    @property
    def model(self) -> str | None:
        """The model as slots count it."""
        return self.forward.model_key

    def crash(self, failure: Failure) -> None:
        self.crashed(failure)

    # -- the first attempt, or the queue ----------------------------------------------------------

    def run(self) -> QueueRefused | None:
        """Start: on the first candidate with a free slot, else in the frontend's queue; the
        queue's refusal (nothing started) if it is full."""
        forward = self.forward
        scheduler = self.context.scheduler
        model = self.model
        for backend in forward.ordered:
            if scheduler.has_slot(backend, model):
                self.start(backend)
                return None
        try:
            waiting = scheduler.wait(
                forward.frontend, forward.ordered, self.may_use, model, forward.caller.priority
            )
        except QueueRefused as e:
            return e
        self.queue(waiting)
        return None

    @guarded
    def start(self, backend: Backend) -> None:
        """The first attempt, on ``backend``, which has a free slot."""
        self._watch()
        self.context.scheduler.acquire(backend, self.model)
        self._active = backend
        self._send(backend)

    @guarded
    def queue(self, waiting: Deferred[Backend]) -> None:
        """Wait for a slot; the scheduler hands over a backend whose slot is already ours."""
        self._watch()
        self._attempt = waiting
        waiting.addCallbacks(self._slot_granted, self._not_queued)

    def _watch(self) -> None:
        self.context.running.add(self)
        self.request.watch(self._finished, self._client_lost)
        self.request.setHeader(b"X-OllamaFlow-Request", self.request_id.encode())

    @guarded
    def _slot_granted(self, backend: Backend) -> None:
        self._active = backend  # the scheduler took the slot for us: ours from now on
        self._attempt = None
        self.waited = self.context.clock.seconds() - self.started
        self._send(backend)

    @guarded
    def _not_queued(self, failure: Failure) -> None:
        self._attempt = None
        if not self.answering or failure.check(CancelledError):
            return
        error = failure.value
        if isinstance(error, QueueRefused):
            self.waited = self.context.clock.seconds() - self.started
            if self.tried:  # an attempt failed and no other backend freed a slot in time
                self._give_up(f"; {error}")
            else:
                self._answer(429, str(error), retry_after=error.retry_after)
            return
        log.failure("request {rid}: queueing failed", failure, rid=self.request_id)
        self._answer(500, "the request could not be scheduled; see the gateway's log")

    # -- attempts -------------------------------------------------------------------------------

    def may_use(self, backend: Backend) -> Backend | None:
        """Asked by the scheduler when a slot of ``backend`` frees while this request waits:
        the record to use if it is one of the request's candidates now and not tried yet."""
        identifier = backend.identifier
        if identifier in self.tried:
            return None
        for candidate in self.context.candidates_now(self.forward):
            if candidate.identifier == identifier:
                return candidate
        return None

    def _untried(self) -> list[Backend]:
        """The candidates left for another attempt: not tried yet, and in rotation."""
        if not self.forward.frontend.allow_retries:
            return []
        tried = self.tried
        states = self.context.runtime.states
        left = []
        for backend in self.context.candidates_now(self.forward):
            if backend.identifier in tried:
                continue
            state = states.get(backend.identifier)
            if state is None or not state.suspect:
                left.append(backend)
        return left

    def _retry(self, left: list[Backend] | None = None) -> None:
        """Another attempt, on a backend not tried yet: the least loaded with a free slot now,
        else the first to free one, waiting in the queue in this request's old place until its
        old deadline. It gives up only when no candidate is left or the deadline passed."""
        if left is None:
            left = self._untried()
        if not left:
            self._give_up()
            return
        context = self.context
        scheduler = context.scheduler
        model = self.model
        free = [b for b in left if scheduler.has_slot(b, model)]
        if free:
            states = context.runtime.states

            def load(backend: Backend) -> float:
                state = states.get(backend.identifier)
                return (state.active_requests if state else 0) / backend.weight

            backend = min(free, key=load)
            scheduler.acquire(backend, model)
            self._active = backend
            self._send(backend)
            return
        log.info(
            "request {rid}: waiting for a slot on a backend not tried yet ({count} left)",
            rid=self.request_id,
            count=len(left),
        )
        waiting = scheduler.wait_again(
            self.forward.frontend, self.may_use, model, self.started, self.forward.caller.priority
        )
        self._attempt = waiting
        waiting.addCallbacks(self._slot_granted, self._not_queued)

    def _send(self, backend: Backend) -> None:
        """One attempt on ``backend``, whose slot this request already holds."""
        self._timed_out = False
        self.tried.append(backend.identifier)
        self.context.sending(self.forward, backend)
        request = self.request
        frontend = self.forward.frontend
        if self.logged_body is None and (frontend.log_request_body or backend.log_request_body):
            # Read now: the body is dropped once the response is finished.
            self.logged_body = logged_body(request)
        body = body_for(request, self.forward, backend)  # strict JSON, valid pins: encodable
        target = target_for(request, backend)
        context = self.context
        try:
            attempt = context.upstream.send(
                backend,
                request.method,
                target,
                hdrs.forwarded(request, backend, context.withheld),
                body,
                self._responded,
                self._failed,
            )
        except ValueError as e:  # the request's own fault: not the backend's, no retry
            self.end_attempt()
            self._answer(400, f"the request cannot be forwarded: {e}")
            return
        if attempt.fired:  # the body producer failed at once
            return
        self._attempt = attempt
        ttfb = frontend.timeout_ms / 1000
        if ttfb:
            self._ttfb = context.deadlines.add(ttfb, partial(self._ttfb_expired, attempt))

    @guarded
    def _ttfb_expired(self, attempt: Attempt) -> None:
        self._ttfb = None
        self._timed_out = True
        attempt.cancel()

    def _stop_ttfb(self) -> None:
        if self._ttfb is not None:
            self._ttfb.cancel()
            self._ttfb = None

    def end_attempt(self) -> None:
        """Give the backend's slot back, exactly once per attempt."""
        backend, self._active = self._active, None
        if backend is not None:
            self.context.scheduler.release(backend, self.model)

    @guarded
    def _failed(self, failure: Failure) -> None:
        backend = self._active
        assert backend is not None, "an attempt fails while its backend slot is held"
        self._attempt = None
        self._stop_ttfb()
        if not self.answering:
            self.end_attempt()
            return
        if self._timed_out:
            self.last_error = f"no response within {self.forward.frontend.timeout_ms} ms"
        else:
            self.last_error = describe(failure)
        log.warn(
            "request {rid}: backend {backend} failed: {error}",
            rid=self.request_id,
            backend=backend.identifier,
            error=self.last_error,
        )
        # Out of rotation before its slot is given back, so no queued request takes it.
        self.context.backend_failed(backend, self.last_error, FailureKind.VISIBLE)
        self.end_attempt()
        self._retry()

    @guarded
    def _responded(self, response: BackendResponse) -> None:
        try:
            self._take(response)
        except Exception:
            with contextlib.suppress(RuntimeError):  # unless a reader already has it
                response.deliverBody(Discard(close=True))
            raise

    def _take(self, response: BackendResponse) -> None:
        """The response head is here: retry past it, or relay it to the client."""
        backend = self._active
        assert backend is not None, "a response comes while its backend slot is held"
        self._attempt = None
        self._stop_ttfb()
        if not self.answering:
            response.deliverBody(Discard(close=True))
            self.end_attempt()
            return
        code = response.code
        if code in GATEWAY_ERRORS or (code == SERVER_ERROR and self._blamed is None):
            left = self._untried()
            if left:
                self._retry_past(response, backend, left)
                return
        if code < SERVER_ERROR and self._blamed is not None:
            self._blame(self._blamed, backend)
        if code in GATEWAY_ERRORS:
            self.context.backend_failed(backend, f"answered {code}", FailureKind.VISIBLE)
        self._relay(response, backend)

    def _relay(self, response: BackendResponse, backend: Backend) -> None:
        """Send the response's head to the client and start moving its body."""
        request = self.request
        context = self.context
        frontend = self.forward.frontend
        self.first_byte = context.clock.seconds()
        self.status = response.code
        if frontend.log_response_body or backend.log_response_body:
            self.captured = bytearray()
        request.setResponseCode(response.code, response.phrase)
        hdrs.to_client(response.headers, request)
        if request.method == b"HEAD":
            # The answer to HEAD says how long the GET's body would be (when the backend
            # said); there is none here.
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                request.setHeader(b"Content-Length", length[-1])
        elif response.length is not None and isinstance(response.length, int):
            request.setHeader(b"Content-Length", b"%d" % response.length)
        request.setHeader(b"X-OllamaFlow-Backend", backend.identifier.encode())
        client = self.forward.client
        if client is not None:
            expiry = frontend.sticky_session_expiration_ms / 1000
            context.pins.pin(
                frontend.identifier, client, backend.identifier, context.clock.seconds() + expiry
            )
        if request.method == b"HEAD":
            response.deliverBody(Discard())
            self.end_attempt()
            request.finish()
            return
        idle = frontend.timeout_ms / 1000
        if request.path in MODEL_TRANSFER_PATHS:
            idle = max(idle, MODEL_TRANSFER_IDLE)
        self.relay = relay = Relay(self, backend, idle, context.clock)
        response.deliverBody(relay)
        # A small answer is complete by now; a stream's status and headers go out at once, as
        # the backend sent them, not with its first chunk.
        if not relay.done:
            if not request.started:
                request.write(b"")
            relay.watch()

    def _blame(self, blamed: Backend, answering: Backend) -> None:
        """``blamed`` answered 500 to what ``answering`` answered: it counts against that
        backend for this model only (the request may be what it cannot serve)."""
        self._blamed = None
        model = self.model
        if model is None:
            return
        context = self.context
        steered = context.runtime.model_holds.blamed(
            blamed.identifier, model, context.clock.seconds(), blamed.unhealthy_threshold
        )
        if steered:
            log.warn(
                "model {model} steered away from backend {backend} for {hold:g}s: it answered "
                "500 to requests backend {other} answered",
                model=model,
                backend=blamed.identifier,
                hold=MODEL_HOLD,
                other=answering.identifier,
            )

    def _retry_past(self, response: BackendResponse, backend: Backend, left: list[Backend]) -> None:
        """A gateway error, or a first 500, before anything reached the client: read it away
        and try another backend. A gateway error takes the backend out of rotation at once; a
        500 only counts against it, for this model, once another backend answers the same
        request."""
        code = response.code
        self.last_error = f"backend {backend.identifier!r} answered {code}"
        log.warn("request {rid}: {error}; retrying", rid=self.request_id, error=self.last_error)
        if code == SERVER_ERROR:
            self._blamed = backend
        else:
            self.context.backend_failed(backend, self.last_error, FailureKind.VISIBLE)
        response.deliverBody(Discard())
        self.end_attempt()
        self._retry(left)

    # -- the body, from the relay ---------------------------------------------------------------

    def relaying(self, producer: IPushProducer) -> None:
        self.request.registerProducer(producer, True)

    def body_received(self, data: bytes) -> None:
        self.relayed += len(data)
        if self.keep_tail:
            self.tail = (self.tail + data)[-TAIL_BYTES:]
        captured = self.captured
        if captured is not None and len(captured) < LOGGED_BODY_BYTES:
            captured += data[: LOGGED_BODY_BYTES - len(captured)]
        self.request.write(data)

    def body_ended(self, backend: Backend, reason: Failure, streamed: bool) -> None:
        """The backend's body ended: whole (the client's response ends too) or cut off (the
        client's is cut off as well, so it never looks complete)."""
        self.relay = None  # no cycle left: the exchange is freed as soon as it ends
        complete = isinstance(reason.value, ResponseDone | PotentialDataLoss)
        if complete and self.status < SERVER_ERROR:
            self.context.answered(self.forward, backend, streamed)
        request = self.request
        if complete or not self.answering:
            self.end_attempt()
            if self.answering:
                request.unregisterProducer()
                request.finish()
            return
        request.unregisterProducer()
        log.warn(
            "request {rid}: backend {backend} broke off the response: {error}",
            rid=self.request_id,
            backend=backend.identifier,
            error=describe(reason),
        )
        self.context.backend_failed(backend, "broke off a response", FailureKind.CUT_STREAM)
        self.end_attempt()
        self.outcome = "aborted"
        # No terminating chunk: the client sees a truncated response, never a complete one.
        request.abort_connection()

    # -- endings --------------------------------------------------------------------------------

    def _give_up(self, why: str = "") -> None:
        tried = ", ".join(self.tried)
        if self._timed_out:
            self._answer(504, f"{self.last_error} (tried {tried}){why}")
        else:
            self._answer(502, f"no backend could answer (tried {tried}): {self.last_error}{why}")

    def _answer(
        self,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        outcome: str = "refused",
    ) -> None:
        (log.warn if status >= 500 else log.info)(
            "request {rid}: {status} {message}", rid=self.request_id, status=status, message=message
        )
        self.status, self.outcome = status, outcome
        body = refuse(self.request, status, message, retry_after=retry_after)
        self.request.setHeader(b"Content-Length", b"%d" % len(body))
        self.request.write(body)
        self.request.finish()

    def abort(self) -> None:
        """Give up on this request now (the daemon's drain ran out of time)."""
        self.outcome = "aborted"
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        self.request.abort_connection()

    def _finished(self) -> None:
        self.context.running.discard(self)
        self._stop_everything()  # nothing left to stop on every usual path; kept certain
        self._report()
        self._settle()

    def _client_lost(self, reason: Failure) -> None:
        self.context.running.discard(self)
        if self.outcome == "ok":
            self.outcome = "client_gone"
        self._report()
        self._stop_everything()
        self._settle()

    def _settle(self) -> None:
        """The request ended: its key's lease goes back, its tokens count against the key."""
        caller = self.forward.caller
        if not caller.limited:
            return
        limits = caller.limits
        tokens = 0
        if limits.tokens_per_minute:
            used = self._used()
            tokens = (used.prompt_tokens or 0) + (used.completion_tokens or 0)
        self.context.settle(caller.account, limits, self.lease, tokens)

    def _used(self) -> Usage:
        """What the backend reported using, read from the response's tail once."""
        used = self.used
        if used is None:
            used = self.used = usage(self.tail) if self.tail else _NOTHING_USED
        return used

    def _stop_everything(self) -> None:
        """Nobody is to be answered the usual way any more: cancel the attempt or the wait for
        a slot, close the backend's stream (Ollama stops generating), give the slot back."""
        self.answering = False
        self._stop_ttfb()
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        if self.relay is not None:
            self.relay.client_left()
        self.end_attempt()

    def crashed(self, failure: Failure) -> None:
        """A bug while handling this request: logged; the client gets a 500 (or, once its
        response has begun, a cut-off connection) and the slot is given back."""
        log.failure("request {rid} failed", failure, rid=self.request_id)
        if not self.answering:
            return
        self.outcome = "error"
        self._stop_everything()
        request = self.request
        if not request.started:
            self.status = 500
        message = f"internal error; see the gateway's log, request {self.request_id}"
        try:
            fail(request, error_body(request.path, 500, message))
        except Exception:
            log.failure("request {rid}: the 500 could not be sent", rid=self.request_id)
            request.abort_connection()

    def _report(self) -> None:
        """Tell the observers how this request went, once."""
        context = self.context
        if self._reported or not context.observers:
            return
        self._reported = True
        used = self._used()
        request = self.request
        captured = self.captured
        context.report(
            Completed(
                request_id=self.request_id,
                client=request.client_host,
                frontend=self.forward.frontend.identifier,
                backend=self.tried[-1] if self.tried else None,
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                model=self.model,
                status=self.status,
                outcome=self.outcome,
                bytes=self.relayed,
                queued=self.waited,
                ttfb=None if self.first_byte is None else self.first_byte - self.started,
                duration=context.clock.seconds() - self.started,
                retries=max(0, len(self.tried) - 1),
                eval_count=used.completion_tokens,
                eval_duration_ns=used.duration_ns,
                prompt_eval_count=used.prompt_tokens,
                api_key=self.forward.caller.account,
                request_body=self.logged_body,
                response_body=None
                if captured is None
                else logged_text(bytes(captured), self.relayed),
                request_head=logged_head(
                    request,
                    self.forward.frontend,
                    self.tried,
                    context.withheld,
                    context.configured(),
                ),
            )
        )
