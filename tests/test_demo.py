"""``twistd -n ollamaflow --demo``: throwaway settings, two simulated boxes, a trickle of
clients; its parts alone, the whole in-process, and the real command from an installed venv."""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from harness import Http, until
from installed import Twistd, twistd_fixture  # noqa: F401
from listening import port_number
from logcapture import keeping
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.web.client import ResponseNeverReceived

from ollamaflow import tcp
from ollamaflow.daemon import Daemon
from ollamaflow.demo import (
    BOXES,
    DEFAULT_PORT,
    Ask,
    Demo,
    Throwaway,
    Trickle,
    banner_lines,
    config_ignored,
    daemon_options,
    fleet_models,
    make_demo,
    new_token,
    next_ask,
    preferring,
)
from ollamaflow.settings import DatabaseDriver, load_settings
from ollamaflow.store import Store
from ollamaflow.tap import Options
from ollamaflow.utctime import utc_clock

# -- the settings and the folder ----------------------------------------------------------------


def throwaway_in(folder: Path, token: str = "demo-token") -> Throwaway:
    """The demo's folder at ``folder`` (instead of a new one in the temporary directory)."""

    def make() -> Path:
        folder.mkdir()
        return folder

    return Throwaway.create(make_folder=make, new_token=lambda: token)


def test_the_settings_it_writes(tmp_path: Path) -> None:
    """Loopback on the usual port, its own token, checks every second, its database beside the
    settings file: what the daemon loads without a warning."""
    made = throwaway_in(tmp_path / "demo", "s3cret")
    assert sorted(p.name for p in made.folder.iterdir()) == ["ollamaflow.json"]
    wire = json.loads(made.settings_path.read_text())
    assert wire["Webserver"]["Hostname"] == "127.0.0.1"
    assert wire["HealthCheckIntervalMs"] == 1000
    loaded = load_settings(made.settings_path)
    settings = loaded.settings
    assert not loaded.created and loaded.warnings == ()
    assert (settings.webserver.hostname, settings.webserver.port) == ("127.0.0.1", 43411)
    assert settings.admin_bearer_tokens == ("s3cret",)
    assert settings.health_check_interval_ms == 1000
    assert settings.health_check_timeout_ms <= 1000
    assert settings.workers == 1
    assert loaded.database_driver is DatabaseDriver.SQLITE
    assert loaded.database_path == (made.folder / "ollamaflow.db").resolve()
    assert settings.logging.minimum_severity == 2, "warnings only: the banner stays in sight"


def test_a_new_folder_and_token_each_time() -> None:
    made = [Throwaway.create(), Throwaway.create()]
    try:
        assert made[0].folder != made[1].folder
        assert made[0].token != made[1].token and len(made[0].token) >= 32
        for one in made:
            assert one.folder.parent == Path(tempfile.gettempdir())
            assert one.folder.name.startswith("ollamaflow-demo-")
            assert load_settings(one.settings_path).settings.admin_bearer_tokens == (one.token,)
    finally:
        for one in made:
            shutil.rmtree(one.folder)
    assert new_token() != new_token()


def test_a_config_given_is_ignored_and_said_so(tmp_path: Path) -> None:
    def parsed(*args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    assert config_ignored(parsed("--demo"), tmp_path) is None
    assert config_ignored(parsed("start", "--demo"), tmp_path) is None
    warning = config_ignored(parsed("start", "--demo", "--config", "/etc/of.json"), tmp_path)
    assert (
        warning
        == f"--config /etc/of.json ignored: the demo runs on throwaway settings in {tmp_path}"
    )


@pytest.mark.parametrize(
    ("args", "demo"),
    [
        ([], False),
        (["start"], False),
        (["--demo"], True),
        (["start", "--demo"], True),
        (["--demo", "start"], True),
        (["--config", "a.json", "start", "--demo"], True),
    ],
)
def test_the_demo_flag_on_either_side_of_start(args: list[str], demo: bool) -> None:
    options = Options()
    options.parseOptions(args)
    assert bool(options["demo"]) is demo


def test_the_daemon_options_name_the_demo_settings(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--config", "mine.json", "--worker", "2", "--demo"])
    twistd_options = ServerOptions()
    twistd_options["nodaemon"] = True
    options.parent = twistd_options
    inner = daemon_options(options, tmp_path / "ollamaflow.json")
    assert (inner["config"], inner["worker"], inner["demo"]) == (
        str(tmp_path / "ollamaflow.json"),
        None,
        False,
    )
    assert inner.parent is twistd_options, "foreground or not, as twistd was told"
    assert options["config"] == "mine.json", "the options given are left as they are"


def test_a_daemon_that_cannot_be_made_leaves_no_folder(tmp_path: Path) -> None:
    def refuse(_options: Options) -> Any:
        raise SystemExit("ollamaflow: no")

    options = Options()
    options.parseOptions(["--demo"])
    with pytest.raises(SystemExit, match="ollamaflow: no"):
        make_demo(options, refuse, create=lambda: throwaway_in(tmp_path / "demo"))
    assert not (tmp_path / "demo").exists()


def test_the_banner() -> None:
    lines = banner_lines("http://127.0.0.1:5555/", "tok", Path("/tmp/ollamaflow-demo-x"))
    assert len(lines) == 3
    assert "http://127.0.0.1:5555/dashboard/" in lines[0]
    assert lines[1] == "Admin token: tok"
    assert "/tmp/ollamaflow-demo-x " in lines[2]


# -- the port -----------------------------------------------------------------------------------


@attrs.define
class FakeListen:
    """A listen function: ports in ``taken`` are refused as in use; every call is kept."""

    taken: frozenset[int]
    calls: list[tuple[int, str]] = attrs.field(factory=list)

    def __call__(
        self, reactor: Any, port: int, factory: ServerFactory, *, backlog: int, interface: str
    ) -> Any:
        self.calls.append((port, interface))
        if port in self.taken:
            raise CannotListenError(interface, port, OSError("Address already in use"))
        return ("listening", port)


def test_43411_when_it_is_free() -> None:
    listen = FakeListen(frozenset())
    got = preferring(listen)(None, DEFAULT_PORT, ServerFactory(), backlog=5, interface="127.0.0.1")
    assert got == ("listening", 43411)
    assert listen.calls == [(43411, "127.0.0.1")]


def test_any_free_port_when_43411_is_taken() -> None:
    """A real daemon may already listen on 43411: the demo starts all the same."""
    listen = FakeListen(frozenset({43411}))
    got = preferring(listen)(None, DEFAULT_PORT, ServerFactory(), backlog=5, interface="127.0.0.1")
    assert got == ("listening", 0)
    assert listen.calls == [(43411, "127.0.0.1"), (0, "127.0.0.1")]


def test_a_port_taken_for_real_is_passed_by() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        factory: Any = ServerFactory.forProtocol(Protocol)  # annotated as a plain Factory
        port = preferring(tcp.listen)(reactor, taken, factory, backlog=5, interface="127.0.0.1")
        try:
            assert port_number(port) not in (taken, 0)
        finally:
            port.stopListening()


# -- the fleet ----------------------------------------------------------------------------------


def test_two_small_gpus() -> None:
    """Tokens at a small GPU's pace, a few hundred ms to the first, seconds to load a model
    and to pull one, two requests at once per model."""
    assert [box.identifier for box in BOXES] == ["gpu-1", "gpu-2"]
    assert [box.name for box in BOXES] == ["GPU box 1", "GPU box 2"]
    for box in BOXES:
        config = box.sim_config()
        assert 20 <= config.tokens_per_second <= 60
        assert 0.1 <= config.ttft <= 1.0
        assert 1.0 <= config.load_time <= 4.0
        assert config.num_parallel == 2
        assert config.pull_time >= 3.0 and config.pull_tick > 0
        assert config.tokens >= 100, "streams long enough to watch"
        assert not (config.refuse or config.error500 or config.hang)
        assert "llama3" in box.models
    assert BOXES[0].sim_config().tokens_per_second != BOXES[1].sim_config().tokens_per_second
    everywhere = set.intersection(*(set(box.models) for box in BOXES))
    assert set(fleet_models(BOXES)) - everywhere, "a model only one box has"
    assert fleet_models(BOXES)[0] == "llama3"


def test_the_backend_records() -> None:
    backend = BOXES[1].backend(5678)
    assert (backend.identifier, backend.name) == ("gpu-2", "GPU box 2")
    assert (backend.hostname, backend.port, backend.active) == ("127.0.0.1", 5678, True)
    assert backend.healthy_threshold == backend.unhealthy_threshold == 1
    assert backend.model_parallel_requests == BOXES[1].sim_config().num_parallel


def test_the_clients_requests() -> None:
    """Streaming chat and generate requests, among every model, of various lengths."""
    models = fleet_models(BOXES)
    asks = [next_ask(random.Random(seed), models) for seed in range(200)]
    assert {ask.path for ask in asks} == {"/api/chat", "/api/generate"}
    assert {ask.body["model"] for ask in asks} == set(models)
    for ask in asks:
        assert ask.body["stream"] is True
        assert 1 <= ask.body["options"]["num_predict"] <= 160
        if ask.path == "/api/chat":
            assert ask.body["messages"][0]["role"] == "user"
        else:
            assert ask.body["prompt"]
    assert len({ask.body["options"]["num_predict"] for ask in asks}) > 10


# -- the trickle --------------------------------------------------------------------------------


@attrs.define
class FakeSend:
    """A send whose answers the test gives: ``pending`` holds each request's Deferred."""

    pending: list[tuple[Ask, Deferred[None]]] = attrs.field(factory=list)
    cancelled: list[Ask] = attrs.field(factory=list)
    #: Cancelled, fail as treq does before the answer has begun (not with CancelledError).
    wrapped: bool = False

    def __call__(self, ask: Ask) -> Deferred[None]:
        def cancel(answer: Deferred[None]) -> None:
            self.cancelled.append(ask)
            if self.wrapped:
                answer.errback(ResponseNeverReceived([Failure(CancelledError())]))

        answer: Deferred[None] = Deferred(cancel)
        self.pending.append((ask, answer))
        return answer

    def answer_first(self, error: Exception | None = None) -> None:
        _ask, answer = self.pending.pop(0)
        if error is None:
            answer.callback(None)
        else:
            answer.errback(error)


def trickle(send: FakeSend, clock: Clock) -> Trickle:
    return Trickle(
        send=send,
        clock=clock,
        models=("llama3", "phi3"),
        rng=random.Random(7),
        clients=3,
        pause=(1.0, 2.0),
        after_error=5.0,
    )


def test_never_more_than_its_clients_in_flight() -> None:
    clock, send = Clock(), FakeSend()
    clients = trickle(send, clock)
    clients.startService()
    assert clients.in_flight == 0, "each client pauses first"
    clock.advance(2.0)
    assert clients.in_flight == len(send.pending) == 3
    clock.advance(60.0)
    assert len(send.pending) == 3, "one request at a time per client"
    send.answer_first()
    assert (clients.in_flight, clients.answered) == (2, 1)
    clock.advance(2.0)
    assert clients.in_flight == len(send.pending) == 3
    assert {ask.body["model"] for ask, _ in send.pending} <= {"llama3", "phi3"}


def test_a_failed_request_pauses_its_client_longer() -> None:
    clock, send = Clock(), FakeSend()
    clients = trickle(send, clock)
    clients.startService()
    clock.advance(2.0)
    send.answer_first(RuntimeError("HTTP 503"))
    assert clients.in_flight == 2 and clients.answered == 0
    clock.advance(4.9)
    assert len(send.pending) == 2, "not before after_error"
    clock.advance(0.1)
    assert len(send.pending) == 2, "then the usual pause"
    clock.advance(2.0)
    assert len(send.pending) == 3


def test_stopping_cancels_pauses_and_requests_in_flight() -> None:
    clock, send = Clock(), FakeSend()
    clients = trickle(send, clock)
    clients.startService()
    clock.advance(2.0)
    send.answer_first()  # that client pauses again; the other two wait for answers
    stopped = clients.stopService()
    assert stopped.called
    assert len(send.cancelled) == 2
    assert clients.in_flight == 0
    assert clock.getDelayedCalls() == [], "no pause left behind"
    clock.advance(60.0)
    assert len(send.pending) == 2 and len(send.cancelled) == 2, "nothing sent after the stop"


def test_stopping_while_requests_are_sent() -> None:
    """A request cancelled before its answer began fails as treq says, not CancelledError:
    still a stop, not a failure to pause after."""
    clock, send = Clock(), FakeSend(wrapped=True)
    clients = trickle(send, clock)
    clients.startService()
    clock.advance(2.0)
    assert clients.stopService().called
    assert len(send.cancelled) == 3
    assert clients.in_flight == 0 and clients.answered == 0
    assert clock.getDelayedCalls() == []


# -- the whole, in-process ----------------------------------------------------------------------


async def unstarted_daemon(throwaway: Throwaway) -> Daemon:
    """The daemon on the demo's settings as twistd's makeService builds it (store open, nothing
    started), on any free port: ``prepare_sqlite`` is for before the reactor runs."""
    loaded = load_settings(throwaway.settings_path)
    now = utc_clock(reactor.seconds)
    store = await Store.open_sqlite(str(loaded.database_path), reactor=reactor, now=now)
    snapshot = await store.snapshot()
    return Daemon(loaded=loaded, store=store, snapshot=snapshot, reactor=reactor, port=0)


@attrs.define
class InProcess:
    demo: Demo
    printed: list[str]
    stops: list[bool]


@pytest_twisted.async_yield_fixture
async def in_process(tmp_path: Path) -> AsyncIterator[InProcess]:
    throwaway = throwaway_in(tmp_path / "demo")
    printed: list[str] = []
    stops: list[bool] = []
    demo = Demo(
        daemon=await unstarted_daemon(throwaway),
        throwaway=throwaway,
        reactor=reactor,
        announce=printed.extend,
        rng=random.Random(3),
        stop_reactor=lambda: stops.append(True),
    )
    yield InProcess(demo, printed, stops)
    if demo.running:
        await demo.stopService()


@pytest_twisted.ensureDeferred
async def test_in_process_from_start_to_stop(in_process: InProcess) -> None:
    """The boxes replace backend1, become healthy and serve the clients through the daemon's
    port; the banner names the port; stopping ends everything and removes the folder."""
    demo = in_process.demo
    demo.privilegedStartService()
    demo.startService()
    assert demo.daemon.listening is not None and not demo.daemon.running
    await until(lambda: in_process.printed, 30, "the banner")
    port = demo.daemon.address.port
    assert f"http://127.0.0.1:{port}/dashboard/" in in_process.printed[0]
    assert in_process.printed[1] == "Admin token: demo-token"
    catalog = demo.daemon.registry.catalog
    assert list(catalog.backends) == ["gpu-1", "gpu-2"]
    assert catalog.frontends["frontend1"].backends == ("gpu-1", "gpu-2")
    sims = {box.identifier: sim.simulator for box, sim in zip(BOXES, demo.simulators, strict=True)}
    for identifier, sim in sims.items():
        assert sim is not None
        assert catalog.backends[identifier].port == sim.port
        sim.config.load_time = sim.config.ttft = 0.0  # the test need not watch the pace
        sim.config.tokens_per_second = 0.0
    demo.traffic.pause = (0.01, 0.05)
    runtime = demo.daemon.runtime
    await until(lambda: all(runtime.state(b).healthy for b in ("gpu-1", "gpu-2")), 30)
    await until(lambda: demo.traffic.answered >= 5, 30, "the clients are answered")
    assert demo.traffic.in_flight <= demo.traffic.clients
    served = [
        sim.counters.requests.get(path, 0)
        for sim in sims.values()
        if sim is not None
        for path in ("/api/chat", "/api/generate")
    ]
    assert sum(served) >= 5
    folder = demo.throwaway.folder
    assert (folder / "ollamaflow.db").exists()
    await demo.stopService()
    assert not folder.exists()
    assert not demo.daemon.running and demo.daemon.listening is None
    assert not demo.traffic.running and demo.traffic.in_flight == 0
    assert all(sim.simulator is None for sim in demo.simulators)
    assert in_process.stops == []


@pytest_twisted.ensureDeferred
async def test_stopped_while_starting(in_process: InProcess) -> None:
    """A stop before the database is written waits for it, starts no clients, and leaves
    nothing behind."""
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    try:
        demo = in_process.demo
        demo.privilegedStartService()
        demo.startService()
        await demo.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not demo.throwaway.folder.exists()
    assert not demo.daemon.running and not demo.traffic.running
    assert in_process.printed == []
    assert not [e for e in events if e.get("log_failure") is not None]


@pytest_twisted.ensureDeferred
async def test_a_fleet_that_cannot_be_set_up_stops_the_reactor(in_process: InProcess) -> None:
    demo = in_process.demo
    await demo.daemon.registry.delete_frontend("frontend1")  # nothing for the boxes to serve
    events: list[dict[str, Any]] = []
    observer = keeping(events)
    globalLogPublisher.addObserver(observer)
    try:
        demo.privilegedStartService()
        demo.startService()
        await until(lambda: in_process.stops, 30, "the reactor asked to stop")
        await demo.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [e["log_format"] for e in events if e.get("log_failure") is not None] == [
        "the demo cannot set up its fleet; stopping"
    ]
    assert in_process.printed == [] and not demo.traffic.running
    assert not demo.throwaway.folder.exists()


# -- the real command ---------------------------------------------------------------------------


@attrs.frozen
class Printed:
    """What ``--demo`` prints once it serves."""

    base: str
    token: str
    folder: Path

    @classmethod
    def parse(cls, output: str) -> Printed | None:
        """The printed lines, once all are there."""
        url = re.search(r"open (http://127\.0\.0\.1:\d+/)dashboard/", output)
        token = re.search(r"^Admin token: (\S+)$", output, re.MULTILINE)
        folder = re.search(r" in (/\S*ollamaflow-demo-\S+) ", output)
        if url is None or token is None or folder is None:
            return None
        return cls(url.group(1), token.group(1), Path(folder.group(1)))


def answered(metrics: str) -> float:
    """Client requests the demo's boxes answered 200, by ``/metrics``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "ollamaflow_requests_total"
        and sample.labels.get("status") == "200"
        and sample.labels.get("backend") in ("gpu-1", "gpu-2")
    )


@pytest_twisted.ensureDeferred
async def test_twistd_demo(twistd: Path, tmp_path: Path) -> None:
    """``twistd -n ollamaflow --demo`` in a folder with a settings file of its own: prints a
    URL and a token that work, both boxes become healthy, client requests flow; the settings
    file is never read or written; SIGTERM stops it cleanly and removes its folder."""
    sentinel = "sentinel: not even JSON, and never to be read or written\n"
    mine = tmp_path / "ollamaflow.json"
    mine.write_text(sentinel)
    demo = Twistd.spawn(twistd, tmp_path, "--demo")
    printed: Printed | None = None
    try:
        printed = await until(lambda: Printed.parse(demo.output), 60, "the URL and token")
        assert printed.folder.is_dir() and printed.folder.name.startswith("ollamaflow-demo-")
        http = Http(printed.base.rstrip("/"), printed.token)

        async def both_healthy() -> bool:
            reply = await http.get("/v1.0/backends/health")
            assert reply.status == 200, reply.body
            return {r["Identifier"]: r["Healthy"] for r in reply.json} == {
                "gpu-1": True,
                "gpu-2": True,
            }

        await until(both_healthy, 30, "both boxes healthy")

        async def flowing() -> bool:
            return answered((await http.get("/metrics")).body.decode()) >= 3

        await until(flowing, 60, "client requests answered")
        # The printed URL is the dashboard, its files installed with the package (a wheel).
        for page in ("", "dashboard.js", "dashboard.css"):
            shown = await Http(printed.base.rstrip("/"), None).get("/dashboard/" + page)
            assert shown.status == 200, page
        frontends = (await http.get("/v1.0/frontends")).json
        assert [(f["Identifier"], f["Backends"]) for f in frontends] == [
            ("frontend1", ["gpu-1", "gpu-2"])
        ]
        assert (await Http(http.base, "not-the-token").get("/v1.0/health")).status == 401
        assert (printed.folder / "ollamaflow.db").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ollamaflow.json", "output.log"]
        assert mine.read_text() == sentinel
        assert await demo.terminate() == 0, demo.output
        assert not printed.folder.exists(), "the folder goes with the demo"
    finally:
        demo.kill()
        if printed is not None and printed.folder.exists():
            shutil.rmtree(printed.folder)
    assert mine.read_text() == sentinel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ollamaflow.json", "output.log"]
    assert "Traceback" not in demo.output
