"""Model synchronization and the pull reader: by clock with a fake Ollama, end to end with
simulators."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import pytest_twisted
from harness import until
from test_services_health import (
    Call,
    FakeResponse,
    World,
    backend,
    real_http,
    sim_backend,
)
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from ollamaflow.records import Frontend
from ollamaflow.services import (
    HealthChecker,
    ModelInventory,
    ModelSync,
    PullFailed,
    PullHTTPError,
    PullIdleTimeout,
    PullProgress,
    PullStreamBroken,
    PullUnavailable,
    pull,
)
from ollamaflow.sim import SimConfig

__all__ = ["real_http"]  # a fixture, shared by import

LAYER_A = "sha256:" + "a" * 64
LAYER_B = "sha256:" + "b" * 64


@attrs.define(eq=False)
class PullCall:
    host: str
    model: str
    call: Call
    response: FakeResponse

    def progress(self) -> None:
        self.response.send(
            {"status": "pulling manifest"},
            {"status": "pulling aaaa", "digest": LAYER_A, "total": 100},
            {"status": "pulling aaaa", "digest": LAYER_A, "total": 100, "completed": 40},
            {"status": "pulling bbbb", "digest": LAYER_B, "total": 50, "completed": 50},
        )


@attrs.define
class FakeOllama:
    """Several fake Ollama servers told apart by host name (``b1.example`` is ``b1``)."""

    models: dict[str, set[str]] = attrs.field(factory=dict)
    pulls: list[PullCall] = attrs.field(factory=list)
    pull_status: int = 200

    def __call__(self, call: Call) -> FakeResponse:
        host = call.url.split("/")[2].split(".")[0]
        if call.path == "/api/tags":
            names = sorted(self.models.setdefault(host, set()))
            return FakeResponse.json({"models": [{"name": n, "size": 7} for n in names]})
        if call.path == "/api/ps":
            return FakeResponse.json({"models": []})
        if call.path == "/api/pull":
            if self.pull_status != 200:
                return FakeResponse.json({"error": "nope"}, code=self.pull_status)
            assert call.data is not None
            body = json.loads(call.data)
            response = FakeResponse(200, streaming=True)
            self.pulls.append(PullCall(host, body["model"], call, response))
            return response
        return FakeResponse(404)

    def running(self) -> list[PullCall]:
        return [p for p in self.pulls if not p.response.finished]

    def succeed(self, p: PullCall, name: str | None = None) -> None:
        p.progress()
        p.response.send({"status": "verifying sha256 digest"}, {"status": "success"})
        self.models.setdefault(p.host, set()).add(name or p.model)
        p.response.finish()

    def fail(self, p: PullCall, error: str = "pull model manifest: file does not exist") -> None:
        p.response.send({"status": "pulling manifest"}, {"error": error})
        p.response.finish()


@attrs.define
class Sync:
    world: World
    ollama: FakeOllama
    inventory: ModelInventory
    sync: ModelSync

    def start(self, *records: Any, healthy: tuple[str, ...] = ("b1",)) -> None:
        self.world.publish(*records)
        self.world.mark_healthy(*healthy)
        self.inventory.startService()
        self.sync.startService()

    def model(self, name: str, backend_id: str = "b1") -> dict[str, Any]:
        return next(m for m in self.sync.models(backend_id) if m["Name"] == name)


@pytest.fixture
def s() -> Any:
    world = World()
    ollama = FakeOllama()
    world.http.handler = ollama
    inventory = ModelInventory(
        registry=world.registry,
        runtime=world.runtime,
        clock=world.clock,
        http=world.http,
        interval=30.0,
    )
    world.registry.subscribe(inventory.configuration_changed)
    sync = ModelSync(
        registry=world.registry,
        runtime=world.runtime,
        inventory=inventory,
        clock=world.clock,
        http=world.http,
        max_concurrent=2,
        idle_timeout=60.0,
        backoff_base=5.0,
        backoff_max=40.0,
    )
    world.registry.subscribe(sync.configuration_changed)
    inventory.add_listener(sync.models_read)
    yield Sync(world, ollama, inventory, sync)
    sync.stopService()
    inventory.stopService()
    assert world.clock.getDelayedCalls() == []
    assert {c.method for c in world.http.calls} <= {"GET", "POST"}  # never deletes


def frontend(identifier: str, backends: tuple[str, ...], *models: str, **kw: Any) -> Frontend:
    return Frontend(identifier=identifier, backends=backends, required_models=models, **kw)


# -- the pure parts ----------------------------------------------------------------------------


def test_required_is_the_union_over_active_frontends(s: Sync) -> None:
    catalog = s.world.publish(
        backend("b1"),
        backend("b2"),
        frontend("f1", ("b1", "b2"), "llama3", "Mistral"),
        frontend("f2", ("b1",), "llama3:latest", "registry.ollama.ai/library/phi3"),
        frontend("f3", ("b1",), "gemma2", active=False),
    )
    assert s.sync.required(catalog, "b1") == {
        "llama3",
        "Mistral",
        "registry.ollama.ai/library/phi3",
    }
    assert s.sync.required(catalog, "b2") == {"llama3", "Mistral"}
    assert s.sync.required(catalog, "b3") == set()


def test_progress_sums_the_latest_of_each_layer() -> None:
    progress = PullProgress()
    for message in (
        {"status": "pulling manifest"},
        {"status": "pulling aaaa", "digest": LAYER_A, "total": 100},
        {"status": "pulling aaaa", "digest": LAYER_A, "total": 100, "completed": 30},
        {"status": "pulling aaaa", "digest": LAYER_A, "total": 100, "completed": 60},
        {"status": "pulling bbbb", "digest": LAYER_B, "total": 50, "completed": 10},
        {"status": "pulling bbbb", "digest": LAYER_B, "total": 50},
    ):
        progress.update(message)
    assert (progress.completed, progress.total) == (70, 150)
    assert progress.to_wire() == {"Status": "pulling bbbb", "Completed": 70, "Total": 150}
    assert progress.replay()[0] == {
        "status": "pulling aaaaaaaaaaaa",
        "digest": LAYER_A,
        "total": 100,
        "completed": 60,
    }


def test_backoff_doubles_up_to_the_cap(s: Sync) -> None:
    assert [s.sync.backoff(n) for n in (1, 2, 3, 4, 5, 6)] == [5, 10, 20, 40, 40, 40]


# -- synchronization ---------------------------------------------------------------------------


def test_missing_required_models_are_pulled_at_most_n_at_once(s: Sync) -> None:
    s.ollama.models["b1"] = {"llama3:latest"}
    s.start(backend("b1"), frontend("f1", ("b1",), "llama3", "mistral", "phi3", "gemma2"))
    assert [p.model for p in s.ollama.pulls] == ["mistral", "phi3"]
    first = s.ollama.pulls[0]
    assert first.call.method == "POST"
    assert first.call.url == "http://b1.example:11434/api/pull"
    assert json.loads(first.call.data or b"") == {"model": "mistral", "stream": True}
    assert first.call.header("Content-Type") == "application/json"

    first.progress()
    assert s.model("mistral:latest")["Pulling"] == {
        "Status": "pulling bbbb",
        "Completed": 90,
        "Total": 150,
        "Queued": False,
    }
    assert s.model("gemma2:latest") == {
        "Name": "gemma2:latest",
        "Present": False,
        "Loaded": False,
        "Required": True,
        "Pulling": {"Status": "queued", "Completed": 0, "Total": 0, "Queued": True},
    }
    assert s.model("llama3:latest") == {
        "Name": "llama3:latest",
        "Present": True,
        "Loaded": False,
        "Required": True,
        "Size": 7,
    }

    tags_before = len(s.world.http.to("/api/tags"))
    s.ollama.succeed(first, "mistral:latest")
    assert len(s.world.http.to("/api/tags")) == tags_before + 1  # re-read right after
    assert s.inventory.has("b1", "mistral") is True
    assert s.model("mistral:latest")["Present"] is True
    assert "Pulling" not in s.model("mistral:latest")
    assert [p.model for p in s.ollama.running()] == ["phi3", "gemma2"]

    for p in s.ollama.running():
        s.ollama.succeed(p)
    assert all(s.inventory.has("b1", m) for m in ("llama3", "mistral", "phi3", "gemma2"))
    s.world.clock.advance(30)
    assert len(s.ollama.pulls) == 3


def test_a_sync_that_is_not_automatic_only_pulls_on_request(s: Sync) -> None:
    """The mode of all but one worker process: RequiredModels is another worker's job."""
    s.sync.automatic = False
    s.start(backend("b1"), frontend("f1", ("b1",), "mistral"))
    s.world.clock.advance(30)
    assert s.ollama.pulls == []
    joined = s.sync.ensure("b1", "phi3")
    assert [p.model for p in s.ollama.pulls] == ["phi3"]
    s.ollama.succeed(s.ollama.pulls[0])
    assert joined.called


def test_one_pull_per_model_per_backend(s: Sync) -> None:
    s.start(backend("b1"), frontend("f1", ("b1",), "mistral"))
    assert len(s.ollama.pulls) == 1
    s.world.clock.advance(30)  # the inventory re-read finds it still missing
    s.world.publish(
        backend("b1"), frontend("f1", ("b1",), "mistral"), frontend("f2", ("b1",), "Mistral:latest")
    )
    assert len(s.ollama.pulls) == 1


def test_a_failed_pull_is_retried_with_backoff(s: Sync) -> None:
    s.start(backend("b1"), frontend("f1", ("b1",), "nosuchmodel"))
    s.ollama.fail(s.ollama.pulls[0])
    assert s.model("nosuchmodel:latest")["Failed"] == {
        "Error": "pull model manifest: file does not exist",
        "Attempts": 1,
        "NextRetryUtc": "1970-01-01T00:00:05.000000Z",
    }
    s.world.clock.advance(4.9)
    assert len(s.ollama.pulls) == 1
    s.world.clock.advance(0.1)
    assert len(s.ollama.pulls) == 2
    failed = s.model("nosuchmodel:latest")["Failed"]
    assert failed == {"Error": "pull model manifest: file does not exist", "Attempts": 1}
    s.ollama.fail(s.ollama.pulls[1], "registry unreachable")
    assert s.model("nosuchmodel:latest")["Failed"] == {
        "Error": "registry unreachable",
        "Attempts": 2,
        "NextRetryUtc": "1970-01-01T00:00:15.000000Z",
    }
    s.world.clock.advance(9.9)
    assert len(s.ollama.pulls) == 2
    s.world.clock.advance(0.1)
    assert len(s.ollama.pulls) == 3
    s.ollama.succeed(s.ollama.pulls[2], "nosuchmodel:latest")
    assert "Failed" not in s.model("nosuchmodel:latest")
    assert s.model("nosuchmodel:latest")["Present"]


def test_success_without_the_model_in_tags_is_not_retried_at_once(s: Sync) -> None:
    s.start(backend("b1"), frontend("f1", ("b1",), "mistral"))
    lying = s.ollama.pulls[0]
    lying.response.send({"status": "success"})
    lying.response.finish()
    assert s.model("mistral:latest")["Failed"]["Error"] == (
        "the pull reported success but /api/tags does not list the model"
    )
    assert len(s.ollama.pulls) == 1
    s.world.clock.advance(5)
    assert len(s.ollama.pulls) == 2


def test_each_finished_pull_is_reported(s: Sync) -> None:
    done: list[tuple[str, str, bool]] = []
    s.sync.on_pull_done = lambda backend_id, model, ok: done.append((backend_id, model, ok))
    s.start(backend("b1"), frontend("f1", ("b1",), "nosuchmodel", "mistral", "phi3"))
    nosuchmodel, mistral = s.ollama.pulls
    s.ollama.fail(nosuchmodel)
    s.ollama.succeed(mistral, "mistral:latest")
    lying = s.ollama.pulls[2]  # phi3, started when a slot freed
    lying.response.send({"status": "success"})
    lying.response.finish()
    assert done == [("b1", "nosuchmodel", False), ("b1", "mistral", True), ("b1", "phi3", False)]

    def explode(backend_id: str, model: str, ok: bool) -> None:
        raise RuntimeError("listener bug")

    s.sync.on_pull_done = explode
    s.world.clock.advance(5)  # the retries run; a failing listener changes nothing
    s.ollama.succeed(s.ollama.running()[0], "nosuchmodel:latest")
    assert s.model("nosuchmodel:latest")["Present"]


def test_http_errors_and_broken_streams_are_failures(s: Sync) -> None:
    s.ollama.pull_status = 500
    s.start(backend("b1"), frontend("f1", ("b1",), "mistral", "phi3"))
    assert s.model("mistral:latest")["Failed"]["Error"] == "HTTP 500: nope"
    s.ollama.pull_status = 200
    s.world.clock.advance(5)
    mistral, phi3 = s.ollama.running()
    mistral.response.send({"status": "pulling manifest"})
    mistral.response.finish()
    assert s.model("mistral:latest")["Failed"]["Error"] == "pull stream ended without success"
    phi3.response.finish(Failure(ConnectionResetError("reset by peer")))
    assert s.model("phi3:latest")["Failed"]["Error"] == "reset by peer"


def test_idle_timeout_tolerates_gaps_but_not_silence(s: Sync) -> None:
    s.start(backend("b1"), frontend("f1", ("b1",), "mistral", "phi3"))
    mistral, phi3 = s.ollama.pulls
    phi3.response.send({"status": "pulling manifest"})
    s.world.clock.advance(59)
    assert not phi3.response.finished
    for _ in range(4):
        mistral.response.send({"status": "verifying sha256 digest"})
        s.world.clock.advance(50)
    assert not mistral.response.finished
    s.ollama.succeed(mistral)
    assert s.inventory.has("b1", "mistral")
    assert s.model("phi3:latest")["Failed"]["Error"] == "no progress for 60s"
    assert phi3.response.stopped


def test_catalog_changes_start_and_drop_pulls(s: Sync) -> None:
    s.start(backend("b1"), frontend("f1", ("b1",), "mistral"))
    assert len(s.ollama.pulls) == 1
    s.world.publish(backend("b1"), frontend("f1", ("b1",), "mistral", "phi3", "gemma2"))
    assert [p.model for p in s.ollama.pulls] == ["mistral", "phi3"]
    assert s.sync.pulling("b1", "gemma2") is not None
    s.world.publish(backend("b1"), frontend("f1", ("b1",), "mistral"))
    assert s.sync.pulling("b1", "gemma2") is None  # queued and no longer wanted: dropped
    assert s.sync.pulling("b1", "phi3") is not None  # running: left to finish


def test_a_failed_model_no_longer_required_is_forgotten_and_not_retried(s: Sync) -> None:
    s.start(backend("b1"), frontend("f1", ("b1",), "nosuchmodel", "mistral"))
    s.ollama.fail(s.ollama.pulls[0])
    s.ollama.succeed(s.ollama.pulls[1])
    assert s.model("nosuchmodel:latest")["Failed"]["Attempts"] == 1
    s.world.publish(backend("b1"), frontend("f1", ("b1",), "mistral"))
    assert all(m["Name"] != "nosuchmodel:latest" for m in s.sync.models("b1"))
    s.world.clock.advance(60)  # past every backoff: the retry went with the failure
    assert [p.model for p in s.ollama.pulls] == ["nosuchmodel", "mistral"]
    s.world.publish(backend("b1"), frontend("f1", ("b1",), "nosuchmodel", "mistral"))
    assert [p.model for p in s.ollama.pulls] == ["nosuchmodel", "mistral", "nosuchmodel"]
    assert "Failed" not in s.model("nosuchmodel:latest")  # a fresh start, not attempt 2


def test_no_pulls_on_unhealthy_or_unknown_backends(s: Sync) -> None:
    s.start(
        backend("b1"),
        backend("b2", api_format="OpenAI"),
        frontend("f1", ("b1", "b2"), "mistral"),
        healthy=("b2",),
    )
    assert s.ollama.pulls == []
    assert s.inventory.has("b1", "mistral") is None
    s.world.mark_healthy("b1")
    s.inventory.health_changed(s.world.registry.catalog.backends["b1"], True)
    assert [p.host for p in s.ollama.pulls] == ["b1"]


def test_a_deleted_backend_stops_its_pulls(s: Sync) -> None:
    s.start(backend("b1"), frontend("f1", ("b1",), "mistral"))
    waiting = s.sync.ensure("b1", "mistral")
    outcome: list[Any] = []
    waiting.addBoth(outcome.append)
    s.world.publish()
    assert s.ollama.pulls[0].response.stopped
    assert isinstance(outcome[0], Failure) and outcome[0].check(PullUnavailable)
    assert s.sync.models("b1") == []


# -- the joinable pull -------------------------------------------------------------------------


def test_ensure_joins_a_running_pull(s: Sync) -> None:
    s.start(backend("b1"), frontend("f1", ("b1",), "mistral"))
    running = s.ollama.pulls[0]
    running.progress()
    seen: list[dict[str, Any]] = []
    joined = s.sync.ensure("b1", "Mistral:latest", on_progress=seen.append)
    assert len(s.ollama.pulls) == 1
    assert [m.get("digest") for m in seen] == [LAYER_A, LAYER_B]
    assert seen[0]["completed"] == 40
    assert not joined.called
    s.ollama.succeed(running)
    assert seen[-1] == {"status": "success"}
    assert joined.called and joined.result is None
    assert s.inventory.has("b1", "mistral")


def test_ensure_starts_a_pull_and_reports_its_failure(s: Sync) -> None:
    s.start(backend("b1"))
    seen: list[dict[str, Any]] = []
    outcome: list[Any] = []
    s.sync.ensure("b1", "qwen2.5:0.5b", on_progress=seen.append).addBoth(outcome.append)
    assert [p.model for p in s.ollama.pulls] == ["qwen2.5:0.5b"]
    s.ollama.fail(s.ollama.pulls[0], "no such model")
    assert seen[-1] == {"error": "no such model"}
    assert outcome[0].check(PullFailed)
    assert str(outcome[0].value) == "no such model"
    # Not required: shown once, not retried.
    assert s.model("qwen2.5:0.5b")["Failed"] == {"Error": "no such model", "Attempts": 1}
    s.world.clock.advance(600)
    assert len(s.ollama.pulls) == 1


def test_ensure_waits_its_turn_and_can_be_cancelled(s: Sync) -> None:
    s.start(backend("b1"), frontend("f1", ("b1",), "mistral", "phi3"))
    seen: list[dict[str, Any]] = []
    queued = s.sync.ensure("b1", "gemma2", on_progress=seen.append)
    other = s.sync.ensure("b1", "gemma2")
    assert [p.model for p in s.ollama.pulls] == ["mistral", "phi3"]
    assert s.sync.pulling("b1", "gemma2") is not None
    queued.cancel()
    assert queued.called and isinstance(queued.result, Failure)
    queued.addErrback(lambda f: f.trap(CancelledError))
    s.ollama.succeed(s.ollama.pulls[0])
    assert [p.model for p in s.ollama.running()] == ["phi3", "gemma2"]
    s.ollama.succeed(s.ollama.pulls[2])
    assert seen == []
    assert other.called and other.result is None


def test_ensure_refuses_what_it_cannot_do(s: Sync) -> None:
    s.start(backend("b1"), backend("oai", api_format="OpenAI"))
    for backend_id, model, kind in (
        ("b1", "not a name!", PullFailed),
        ("oai", "mistral", PullUnavailable),
        ("ghost", "mistral", PullUnavailable),
    ):
        outcome: list[Any] = []
        s.sync.ensure(backend_id, model).addBoth(outcome.append)
        assert outcome[0].check(kind)


# -- the pull reader on its own ----------------------------------------------------------------


def test_pull_reader_reports_every_message_and_splits_lines() -> None:
    world = World()
    response = FakeResponse(200, streaming=True)
    world.http.handler = lambda call: response
    seen: list[dict[str, Any]] = []
    done = Deferred.fromCoroutine(
        pull(
            world.http,
            backend(bearer_token="t"),
            "llama3",
            on_progress=seen.append,
            idle_timeout=10,
            clock=world.clock,
        )
    )
    assert world.http.calls[0].header("Authorization") == "Bearer t"
    response.protocol.dataReceived(b'{"status":"pulling manifest"}\n{"status":"pul')
    response.protocol.dataReceived(b'ling x","digest":"d","total":3}\n\n{"status":"success"}')
    response.finish()
    assert seen == [
        {"status": "pulling manifest"},
        {"status": "pulling x", "digest": "d", "total": 3},
        {"status": "success"},
    ]
    assert done.called and done.result is None
    assert world.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("chunks", "kind", "message"),
    [
        ((b"not json\n",), PullStreamBroken, "pull progress is not JSON lines"),
        ((b'{"status":"success"}\n{"error":"late"}\n',), PullFailed, "late"),
        ((b'{"status":"pulling manifest"}\n',), PullStreamBroken, "ended without success"),
    ],
)
def test_pull_reader_failures(chunks: tuple[bytes, ...], kind: type, message: str) -> None:
    world = World()
    world.http.handler = lambda call: FakeResponse(200, *chunks)
    done = Deferred.fromCoroutine(
        pull(
            world.http,
            backend(),
            "m",
            on_progress=lambda m: None,
            idle_timeout=10,
            clock=world.clock,
        )
    )
    outcome: list[Any] = []
    done.addBoth(outcome.append)
    assert outcome[0].check(kind)
    assert message in str(outcome[0].value)
    assert world.clock.getDelayedCalls() == []


def test_pull_reader_http_error_and_timeout_to_headers() -> None:
    world = World()
    world.http.handler = lambda call: FakeResponse.json({"error": "unauthorized"}, code=401)
    outcome: list[Any] = []
    Deferred.fromCoroutine(
        pull(world.http, backend(), "m", on_progress=print, idle_timeout=5, clock=world.clock)
    ).addBoth(outcome.append)
    assert outcome[0].check(PullHTTPError)
    assert outcome[0].value.status == 401
    assert str(outcome[0].value) == "HTTP 401: unauthorized"

    world.http.handler = None
    outcome = []
    Deferred.fromCoroutine(
        pull(world.http, backend(), "m", on_progress=print, idle_timeout=5, clock=world.clock)
    ).addBoth(outcome.append)
    world.clock.advance(5)
    assert world.http.calls[-1].cancelled
    assert outcome[0].check(PullIdleTimeout)


def test_cancelling_a_pull_closes_the_stream() -> None:
    world = World()
    response = FakeResponse(200, streaming=True)
    world.http.handler = lambda call: response
    done = Deferred.fromCoroutine(
        pull(world.http, backend(), "m", on_progress=print, idle_timeout=5, clock=world.clock)
    )
    done.cancel()
    assert response.stopped
    assert done.called and isinstance(done.result, Failure)
    assert done.result.check(CancelledError)
    done.addErrback(lambda f: None)
    assert world.clock.getDelayedCalls() == []


# -- end to end --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_required_models_appear_on_simulators(simulators: Any, real_http: Any) -> None:
    from twisted.internet import reactor

    has = await simulators(models=["llama3", "all-minilm"])
    lacks = await simulators(config=SimConfig(pull_time=0.2), models=["all-minilm"])
    world = World(http=real_http)  # its fake clock stays still: the services get the reactor
    world.publish(
        sim_backend("has", has, healthy_threshold=1),
        sim_backend("lacks", lacks, healthy_threshold=1),
        frontend("f1", ("has", "lacks"), "llama3:latest", "no-such-model"),
    )
    inventory = ModelInventory(
        registry=world.registry, runtime=world.runtime, clock=reactor, http=real_http, interval=60
    )
    world.registry.subscribe(inventory.configuration_changed)
    checker = HealthChecker(
        registry=world.registry,
        runtime=world.runtime,
        clock=reactor,
        http=real_http,
        interval=60,
        timeout=2,
        on_transition=inventory.health_changed,
    )
    world.registry.subscribe(checker.configuration_changed)
    sync = ModelSync(
        registry=world.registry,
        runtime=world.runtime,
        inventory=inventory,
        clock=reactor,
        http=real_http,
        max_concurrent=3,
        idle_timeout=5,
        backoff_base=0.1,
        backoff_max=0.4,
    )
    world.registry.subscribe(sync.configuration_changed)
    inventory.add_listener(sync.models_read)
    services = [inventory, sync, checker]
    for service in services:
        service.startService()
    try:
        await until(lambda: inventory.has("lacks", "llama3"))
        names = [m.name for m in lacks.state.catalog]
        assert "llama3:latest" in names
        assert lacks.counters.pulls == 1
        assert has.counters.pulls == 0
        entry = next(m for m in sync.models("lacks") if m["Name"] == "llama3:latest")
        assert entry["Present"] and entry["Required"] and "Pulling" not in entry

        def failed_twice() -> bool:
            for backend_id in ("has", "lacks"):
                model = next(
                    (m for m in sync.models(backend_id) if m["Name"] == "no-such-model:latest"),
                    {},
                )
                if model.get("Failed", {}).get("Attempts", 0) < 2:
                    return False
            return True

        await until(failed_twice)
        failed = next(m for m in sync.models("has") if m["Name"] == "no-such-model:latest")
        assert failed["Failed"]["Error"] == "pull model manifest: file does not exist"
        assert not failed["Present"]
        assert has.counters.pull_failures >= 2

        seen: list[dict[str, Any]] = []
        await sync.ensure("has", "mistral", on_progress=seen.append)
        assert seen[-1] == {"status": "success"}
        assert inventory.has("has", "mistral:latest")
    finally:
        for service in reversed(services):
            service.stopService()
        await task.deferLater(reactor, 0, lambda: None)
