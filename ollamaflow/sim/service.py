"""Start and stop simulators: in-process for tests and benchmarks, or as a twistd service."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ollamaflow.sim.config import DEFAULT_MODELS, SimConfig
from ollamaflow.sim.control import ControlAPI
from ollamaflow.sim.counters import Counters
from ollamaflow.sim.server import SimResource, SimSite
from ollamaflow.sim.state import SimState

_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_log = Logger()


@attrs.define(eq=False)
class RunningSimulator:
    """A listening simulator: its address, live knobs and counters; `stop()` it when done."""

    tcp: IReactorTCP
    clock: IReactorTime
    state: SimState
    site: SimSite
    interface: str
    port: int
    control: ControlAPI
    _listening: IListeningPort | None = None
    _refuse_timer: IDelayedCall | None = None
    _lock: DeferredLock = attrs.Factory(DeferredLock)
    _stopped: bool = False

    @property
    def url(self) -> str:
        """`http://host:port`, ready for a client's `host=`."""
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"http://{host or '127.0.0.1'}:{self.port}"

    @property
    def config(self) -> SimConfig:
        """The live knobs; assigning attributes takes effect at once (except `refuse`)."""
        return self.state.config

    @property
    def counters(self) -> Counters:
        return self.state.counters

    @property
    def listening(self) -> bool:
        """False while the `refuse` fault holds."""
        return self._listening is not None

    async def configure(self, **knobs: Any) -> None:
        """Validate and apply knobs as `/_sim/config` does; waits for `refuse` to take effect."""
        applied = self.state.config.patch(knobs)
        if "refuse" in applied or "refuse_seconds" in applied:
            await self.apply_refuse()

    async def stop(self) -> None:
        """Stop listening, drop every connection, cancel every timer; wait until all are gone."""
        self._stopped = True
        self._cancel_refuse_timer()
        await self._lock.run(self._stop_listening)
        self.site.drop_connections(abort=True)
        self.state.scheduler.close()
        for _ in range(100):
            if not self.site.channels:
                break
            await deferLater(self.clock, 0, lambda: None)

    def config_changed(self, applied: dict[str, Any]) -> None:
        """`/_sim/config` hook: apply `refuse` after the control response went out."""
        if "refuse" in applied or "refuse_seconds" in applied:
            self.clock.callLater(0, self.apply_refuse)

    def apply_refuse(self) -> Deferred[None]:
        """Stop or start listening as the `refuse` knobs say, one change at a time."""
        return self._lock.run(self._apply_refuse)

    def _apply_refuse(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refuse_or_listen())

    async def _refuse_or_listen(self) -> None:
        if self._stopped:
            return
        config = self.state.config
        self._cancel_refuse_timer()
        if config.refuse:
            await self._stop_listening()
            self.site.drop_connections(abort=False)
            if config.refuse_seconds > 0:
                self._refuse_timer = self.clock.callLater(config.refuse_seconds, self._end_refusal)
        elif self._listening is None:
            self._listening = self.tcp.listenTCP(
                self.port,
                self.site,  # type: ignore[arg-type]
                interface=self.interface,
            )

    def _end_refusal(self) -> None:
        self._refuse_timer = None
        self.state.config.refuse = False
        self.apply_refuse()

    def _stop_listening(self) -> Deferred[None]:
        port, self._listening = self._listening, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return stopped if isinstance(stopped, Deferred) else succeed(None)

    def _cancel_refuse_timer(self) -> None:
        if self._refuse_timer is not None and self._refuse_timer.active():
            self._refuse_timer.cancel()
        self._refuse_timer = None


def listen_simulator(
    reactor: Any,
    *,
    port: int = 0,
    interface: str = "127.0.0.1",
    config: SimConfig | None = None,
    models: Iterable[str] = DEFAULT_MODELS,
) -> RunningSimulator:
    """Build a simulator and start listening now; `reactor` provides IReactorTCP and IReactorTime.

    `refuse` in `config` is not applied here; `start_simulator` applies it.
    """
    config = config if config is not None else SimConfig()
    state = SimState.create(reactor, config, tuple(models))
    control = ControlAPI(state)
    resource = SimResource(state, control, loopback=interface in _LOOPBACK)
    site = SimSite(resource, reactor=reactor)
    listening = reactor.listenTCP(port, site, interface=interface)
    sim = RunningSimulator(
        tcp=reactor,
        clock=reactor,
        state=state,
        site=site,
        interface=interface,
        port=listening.getHost().port,
        control=control,
        listening=listening,
    )
    control.on_change = sim.config_changed
    return sim


async def start_simulator(
    reactor: Any,
    *,
    port: int = 0,
    interface: str = "127.0.0.1",
    config: SimConfig | None = None,
    models: Iterable[str] = DEFAULT_MODELS,
) -> RunningSimulator:
    """Start a simulator (port 0: any free port); return once `config` (even `refuse`) holds."""
    sim = listen_simulator(reactor, port=port, interface=interface, config=config, models=models)
    if sim.config.refuse:
        await sim.apply_refuse()
    return sim


class SimulatorService(Service):
    """A twistd service running one simulator."""

    def __init__(
        self,
        reactor: Any,
        *,
        port: int,
        interface: str,
        config: SimConfig,
        models: Iterable[str],
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.sim_config = config
        self.models = tuple(models)
        self.simulator: RunningSimulator | None = None

    def startService(self) -> None:
        super().startService()
        self.simulator = listen_simulator(
            self.reactor,
            port=self.port,
            interface=self.interface,
            config=self.sim_config,
            models=self.models,
        )
        _log.info(
            "ollamaflow-sim listening on {url} with {models}",
            url=self.simulator.url,
            models=", ".join(m.name for m in self.simulator.state.catalog),
        )
        if self.sim_config.refuse:
            self.simulator.apply_refuse()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.simulator is None:
            return None
        simulator, self.simulator = self.simulator, None
        return Deferred.fromCoroutine(simulator.stop())
