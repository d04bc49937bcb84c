"""The gateway: the resource for all client traffic. It asks the router what to do with each
request (:mod:`ollamaflow.gateway.routing`), holds a request made with an API key to the key's
limits (:mod:`ollamaflow.ratelimits`), and carries the decision out: a refusal, an answer for
the whole frontend (:mod:`ollamaflow.gateway.modelops`), or an exchange with the backends
(:mod:`ollamaflow.gateway.exchange`), whose body a relay moves (:mod:`ollamaflow.gateway.relay`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from ollamaflow.catalog import Catalog, Registry
from ollamaflow.credentials import NO_TOKENS, Tokens
from ollamaflow.gateway import fanout
from ollamaflow.gateway.balancer import Balancer
from ollamaflow.gateway.callers import ANONYMOUS_CALLER, Caller
from ollamaflow.gateway.classify import RequestClass
from ollamaflow.gateway.clienterrors import error_body, refuse
from ollamaflow.gateway.completed import Completed, RequestIds
from ollamaflow.gateway.context import ExchangeContext, settle_nothing
from ollamaflow.gateway.deadlines import Deadlines
from ollamaflow.gateway.exchange import Exchange
from ollamaflow.gateway.modelcatalog import Inventory
from ollamaflow.gateway.modelops import ModelOperations
from ollamaflow.gateway.placement import Placement
from ollamaflow.gateway.requesthead import logged_head
from ollamaflow.gateway.routing import (
    CatalogAnswer,
    Decision,
    FleetOperation,
    Forward,
    Refusal,
    Router,
    Unload,
    model_key,
)
from ollamaflow.gateway.scheduler import QueueStats, Scheduler
from ollamaflow.ratelimits.contracts import Admission, Admitted, OverLimit, RateLimiter
from ollamaflow.records import Backend, Frontend, LoadBalancing
from ollamaflow.runtime import FailureKind, Runtime
from ollamaflow.server.answers import deliver
from ollamaflow.server.failures import fail
from ollamaflow.server.interfaces import ClientRequest
from ollamaflow.upstream.contracts import UpstreamClient

log = Logger()


class Gateway:
    """The resource for everything outside ``/v1.0/``: route, then forward or answer."""

    def __init__(
        self,
        *,
        registry: Registry,
        runtime: Runtime,
        reactor: Any,
        upstream: UpstreamClient,
        scheduler: Scheduler,
        http: HTTPClient,
        sticky_headers: tuple[str, ...] = (),
        balancer: Balancer | None = None,
        inventory: Inventory | None = None,
        sync: fanout.Puller | None = None,
        on_failure: Callable[[Backend, str, FailureKind], None] | None = None,
        on_models_changed: Callable[[str], Deferred[None]] | None = None,
        admin_tokens: Tokens = NO_TOKENS,
        withheld: Tokens = NO_TOKENS,
        observers: Sequence[Callable[[Completed], None]] = (),
        limiter: RateLimiter | None = None,
        placement: Placement | None = None,
        hot_keep_alive: str = "30m",
    ) -> None:
        """``upstream``: the client requests are forwarded with; ``scheduler``: the slots and
        queues; ``http``: the client of fan-outs (off the hot path); ``admin_tokens`` may
        manage models where a frontend does not let clients; ``withheld``: tokens of ours that
        must never reach a backend (admin, metrics); ``observers`` are told about every
        finished request (the access log, the metrics, usage); ``limiter`` counts what each
        API key takes (none: keys are not limited)."""
        self.registry = registry
        self.runtime = runtime
        self.clock: IReactorTime = reactor
        self.upstream = upstream
        self.inventory = inventory
        self.router = Router(
            registry=registry,
            runtime=runtime,
            seconds=reactor.seconds,
            inventory=inventory,
            balancer=balancer,
            sticky_headers=sticky_headers,
            admin_tokens=admin_tokens,
            pulls=sync is not None,
            placement=placement,
            has_slot=scheduler.has_slot,
            hot_keep_alive=hot_keep_alive,
        )
        #: Where models live, for ``ModelAware`` frontends.
        self.placement = placement
        self.new_id = RequestIds()
        self.scheduler = scheduler
        self.observers = list(observers)
        self.limiter = limiter
        #: Who asked, for requests with a key (or an admin token) still being answered: the
        #: gateway's own answers are accounted to them.
        self._callers: dict[int, Caller] = {}
        self.on_failure = on_failure
        self.withheld = withheld
        self.context = ExchangeContext(
            clock=reactor,
            scheduler=scheduler,
            upstream=upstream,
            deadlines=Deadlines(reactor),
            runtime=runtime,
            pins=self.router.pins,
            candidates_now=self.router.candidates_now,
            new_id=self.new_id,
            observers=self.observers,
            report=self.report,
            backend_failed=self._backend_failed,
            answered=self._answered,
            withheld=withheld,
            configured=lambda: registry.catalog.backends,
            settle=limiter.finish if limiter is not None else settle_nothing,
            sending=self._sending,
        )
        #: Requests being proxied right now (for draining, metrics and tests).
        self.exchanges = self.context.running
        #: Pull, delete, copy, create, blobs and unloading across a frontend's backends.
        self.model_ops = ModelOperations(
            registry, http, self, reactor, withheld, sync=sync, refresh=on_models_changed
        )
        #: Set while the daemon shuts down: requests in flight finish, new ones are refused.
        self.draining = False

    def _sending(self, forward: Forward, backend: Backend) -> None:
        """An attempt goes to ``backend``: placement learns of the load (if cold there) and
        of where the conversation went."""
        placement = self.placement
        if placement is None or forward.model is None:
            return
        if forward.frontend.load_balancing is not LoadBalancing.MODEL_AWARE:
            return
        placement.sent(backend, forward.model)
        if forward.conversation is not None:
            placement.served(forward.conversation, backend)

    def configuration_changed(self, catalog: Catalog) -> None:
        """A registry subscriber: forget what deleted backends and frontends left behind, and
        hand slots of changed backends to the queue."""
        self.upstream.forget({(b.hostname, b.port, b.ssl) for b in catalog.backends.values()})
        self.router.configuration_changed(catalog)
        self.scheduler.forget(lambda f: f in catalog.frontends)
        for backend in catalog.backends.values():
            self.scheduler.wake(backend)

    def backend_available(self, backend: Backend, healthy: bool) -> None:
        """A backend became healthy: requests queued for a slot may use it now."""
        if healthy:
            self.scheduler.wake(backend)

    async def close(self) -> None:
        await self.upstream.close()

    def body_limit(self, host: bytes | None) -> int:
        """The request body limit for a Host: its frontend's MaxRequestBodySize."""
        frontend = self.router.frontend_for(host)
        return frontend.max_request_body_size if frontend else 1 << 20

    # -- carrying decisions out -----------------------------------------------------------------

    def render(self, request: ClientRequest) -> bytes | int:
        if self.draining:
            request.persistent = False
            return self.refuse(request, None, 503, "OllamaFlow is shutting down", retry_after=1)
        # HTTP/1.0 is served whatever BlockHttp10 says: 1.2 stores it (true) but never enforces it.
        decision = self.router.decide(request)
        caller = decision.caller
        if caller is ANONYMOUS_CALLER or isinstance(decision, Refusal):
            return self._carry_out(request, decision)
        if not caller.limited or self.limiter is None:
            self._asking(request, decision, "")
            return self._carry_out(request, decision)
        admission = self.limiter.admit(caller.account, caller.limits)
        if isinstance(admission, Admitted) and isinstance(decision, Forward):
            return self._forward(request, decision, admission.lease)
        if isinstance(admission, Admitted | OverLimit):  # not an ABC check, unlike Deferred's
            return self._admitted(admission, request, decision)
        admission.addCallback(self._admitted_later, request, decision)
        return NOT_DONE_YET

    def _admitted(
        self, admission: Admission, request: ClientRequest, decision: Decision
    ) -> bytes | int:
        """Go on with a request its key's limits admitted; a 429 if they did not."""
        caller = decision.caller
        if isinstance(admission, OverLimit):
            return self.refuse(
                request,
                decision.frontend,
                429,
                f"the API key {caller.account!r} is over its limit of {admission.limit} "
                f"{admission.which}",
                retry_after=admission.retry_after,
                caller=caller,
            )
        if isinstance(decision, Forward):
            return self._forward(request, decision, admission.lease)
        self._asking(request, decision, admission.lease)
        return self._carry_out(request, decision)

    def _admitted_later(
        self, admission: Admission, request: ClientRequest, decision: Decision
    ) -> None:
        """The shared limits answered: the client may have left meanwhile."""
        if request.disconnected or request.finished:
            if not isinstance(admission, OverLimit) and admission.lease and self.limiter:
                self.limiter.release(decision.caller.account, admission.lease)
            return
        try:
            deliver(request, self._admitted(admission, request, decision))
        except Exception:
            log.failure("request admitted by the shared limits failed")
            fail(request, error_body(request.path, 500, "internal error; see the gateway's log"))

    def _asking(self, request: ClientRequest, decision: Decision, lease: str) -> None:
        """Until a request the gateway answers itself ends (an exchange carries its caller and
        lease): who asks, and the key's lease (if any), given back at the end."""
        if isinstance(decision, Forward):
            return
        caller = decision.caller
        key = id(request)
        self._callers[key] = caller

        def ended(*_: object) -> None:
            self._callers.pop(key, None)
            if lease and self.limiter is not None:
                self.limiter.release(caller.account, lease)

        request.watch(ended, ended)

    def _forward(self, request: ClientRequest, decision: Forward, lease: str = "") -> bytes | int:
        """Start the exchange, which gives the lease back when the request ends; until it
        watches the request (a 429 from a full queue, a bug), the lease goes back here."""
        try:
            refused = Exchange(self.context, request, decision, lease).run()
        except BaseException:
            self._give_back(decision.caller, lease)
            raise
        if refused is None:
            return NOT_DONE_YET
        self._give_back(decision.caller, lease)
        return self.refuse(
            request,
            decision.frontend,
            429,
            str(refused),
            retry_after=refused.retry_after,
            model=decision.model,
            caller=decision.caller,
        )

    def _give_back(self, caller: Caller, lease: str) -> None:
        if lease:
            self.context.settle(caller.account, caller.limits, lease, 0)

    def _carry_out(self, request: ClientRequest, decision: Decision) -> bytes | int:
        """Do what the router decided."""
        if isinstance(decision, Forward):
            return self._forward(request, decision)
        if isinstance(decision, Refusal):
            if decision.allow is not None:
                request.setHeader(b"Allow", decision.allow)
            return self.refuse(
                request,
                decision.frontend,
                decision.status,
                decision.message,
                retry_after=decision.retry_after,
                model=decision.model,
                caller=decision.caller,
            )
        if isinstance(decision, CatalogAnswer):
            body = decision.body
            self.answering(request, decision.frontend, decision.model, decision.backends, len(body))
            request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return body
        if isinstance(decision, Unload):
            return self.model_ops.unload(
                request, decision.frontend, decision.loaded, decision.document, decision.model
            )
        assert isinstance(decision, FleetOperation)
        operation = self.model_ops.operation(decision.name)
        return operation(request, decision.frontend, decision.candidates)

    def _caller_of(self, request: ClientRequest) -> Caller:
        callers = self._callers
        return callers.get(id(request), ANONYMOUS_CALLER) if callers else ANONYMOUS_CALLER

    def _backend_failed(self, backend: Backend, reason: str, kind: FailureKind) -> None:
        if self.on_failure is not None:
            self.on_failure(backend, reason, kind)

    def _answered(self, forward: Forward, backend: Backend, streamed: bool) -> None:
        """A backend answered a request in full: it is where the next request goes first
        (power of two choices' memory; one that failed must not be), it has the model loaded,
        and its slow start and steering may end."""
        self.router.balancer.finished(forward.frontend.identifier, backend)
        runtime = self.runtime
        state = runtime.states.get(backend.identifier)
        if state is not None:
            state.answered_whole(streamed)
        if runtime.model_holds and forward.model_key is not None:
            runtime.model_holds.answered(backend.identifier, forward.model_key)
        inventory = self.inventory
        if (
            inventory is not None
            and forward.model is not None
            and forward.request_class is not RequestClass.OTHER
            and not inventory.is_loaded(backend.identifier, forward.model)
        ):
            inventory.learned(backend.identifier, forward.model)

    def refuse(
        self,
        request: ClientRequest,
        frontend: Frontend | None,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        model: str | None = None,
        caller: Caller | None = None,
    ) -> bytes:
        """Answer a request the gateway will not forward; logged and reported like any other
        (``model``: the one it names, once known; ``caller``: who asked, if not known from
        :meth:`_asking`)."""
        request_id = self.new_id()
        request.setHeader(b"X-OllamaFlow-Request", request_id.encode())
        if status == 401:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="ollamaflow"')
        body = refuse(request, status, message, retry_after=retry_after)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        (log.warn if status >= 500 else log.info)(
            "request {rid}: {status} {message}", rid=request_id, status=status, message=message
        )
        if self.observers:
            who = caller if caller is not None else self._caller_of(request)
            self.report(
                self._own_answer(
                    request_id, request, frontend, model, status, "refused", len(body), who
                )
            )
        return body

    def answering(
        self,
        request: ClientRequest,
        frontend: Frontend,
        model: str | None,
        backends: Sequence[Backend],
        size: int = 0,
    ) -> str:
        """A request the gateway answers for the whole frontend (the catalog, a fan-out over
        ``backends``): its id, and its one report when it ends (``size``: its body, if known)."""
        request_id = self.new_id()
        request.setHeader(b"X-OllamaFlow-Request", request_id.encode())
        if not self.observers:
            return request_id
        started = self.clock.seconds()
        caller = self._caller_of(request)

        def ended(outcome: str) -> None:
            self.report(
                self._own_answer(
                    request_id,
                    request,
                    frontend,
                    model,
                    request.code,
                    outcome,
                    size,
                    caller,
                    duration=self.clock.seconds() - started,
                    backends=tuple(b.identifier for b in backends),
                )
            )

        request.watch(partial(ended, "ok"), lambda _: ended("client_gone"))
        return request_id

    def _own_answer(
        self,
        request_id: str,
        request: ClientRequest,
        frontend: Frontend | None,
        model: str | None,
        status: int,
        outcome: str,
        size: int,
        caller: Caller,
        *,
        duration: float = 0.0,
        backends: tuple[str, ...] = (),
    ) -> Completed:
        """The record of a request the gateway answered itself (refused, or for the whole
        frontend): no backend of its own, ``backends`` those it reached."""
        return Completed(
            request_id=request_id,
            client=request.client_host,
            frontend=frontend.identifier if frontend else "",
            backend=None,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            model=model_key(model),
            status=status,
            outcome=outcome,
            bytes=size,
            queued=0.0,
            ttfb=None,
            duration=duration,
            retries=0,
            backends=backends,
            api_key=caller.account,
            request_head=logged_head(
                request, frontend, backends, self.withheld, self.registry.catalog.backends
            ),
        )

    def report(self, completed: Completed) -> None:
        for observer in self.observers:
            try:
                observer(completed)
            except Exception:
                log.failure("request observer {observer!r} failed", observer=observer)

    def queue_report(self) -> list[dict[str, object]]:
        """Each frontend's queue: depth now, peak, waits and refusals (for the admin API)."""
        scheduler = self.scheduler
        out = []
        for identifier in self.registry.catalog.frontends:
            stats = scheduler.stats.get(identifier) or QueueStats()
            out.append({"Identifier": identifier, **stats.to_wire(scheduler.depth(identifier))})
        return out
