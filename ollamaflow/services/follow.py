"""Keeping this instance's configuration in step with a database other instances write to.

Several OllamaFlow instances (or worker processes) can share one database; each serves from its
own in-memory catalog. The :class:`ConfigFollower` brings that catalog up to the database's
newest generation:

- at once, when the store can announce commits (PostgreSQL LISTEN/NOTIFY): every write
  transaction of every instance announces its generation on commit, and the follower refreshes
  when it hears one newer than its own;
- every ``interval`` seconds, whatever the database: a cheap ``generation()`` query, and a
  refresh if it moved. This is the safety net for notifications missed while the LISTEN
  connection was down, and the only way to notice other processes on one SQLite file.

Only the configuration is shared; health, in-flight counts, sticky pins and queues stay per
instance. A database that goes away never stops routing: the catalog simply stays as it was,
the follower logs the outage once, keeps trying (LISTEN with backoff), and catches up when the
database is back.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ollamaflow.catalog import Registry
from ollamaflow.store import StoreClosed, StoreUnavailable, Subscription

log = Logger()

#: Seconds between generation checks unless told otherwise (settings: Database.ReloadIntervalMs).
RELOAD_SECONDS = 5.0
#: First and longest wait before connecting the LISTEN connection again after losing it.
MIN_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 5.0

#: The name the follower has among the daemon's services (``daemon.getServiceNamed``).
SERVICE_NAME = "config-follower"


class ConfigFollower(Service):
    """Refreshes ``registry`` whenever the database holds a newer generation than it serves.

    ``listen`` uses the store's change notifications when it has them (an accelerator: the
    periodic check alone is correct, only slower). Never raises out of its loops.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        clock: IReactorTime,
        interval: float = RELOAD_SECONDS,
        listen: bool = True,
        min_backoff: float = MIN_BACKOFF_SECONDS,
        max_backoff: float = MAX_BACKOFF_SECONDS,
    ) -> None:
        self.name = SERVICE_NAME
        self.registry = registry
        self.clock = clock
        self.interval = interval
        self.listen = listen and registry.store.can_listen
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        #: Refreshes this follower published (for tests and logs).
        self.refreshes = 0
        self._backoff = min_backoff
        self._loop: LoopingCall | None = None
        self._subscription: Subscription | None = None
        self._connecting: Deferred[None] | None = None
        self._reconnect: IDelayedCall | None = None
        self._working: Deferred[None] | None = None
        self._wanted = False
        self._outage: str | None = None
        self._listen_failing = False

    @property
    def listening(self) -> bool:
        """Whether a LISTEN connection is open right now."""
        return self._subscription is not None and self._subscription.open

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.poke)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("configuration reload loop stopped", f)
        )
        if self.listen:
            self._connect()

    def stopService(self) -> Deferred[None]:
        """Stop checking and listening; waits for a refresh in progress (never for a connect)."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._reconnect is not None and self._reconnect.active():
            self._reconnect.cancel()
        self._reconnect = None
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        working = [self._working] if self._working is not None else []
        return DeferredList(working, consumeErrors=True).addCallback(lambda _: None)

    # -- catching up -------------------------------------------------------------------------

    def poke(self, announced: int | None = None) -> None:
        """Catch up with the database, unless ``announced`` (a generation someone committed) is
        one we already serve. Coalesces: while a pass runs, at most one more is queued."""
        if not self.running:
            return
        if announced is not None and announced <= self.registry.catalog.generation:
            return  # our own write (already refreshed by the registry), or an old one
        self._wanted = True
        if self._working is None:
            working = Deferred.fromCoroutine(self._work())
            if not working.called:  # it may have finished already (a synchronous failure)
                self._working = working

    async def _work(self) -> None:
        try:
            while self._wanted and self.running:
                self._wanted = False
                await self._catch_up()
        finally:
            self._working = None

    async def _catch_up(self) -> None:
        """One pass: compare generations and refresh if the database is ahead. Never raises."""
        store = self.registry.store
        try:
            generation = await store.generation()
            if generation > self.registry.catalog.generation:
                before = self.registry.catalog.generation
                catalog = await self.registry.refresh()
                self.refreshes += 1
                log.info(
                    "configuration reloaded: generation {before} -> {after}",
                    before=before,
                    after=catalog.generation,
                )
        except StoreUnavailable as e:
            self._database_down(str(e))
            return
        except StoreClosed:
            return
        except Exception:
            log.failure("reloading the configuration failed")
            return
        self._database_up()

    def _database_down(self, reason: str) -> None:
        if self._outage is None:
            log.warn(
                "{reason}; routing continues on configuration generation {generation}",
                reason=reason,
                generation=self.registry.catalog.generation,
            )
        self._outage = reason

    def _database_up(self) -> None:
        if self._outage is not None:
            log.info("the configuration database is reachable again")
        self._outage = None

    # -- the LISTEN connection ---------------------------------------------------------------

    def _connect(self) -> None:
        self._reconnect = None
        if self.running and self._connecting is None and self._subscription is None:
            connecting = Deferred.fromCoroutine(self._subscribe())
            if not connecting.called:
                self._connecting = connecting

    async def _subscribe(self) -> None:
        try:
            subscription = await self.registry.store.listen(self.poke, self._lost)
        except Exception as e:
            self._connecting = None
            if not isinstance(e, StoreUnavailable | StoreClosed):
                log.failure("listening for configuration changes failed")
            elif not self._listen_failing:
                log.warn("cannot listen for configuration changes: {reason}", reason=str(e))
            self._listen_failing = True
            self._retry()
            return
        self._connecting = None
        if not self.running:
            subscription.close()
            return
        self._subscription = subscription
        self._backoff = self.min_backoff
        if self._listen_failing:
            log.info("listening for configuration changes again")
        self._listen_failing = False
        # Whatever was committed while we were not listening is caught up with now.
        self.poke()

    def _lost(self, reason: str) -> None:
        """The LISTEN connection broke: catch up and connect again, after a backoff."""
        self._subscription = None
        if not self.running:
            return
        log.warn("lost the configuration change listener: {reason}", reason=reason)
        self._listen_failing = True
        self.poke()
        self._retry()

    def _retry(self) -> None:
        if not self.running or not self.listen:
            return
        delay, self._backoff = self._backoff, min(self._backoff * 2, self.max_backoff)
        self._reconnect = self.clock.callLater(delay, self._connect)
