"""``twistd -n ollamaflow --demo``: a fleet to look at on a fresh machine.

Two simulated Ollama servers paced like small GPUs run in the daemon's own process, behind a
daemon whose settings and SQLite database live in a throwaway folder (an existing
configuration is never read or written), and a few clients keep streaming through its main
port so the dashboard's charts move. It prints the dashboard's URL and a fresh admin token,
and removes the folder when it stops.
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from treq.client import HTTPClient
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from ollamaflow.catalog import Registry
from ollamaflow.daemon import Daemon
from ollamaflow.jsonfields import to_wire
from ollamaflow.records import Backend, LoadBalancing
from ollamaflow.server.interfaces import ListenFunction
from ollamaflow.settings import Logging, Settings, Webserver
from ollamaflow.sim.config import SimConfig
from ollamaflow.sim.service import SimulatorService

if TYPE_CHECKING:
    from ollamaflow.tap import Options

log = Logger()

#: The daemon's usual port: the demo takes it when it is free, any free port when it is not.
DEFAULT_PORT = Webserver().port
SETTINGS_FILE = "ollamaflow.json"
#: The database a new settings file names, beside it.
DATABASE_FILE = Settings().database_filename
#: What a new database starts with (``store.rows.open_database``): replaced by the demo's boxes.
SEEDED_FRONTEND = "frontend1"
SEEDED_BACKEND = "backend1"


def demo_settings(token: str, port: int = DEFAULT_PORT) -> Settings:
    """The demo's settings: loopback only, one admin token of its own, warnings only on the
    console (the access log would bury the URL), and health checks every second so a stopped
    box shows at once."""
    return Settings(
        webserver=Webserver(hostname="127.0.0.1", port=port, max_connections=256),
        database_filename=DATABASE_FILE,
        admin_bearer_tokens=(token,),
        logging=Logging(console_logging=True, minimum_severity=2),
        health_check_interval_ms=1000,
        health_check_timeout_ms=1000,
        model_refresh_interval_ms=5000,
        drain_timeout_ms=5000,
    )


def new_token() -> str:
    """A random admin token for this run only."""
    return secrets.token_hex(16)


def make_folder() -> Path:
    """A new private folder under the system's temporary directory."""
    return Path(tempfile.mkdtemp(prefix="ollamaflow-demo-"))


@attrs.frozen
class Throwaway:
    """The demo's folder: its settings file and (once the store is prepared) the SQLite
    database beside it; removed when the demo stops."""

    folder: Path
    token: str

    @property
    def settings_path(self) -> Path:
        return self.folder / SETTINGS_FILE

    @classmethod
    def create(
        cls,
        make_folder: Callable[[], Path] = make_folder,
        new_token: Callable[[], str] = new_token,
    ) -> Throwaway:
        """A new folder holding the demo's settings file (blocking: before the reactor runs)."""
        made = cls(make_folder(), new_token())
        settings = to_wire(demo_settings(made.token))
        made.settings_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return made


def preferring(listen: ListenFunction, fallback: int = 0) -> ListenFunction:
    """``listen`` on the port asked for or, when it is taken (a real daemon may hold 43411),
    on ``fallback`` (0: any free port)."""

    def listen_or_fall_back(
        reactor: Any, port: int, factory: ServerFactory, *, backlog: int, interface: str
    ) -> IListeningPort:
        try:
            return listen(reactor, port, factory, backlog=backlog, interface=interface)
        except CannotListenError:
            return listen(reactor, fallback, factory, backlog=backlog, interface=interface)

    return listen_or_fall_back


# -- the fleet ----------------------------------------------------------------------------------


@attrs.frozen
class Box:
    """One simulated GPU server: its backend record's names, its models and its pace."""

    identifier: str
    name: str
    models: tuple[str, ...]
    tokens_per_second: float
    #: Seconds to the first token once a slot is free.
    ttft: float
    #: Seconds to load a model that is not loaded.
    load_time: float

    def sim_config(self) -> SimConfig:
        """The simulator's knobs: two requests at once per model, pulls of several seconds."""
        return SimConfig(
            tokens=160,
            tokens_per_second=self.tokens_per_second,
            ttft=self.ttft,
            load_time=self.load_time,
            num_parallel=2,
            pull_time=8.0,
            push_time=4.0,
            create_time=3.0,
        )

    def backend(self, port: int) -> Backend:
        """Its backend record, for the simulator listening on ``port``: checked every second
        (the settings say), in or out of rotation after one check."""
        return Backend(
            identifier=self.identifier,
            name=self.name,
            hostname="127.0.0.1",
            port=port,
            healthy_threshold=1,
            unhealthy_threshold=1,
            model_parallel_requests=2,
            labels=("demo",),
        )


#: Two small GPUs; mistral is only on the second, so the models matrix shows a difference.
BOXES = (
    Box("gpu-1", "GPU box 1", ("llama3", "phi3"), tokens_per_second=30.0, ttft=0.4, load_time=2.5),
    Box(
        "gpu-2",
        "GPU box 2",
        ("llama3", "phi3", "mistral"),
        tokens_per_second=45.0,
        ttft=0.25,
        load_time=2.0,
    ),
)


def fleet_models(boxes: Sequence[Box]) -> tuple[str, ...]:
    """Every model some box has, in order of first appearance."""
    return tuple(dict.fromkeys(model for box in boxes for model in box.models))


async def seed_fleet(registry: Registry, boxes: Sequence[Box], ports: Sequence[int]) -> None:
    """Replace a new database's backend1 with the boxes (on ``ports``), all serving
    frontend1: through the registry, as the admin API writes."""
    for box, port in zip(boxes, ports, strict=True):
        await registry.create_backend(box.backend(port))
    frontend = registry.catalog.frontends[SEEDED_FRONTEND]
    await registry.replace_frontend(
        attrs.evolve(
            frontend,
            name="Demo fleet",
            backends=tuple(box.identifier for box in boxes),
            load_balancing=LoadBalancing.LEAST_OUTSTANDING,
        )
    )
    if SEEDED_BACKEND in registry.catalog.backends:
        await registry.delete_backend(SEEDED_BACKEND)


# -- the clients --------------------------------------------------------------------------------

_PROMPTS = (
    "Why is the sky blue?",
    "Write a haiku about load balancers.",
    "Summarise the plot of Hamlet in three sentences.",
    "What is a good name for a cat that likes servers?",
    "Explain backpressure to a five-year-old.",
    "List three uses for a paperclip.",
)


@attrs.frozen
class Ask:
    """One client request of the trickle: the path and the JSON body."""

    path: str
    body: Mapping[str, Any]


def next_ask(rng: random.Random, models: Sequence[str]) -> Ask:
    """A streaming chat or generate request for a random model, of a random length."""
    model = rng.choice(models)
    prompt = rng.choice(_PROMPTS)
    body: dict[str, Any] = {"model": model, "stream": True}
    body["options"] = {"num_predict": rng.randint(30, 150)}
    if rng.random() < 0.5:
        return Ask("/api/chat", body | {"messages": [{"role": "user", "content": prompt}]})
    return Ask("/api/generate", body | {"prompt": prompt})


#: Sends one request and reads its answer to the end; raises if it was not a success.
Send = Callable[[Ask], Awaitable[object]]


class _Drain(Protocol):
    """Reads a response body to its end, keeping nothing; cancelling ``done`` closes the
    connection (the daemon then sees the client go)."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)

    def _cancel(self, _done: Deferred[None]) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class TrafficError(Exception):
    """A request of the trickle was not answered 200 (no box healthy, say)."""


def through_daemon(http: Any, base_url: Callable[[], str]) -> Send:
    """A :data:`Send` over ``http`` (a treq client) to the daemon at ``base_url()``."""

    async def send(ask: Ask) -> None:
        response = await http.post(base_url() + ask.path, json=dict(ask.body), unbuffered=True)
        body = _Drain()
        response.deliverBody(body)
        await body.done
        if response.code != 200:
            raise TrafficError(f"{ask.path}: HTTP {response.code}")

    return send


def treq_client(reactor: Any) -> HTTPClient:
    """A treq client on connections of its own, one per request (nothing idle to close)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, connectTimeout=5.0, pool=pool))


class Trickle(Service):
    """A few clients, each sending one request at a time with pauses between: never more than
    ``clients`` requests in flight. Stopping cancels the pauses and the requests in flight."""

    def __init__(
        self,
        *,
        send: Send,
        clock: IReactorTime,
        models: Sequence[str],
        rng: random.Random,
        clients: int = 3,
        pause: tuple[float, float] = (1.0, 4.0),
        after_error: float = 3.0,
    ) -> None:
        self.send = send
        self.clock = clock
        self.models = tuple(models)
        self.rng = rng
        self.clients = clients
        self.pause = pause
        self.after_error = after_error
        #: Requests sent and not answered yet.
        self.in_flight = 0
        #: Requests answered 200 and read to the end.
        self.answered = 0
        self._loops: list[Deferred[None]] = []

    def startService(self) -> None:
        super().startService()
        self._loops = [Deferred.fromCoroutine(self._client()) for _ in range(self.clients)]

    def stopService(self) -> Deferred[None]:
        super().stopService()
        loops, self._loops = self._loops, []
        for loop in loops:
            loop.cancel()
        return DeferredList(loops, consumeErrors=True).addCallback(lambda _: None)

    async def _client(self) -> None:
        try:
            while self.running:
                await deferLater(self.clock, self.rng.uniform(*self.pause))
                answered = await self._one(next_ask(self.rng, self.models))
                if not answered and self.running:
                    await deferLater(self.clock, self.after_error)
        except CancelledError:
            pass

    async def _one(self, ask: Ask) -> bool:
        """Send ``ask``; whether it was answered."""
        self.in_flight += 1
        try:
            await self.send(ask)
        except CancelledError:
            raise
        except Exception as e:  # cancelled before the answer began, treq wraps it: stopped
            if self.running:
                log.debug("demo traffic: {path} failed: {error}", path=ask.path, error=str(e))
            return False
        finally:
            self.in_flight -= 1
        self.answered += 1
        return True


# -- the whole ----------------------------------------------------------------------------------


def banner_lines(url: str, token: str, folder: Path) -> list[str]:
    """What the demo prints once it serves: where to look, the token to use, what is removed."""
    return [
        f"OllamaFlow demo: open {url}dashboard/ (two simulated GPU boxes, some traffic)",
        f"Admin token: {token}",
        f"Throwaway settings and database in {folder} (removed when this stops: Ctrl-C)",
    ]


def remove_folder(folder: Path) -> Deferred[None]:
    """Remove the demo's folder in a thread (the reactor keeps serving the shutdown)."""
    return deferToThread(shutil.rmtree, folder, True)


class Demo(MultiService):
    """The simulators, the daemon and the trickle of clients, started in that order (the
    daemon once its database names the simulators, the clients once it serves) and stopped in
    reverse; then the throwaway folder is removed."""

    def __init__(
        self,
        *,
        daemon: Daemon,
        throwaway: Throwaway,
        reactor: Any,
        announce: Callable[[Sequence[str]], None],
        boxes: Sequence[Box] = BOXES,
        send: Send | None = None,
        rng: random.Random | None = None,
        remove: Callable[[Path], Awaitable[object]] = remove_folder,
        stop_reactor: Callable[[], object] | None = None,
    ) -> None:
        """``send`` makes the clients' requests (by default through the daemon's main port);
        ``stop_reactor`` is called if the fleet cannot be set up."""
        super().__init__()
        self.daemon = daemon
        self.throwaway = throwaway
        self.announce = announce
        self.boxes = tuple(boxes)
        self.remove = remove
        self.stop_reactor = stop_reactor or reactor.stop
        self.simulators = [
            SimulatorService(
                reactor,
                port=0,
                interface="127.0.0.1",
                config=box.sim_config(),
                models=box.models,
            )
            for box in self.boxes
        ]
        for box, simulator in zip(self.boxes, self.simulators, strict=True):
            simulator.setName(box.identifier)
            simulator.setServiceParent(self)
        daemon.setName("daemon")
        daemon.setServiceParent(self)
        self.traffic = Trickle(
            send=send or through_daemon(treq_client(reactor), lambda: self.url),
            clock=reactor,
            models=fleet_models(self.boxes),
            rng=rng or random.Random(),
        )
        self.traffic.setName("traffic")
        self.traffic.setServiceParent(self)
        self._starting: Deferred[None] | None = None

    @property
    def url(self) -> str:
        """The daemon's base URL, ending in ``/`` (once it listens)."""
        return f"http://127.0.0.1:{self.daemon.address.port}/"

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd the daemon's log observer is the application's, as when it runs alone."""
        observer = self.daemon.log_observer
        if observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        """The daemon listens (before the reactor runs); if it cannot, the folder goes now."""
        try:
            super().privilegedStartService()
        except BaseException:
            shutil.rmtree(self.throwaway.folder, ignore_errors=True)
            raise

    def startService(self) -> None:
        Service.startService(self)  # the children start in order, in _start
        self._starting = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        for simulator in self.simulators:
            simulator.startService()
        ports = [_port_of(simulator) for simulator in self.simulators]
        try:
            await seed_fleet(self.daemon.registry, self.boxes, ports)
        except Exception:
            log.failure("the demo cannot set up its fleet; stopping")
            self.daemon.startService()  # so that stopping it closes what it opened
            self.stop_reactor()
            return
        self.daemon.startService()
        if not self.running:  # stopped while the database was being written
            return
        self.traffic.startService()
        self.announce(banner_lines(self.url, self.throwaway.token, self.throwaway.folder))

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None:
            try:
                await self._starting
            except Exception:
                log.failure("starting the demo failed")
        for service in [self.traffic, self.daemon, *reversed(self.simulators)]:
            if service.running:
                try:
                    await maybeDeferred(service.stopService)
                except Exception:
                    log.failure("stopping {service} failed", service=service.name)
        await self.remove(self.throwaway.folder)


def _port_of(simulator: SimulatorService) -> int:
    assert simulator.simulator is not None, "started"
    return simulator.simulator.port


# -- from twistd --------------------------------------------------------------------------------


def announcer(options: Options) -> Callable[[Sequence[str]], None]:
    """Where the banner goes: plain lines on stdout in the foreground (this stdout, before
    twistd sends it to the log), the log when daemonized (stdout is gone then)."""
    from ollamaflow.tap import in_foreground

    if not in_foreground(options):

        def to_log(lines: Sequence[str]) -> None:
            for line in lines:
                log.warn("{line}", line=line)

        return to_log
    stdout = sys.stdout

    def to_stdout(lines: Sequence[str]) -> None:
        stdout.write("".join(line + "\n" for line in lines))
        stdout.flush()

    return to_stdout


def daemon_options(options: Options, settings: Path) -> Options:
    """``options`` for the daemon itself: the demo's settings file, one process, no demo."""
    from ollamaflow.tap import Options

    inner = Options()
    inner.update(options)
    inner.update({"config": str(settings), "worker": None, "demo": False})
    inner.parent = getattr(options, "parent", None)  # twistd's own: foreground or not
    return inner


def config_ignored(options: Options, folder: Path) -> str | None:
    """The warning for a ``--config`` given with ``--demo``: ignored, never read or written
    (the demo's own settings are elsewhere); None when none was given."""
    if options["config"] == options.defaults["config"]:
        return None
    return f"--config {options['config']} ignored: the demo runs on throwaway settings in {folder}"


def make_demo(
    options: Options,
    make_service: Callable[[Options], IService],
    *,
    create: Callable[[], Throwaway] = Throwaway.create,
) -> Demo:
    """The demo service for ``twistd ollamaflow --demo``: the daemon is built by
    ``make_service`` (``tap.makeService``) on throwaway settings, and listens on 43411 if it
    is free. A ``--config`` is ignored with a warning (see :func:`config_ignored`)."""
    throwaway = create()
    try:
        daemon = make_service(daemon_options(options, throwaway.settings_path))
    except BaseException:
        shutil.rmtree(throwaway.folder, ignore_errors=True)
        raise
    assert isinstance(daemon, Daemon), daemon
    warning = config_ignored(options, throwaway.folder)
    if warning is not None:
        log.warn("{warning}", warning=warning)
    daemon.listen = preferring(daemon.listen)
    from twisted.internet import reactor

    return Demo(daemon=daemon, throwaway=throwaway, reactor=reactor, announce=announcer(options))
