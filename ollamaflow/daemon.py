"""The daemon as a Twisted service: live configuration, admin API and the main port.

Built from an open store and its first snapshot, so ``twistd`` can prepare the database before
the reactor runs and tests can build one in-process on port 0.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from ollamaflow import tcp
from ollamaflow.accesslog import AccessLog
from ollamaflow.activity import Activity
from ollamaflow.admin.app import AdminApi
from ollamaflow.catalog import Catalog, Registry
from ollamaflow.cors import Policy
from ollamaflow.credentials import Tokens
from ollamaflow.frontdoor import FrontDoor, Root
from ollamaflow.gateway.completed import Completed
from ollamaflow.gateway.placement import Conversations, Placement
from ollamaflow.gateway.proxy import Gateway
from ollamaflow.gateway.scheduler import Scheduler
from ollamaflow.logs import logs_info
from ollamaflow.metrics import KnownModels, LiveState, Metrics, MetricsPage
from ollamaflow.pool import connection_pool, services_agent
from ollamaflow.ratelimits.contracts import RateLimiter
from ollamaflow.ratelimits.local import LocalLimits
from ollamaflow.ratelimits.shared import SharedLimits
from ollamaflow.records import Backend
from ollamaflow.runtime import Runtime
from ollamaflow.server.acceptor import Acceptor
from ollamaflow.server.interfaces import ListenFunction
from ollamaflow.services import HealthChecker, ModelInventory, ModelSync
from ollamaflow.services.follow import ConfigFollower
from ollamaflow.services.preload import Preloader
from ollamaflow.settings import DatabaseDriver, LoadedSettings
from ollamaflow.store import Snapshot, Store, describe_postgresql, postgresql_conninfo
from ollamaflow.twisted_internals import forget_exit_signal
from ollamaflow.upstream import BackendClient
from ollamaflow.usage import UsageFlusher, UsageLedger
from ollamaflow.utctime import utc_clock
from ollamaflow.workers import listen_shared

log = Logger()

#: Connections the kernel holds for us before we accept them.
LISTEN_BACKLOG = 1024

#: Seconds to open a connection to a backend for a client's request.
BACKEND_CONNECT_TIMEOUT = 5.0

STICKY_SWEEP_SECONDS = 60.0


def listen_interface(hostname: str) -> str:
    """The address to bind for ``Webserver.Hostname``: ``*`` means every IPv4 interface."""
    if hostname in ("*", "+", "0.0.0.0"):
        return "0.0.0.0"
    if hostname.lower() == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(hostname.strip("[]")))
    except ValueError:
        # A host name: resolved once, at start-up, before the reactor serves anything.
        return socket.gethostbyname(hostname)


class Daemon(MultiService):
    """Everything one OllamaFlow process runs; background services are its children."""

    def __init__(
        self,
        *,
        loaded: LoadedSettings,
        store: Store,
        snapshot: Snapshot,
        reactor: Any,
        port: int | None = None,
        log_observer: ILogObserver | None = None,
        worker: int | None = None,
        listen: ListenFunction | None = None,
    ) -> None:
        """``worker``: this process is worker N of a daemon with ``Workers`` > 1; ``listen``
        starts listening (by default :func:`ollamaflow.tcp.listen`, or with SO_REUSEPORT when
        several workers share the port)."""
        super().__init__()
        self.loaded = loaded
        self.worker = worker
        #: Several processes on one port: each binds it with SO_REUSEPORT.
        self.shared_port = loaded.settings.workers > 1
        if listen is None:
            listen = listen_shared if self.shared_port else tcp.listen
        self.listen: ListenFunction = listen
        self.store = store
        self.reactor: IReactorTCP = reactor
        self.reactor_time: IReactorTime = reactor
        self.now = utc_clock(reactor.seconds)
        self.started = self.now()
        self.runtime = Runtime()
        self.registry = Registry(store, Catalog.build(snapshot))
        settings = loaded.settings
        # Health checks, model inventory and model sync share one connection pool, apart from
        # the gateway's so that background traffic never queues behind client requests.
        self.services_pool = connection_pool(reactor)
        http = HTTPClient(services_agent(reactor, self.services_pool, connect_timeout=5.0))
        self.inventory = ModelInventory(
            registry=self.registry,
            runtime=self.runtime,
            clock=reactor,
            http=http,
            interval=settings.model_refresh_interval_ms / 1000,
        )
        # The slots and queues, shared by the gateway (which takes them) and the metrics.
        scheduler = Scheduler(reactor, self.runtime)
        # Where models live, for ModelAware frontends: which loads to allow, which to preload.
        placing = settings.placement
        self.placement = Placement(
            self.inventory,
            self.runtime,
            reactor.seconds,
            waiting=scheduler.waiting_for,
            preload_queue_depth=placing.preload_queue_depth,
            evict_queue_depth=placing.evict_queue_depth,
            conversations=Conversations(placing.conversations),
        )
        observers: list[Callable[[Completed], None]] = []
        if logs_info(settings.logging):
            observers.append(AccessLog())
        # What the fleet did lately, for the dashboard's live feed.
        self.activity = Activity(reactor.seconds)
        observers.append(self.activity)
        # What each API key (and anonymous) used, per model and hour: counted in memory,
        # written to the database in batches.
        # The models some backend lists: what usage and the metrics name; others are "other".
        known_models = KnownModels(self.registry, self.inventory)
        self.usage = UsageLedger(store, reactor, known_model=known_models)
        observers.append(self.usage)
        flusher = UsageFlusher(
            self.usage, reactor, interval=settings.rate_limits.usage_flush_interval_ms / 1000
        )
        flusher.setServiceParent(self)
        # API keys' limits: counted here alone, or by every instance together through Redis.
        limiter: RateLimiter
        if settings.rate_limits.redis is not None:
            shared = SharedLimits(reactor, settings.rate_limits.redis)
            shared.setServiceParent(self)
            limiter = shared
        else:
            limiter = LocalLimits(reactor)
        self.metrics: Metrics | None = None
        metrics_page: MetricsPage | None = None
        if settings.metrics.enabled:
            self.metrics = Metrics(
                known_model=known_models,
                live=LiveState(self.registry, self.runtime, scheduler.depth, self.placement.stats),
            )
            observers.append(self.metrics)
            metrics_page = MetricsPage(self.metrics, settings.metrics.bearer_token)
        self.sync = ModelSync(
            registry=self.registry,
            runtime=self.runtime,
            inventory=self.inventory,
            clock=reactor,
            http=http,
            max_concurrent=settings.max_concurrent_pulls,
            idle_timeout=settings.pull_idle_timeout_ms / 1000,
            automatic=worker is None,
            on_pull_done=self.metrics.pull_done if self.metrics is not None else None,
        )
        self.health = HealthChecker(
            registry=self.registry,
            runtime=self.runtime,
            clock=reactor,
            http=http,
            interval=settings.health_check_interval_ms / 1000,
            timeout=settings.health_check_timeout_ms / 1000,
            on_transition=self._health_changed,
            on_available=self._back_in_rotation,
            on_check=self.metrics.health_checked if self.metrics is not None else None,
        )
        for service in (self.inventory, self.sync, self.health):
            service.setServiceParent(self)
        admin_tokens = Tokens.of(settings.admin_bearer_tokens)
        self.gateway = Gateway(
            registry=self.registry,
            runtime=self.runtime,
            reactor=reactor,
            upstream=BackendClient(reactor, BACKEND_CONNECT_TIMEOUT),
            scheduler=scheduler,
            http=http,
            sticky_headers=settings.sticky_headers,
            inventory=self.inventory,
            sync=self.sync,
            on_failure=self.health.report_failure,
            on_models_changed=self.inventory.refresh_now,
            admin_tokens=admin_tokens,
            withheld=Tokens.of(settings.admin_bearer_tokens, [settings.metrics.bearer_token]),
            observers=observers,
            limiter=limiter,
            placement=self.placement,
            hot_keep_alive=placing.hot_keep_alive,
        )
        preloader = Preloader(
            registry=self.registry,
            runtime=self.runtime,
            placement=self.placement,
            waiting=scheduler.waiting_models,
            clock=reactor,
            http=http,
            on_started=self._preload_started,
            on_loaded=self._preloaded,
            max_concurrent=placing.max_concurrent_preloads,
            keep_alive=placing.hot_keep_alive,
        )
        preloader.setServiceParent(self)
        # Who hears of a configuration change, in this order: the runtime forgets deleted
        # backends, the inventory and model sync forget and reconcile, the health checker
        # starts and stops checks (a changed backend is checked at once), the gateway drops
        # pins and idle connections and hands freed slots to the queue, the metrics re-read
        # model names.
        registry = self.registry
        registry.subscribe(self._forget_deleted)
        registry.subscribe(self.inventory.configuration_changed)
        registry.subscribe(self.sync.configuration_changed)
        registry.subscribe(self.health.configuration_changed)
        registry.subscribe(self.gateway.configuration_changed)
        # Who hears that a backend's models were read: routing, placement, model sync, the
        # metrics.
        self.inventory.add_listener(self.gateway.router.inventory_changed)
        self.inventory.add_listener(self.placement.refreshed)
        self.inventory.add_listener(self.sync.models_read)
        registry.subscribe(known_models.changed)
        self.inventory.add_listener(known_models.changed)
        registry.subscribe(
            lambda catalog: self.activity.forget_all_but(catalog.frontends, catalog.backends)
        )
        registry.subscribe(lambda catalog: self.placement.forget_all_but(catalog.backends))
        # Deleted API keys: their pending usage and their metrics go with them.
        registry.subscribe(lambda catalog: self.usage.forget_keys(catalog.api_keys.keys()))
        if self.metrics is not None:
            metrics = self.metrics
            registry.subscribe(lambda catalog: metrics.forget_keys(catalog.api_keys.keys()))
        self.admin = AdminApi(
            self.registry,
            self.runtime,
            admin_tokens,
            self.now,
            self.started,
            models=self.sync.models,
            queues=self.gateway.queue_report,
            worker=worker or 0,
            usage_of=self.usage.usage,
            activity=self.activity,
            clock=reactor,
            placement=self.placement.stats,
        )
        # The live feed shows a change of configuration or health at once.
        feed = self.admin.feed
        registry.subscribe(lambda _catalog: feed.soon())
        self.root = Root(self.admin.resource(), metrics=metrics_page)
        #: Where each request goes: the admin API, our pages, a CORS answer, or the gateway.
        self.front_door = FrontDoor(
            self.gateway,
            self.root,
            self.gateway.body_limit,
            cors_policy=Policy.of(
                settings.cors.allowed_origins, settings.cors.admin_allowed_origins
            ),
        )
        #: The client connections: the cap, idle and slow ones swept, the drain.
        self.acceptor = Acceptor(
            self.front_door, reactor, max_connections=settings.webserver.max_connections
        )
        if self.metrics is not None:
            self.metrics.watch_connections(self.acceptor)
        sweeper = TimerService(STICKY_SWEEP_SECONDS, self._sweep_pins)
        sweeper.clock = reactor
        sweeper.setServiceParent(self)
        # Other instances (or workers) on the same database: their changes reach us too.
        reload_interval = settings.database.reload_interval_ms / 1000
        if self.shared_port:
            # Sibling workers write to the same database; follow them within a second.
            reload_interval = min(reload_interval, 1.0)
        follower = ConfigFollower(registry=self.registry, clock=reactor, interval=reload_interval)
        follower.setServiceParent(self)
        self.port_number = settings.webserver.port if port is None else port
        self.interface = listen_interface(settings.webserver.hostname)
        self.listening: IListeningPort | None = None
        self.log_observer = log_observer

    def _forget_deleted(self, catalog: Catalog) -> None:
        self.runtime.forget_all_but(catalog.backends)

    def _health_changed(self, backend: Backend, healthy: bool) -> None:
        self.inventory.health_changed(backend, healthy)
        self.gateway.backend_available(backend, healthy)
        self.admin.feed.soon()

    def _preload_started(self, backend: Backend) -> None:
        """A preload started: requests queued for its model may wait for the load there."""
        self.gateway.backend_available(backend, True)

    def _preloaded(self, backend: Backend, model: str) -> None:
        """A preload finished: the model is warm there, and queued requests may use it."""
        self.inventory.learned(backend.identifier, model)
        self.gateway.backend_available(backend, True)

    def _back_in_rotation(self, backend: Backend) -> None:
        """A backend that failed a request passed a check: queued requests may use it again."""
        self.gateway.backend_available(backend, True)

    def _sweep_pins(self) -> None:
        self.gateway.router.pins.sweep(self.reactor_time.seconds())

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd, the application's log observer is ours (level, console, file)."""
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            self.listening = self.listen(
                self.reactor,
                self.port_number,
                self.acceptor,
                backlog=LISTEN_BACKLOG,
                interface=self.interface,
            )
        except (CannotListenError, OSError) as e:
            reason = e.socketError if isinstance(e, CannotListenError) else e.strerror
            raise SystemExit(
                f"ollamaflow: cannot listen on {self.interface}:{self.port_number}: {reason}"
            ) from None
        super().privilegedStartService()

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        for warning in self.loaded.warnings:
            log.warn("settings {path}: {warning}", path=str(self.loaded.path), warning=warning)
        address = self.address
        log.info(
            "OllamaFlow listening on http://{host}:{port}/ (admin API under /v1.0/), database {db}",
            host=address.host,
            port=address.port,
            db=self._database_description(),
        )
        super().startService()

    def _database_description(self) -> str:
        if self.loaded.database_driver is DatabaseDriver.POSTGRESQL:
            return "PostgreSQL " + describe_postgresql(
                postgresql_conninfo(
                    self.loaded.settings.database.url, **self.loaded.postgresql_params()
                )
            )
        return f"SQLite {self.loaded.database_path}"

    @property
    def address(self) -> Any:
        assert self.listening is not None, "not listening"
        return self.listening.getHost()

    async def _stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to DrainTimeoutMs), then stop.
        Stopped by SIGTERM with nothing cut off, the process then exits 0, not as killed by
        the signal (which twistd re-raises; ``docker stop`` reports 143 as a failure)."""
        if self.listening is not None:
            await maybeDeferred(self.listening.stopListening)
            self.listening = None
        self.admin.feed.close()  # dashboards' streams never end by themselves
        clean = await self.drain(self.loaded.settings.drain_timeout_ms / 1000)
        await super().stopService()
        await self.gateway.close()
        await self.services_pool.closeCachedConnections()
        await self.store.close()
        if clean and forget_exit_signal(self.reactor, signal.SIGTERM):
            log.info("stopped on SIGTERM after a clean drain; exit status 0")

    async def drain(self, seconds: float) -> bool:
        """Refuse new requests on open connections and wait for those in flight; whether they
        all finished in time (none had to be cut off)."""
        gateway = self.gateway
        gateway.draining = True
        self.acceptor.drain()
        clock = self.reactor_time
        deadline = clock.seconds() + seconds
        if gateway.exchanges:
            log.info("draining {count} requests in flight", count=len(gateway.exchanges))
        while gateway.exchanges and clock.seconds() < deadline:
            await task.deferLater(clock, 0.05, lambda: None)
        if gateway.exchanges:
            log.warn(
                "{count} requests still in flight after {seconds}s; cutting them off",
                count=len(gateway.exchanges),
                seconds=seconds,
            )
            for exchange in list(gateway.exchanges):
                exchange.abort()
            return False
        return True

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
