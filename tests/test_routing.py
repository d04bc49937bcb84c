"""The routing decision, with no reactor: configuration, runtime state and inventories in,
what to do with one request out."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

from ollamaflow import jsonlimits
from ollamaflow.apikeys import hash_secret, new_secret
from ollamaflow.catalog import Catalog
from ollamaflow.credentials import Tokens
from ollamaflow.gateway.classify import RequestClass
from ollamaflow.gateway.outbound import body_for
from ollamaflow.gateway.placement import Placement
from ollamaflow.gateway.routing import (
    CatalogAnswer,
    FleetOperation,
    Forward,
    Refusal,
    Router,
    Unload,
    model_key,
)
from ollamaflow.records import ApiKey, Backend, Frontend, LoadBalancing
from ollamaflow.runtime import Runtime
from ollamaflow.store import Snapshot

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@attrs.define
class Request:
    method: bytes = b"POST"
    path: bytes = b"/api/chat"
    body: Any = None
    headers: dict[bytes, bytes] = attrs.field(factory=dict)
    client_host: str = "10.0.0.1"

    @property
    def content(self) -> io.BytesIO | None:
        if self.body is None:
            return None
        raw = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        return io.BytesIO(raw)

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


@attrs.frozen
class Req:
    """What the outbound side reads of a request: a POST /api/chat with ``body``."""

    body: bytes
    method: bytes = b"POST"
    path: bytes = b"/api/chat"
    uri: bytes = b"/api/chat"

    @property
    def content(self) -> io.BytesIO:
        return io.BytesIO(self.body)


@attrs.define
class Inventory:
    """Backend id → {model: loaded?}; a backend absent is not read yet."""

    models: dict[str, dict[str, bool]] = attrs.field(factory=dict)
    listeners: list[Callable[[str], None]] = attrs.field(factory=list)

    def known(self, backend_id: str) -> bool:
        return backend_id in self.models

    def has(self, backend_id: str, model: str) -> bool | None:
        if backend_id not in self.models:
            return None
        return _key(model) in self.models[backend_id]

    def is_loaded(self, backend_id: str, model: str) -> bool:
        return self.models.get(backend_id, {}).get(_key(model), False)

    def entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]:
        return {m: {"name": m, "model": m} for m in self.models.get(backend_id, {})}

    def loaded_entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]:
        loaded = self.models.get(backend_id, {})
        return {m: {"name": m, "model": m} for m, up in loaded.items() if up}

    def add_listener(self, listener: Callable[[str], None]) -> None:
        self.listeners.append(listener)

    def learned(self, backend_id: str, model: str) -> None:
        self.models.setdefault(backend_id, {})[_key(model)] = True

    def changed(self, backend_id: str) -> None:
        for listener in self.listeners:
            listener(backend_id)


def _key(model: str) -> str:
    return model if ":" in model else model + ":latest"


@attrs.define
class Fleet:
    """A configuration, its runtime state and inventories, and a router over them."""

    catalog: Catalog
    runtime: Runtime
    inventory: Inventory
    router: Router
    now: list[float]

    def decide(self, **request: Any) -> Any:
        return self.router.decide(Request(**request))


def fleet(
    *backends: Backend,
    healthy: tuple[str, ...] | None = None,
    keys: tuple[ApiKey, ...] = (),
    **frontend: Any,
) -> Fleet:
    fe = Frontend(identifier="f", backends=tuple(b.identifier for b in backends), **frontend)
    catalog = Catalog.build(Snapshot(1, (fe,), backends, api_keys=keys))
    runtime = Runtime()
    for identifier in healthy if healthy is not None else [b.identifier for b in backends]:
        runtime.state(identifier).succeeded(NOW, threshold=1)
    inventory = Inventory()
    now = [1000.0]
    router = Router(
        registry=attrs.make_class("Registry", {"catalog": attrs.field(default=catalog)})(),
        runtime=runtime,
        seconds=lambda: now[0],
        inventory=inventory,
        admin_tokens=Tokens.of(["admin"]),
    )
    inventory.add_listener(router.inventory_changed)
    return Fleet(catalog, runtime, inventory, router, now)


CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def test_a_chat_is_forwarded_to_the_backends_that_have_its_model_warm_first() -> None:
    made = fleet(Backend(identifier="a"), Backend(identifier="b"), Backend(identifier="c"))
    made.inventory.models = {"a": {"llama3:latest": False}, "b": {"llama3:latest": True}, "c": {}}
    decision = made.decide(body=CHAT)
    assert isinstance(decision, Forward)
    assert [b.identifier for b in decision.ordered] == ["b", "a"], "c lacks it; b has it loaded"
    assert decision.request_class is RequestClass.COMPLETIONS
    assert (decision.model, decision.model_key) == ("llama3", "llama3:latest")
    assert decision.document == CHAT and decision.client is None


def test_refusals_carry_their_status_and_the_model_once_known() -> None:
    made = fleet(Backend(identifier="a"))
    made.inventory.models = {"a": {}}
    missing = made.decide(body={"model": "nope", "prompt": "x"}, path=b"/api/generate")
    assert missing == Refusal(
        made.catalog.frontends["f"], 404, "model 'nope' not found", model="nope"
    )
    assert made.decide(method=b"GET").status == 405
    assert made.decide(method=b"GET").allow == b"POST"
    assert made.decide(body=b"{not json").status == 400
    assert made.decide(body=[1, 2]).status == 400
    too_long = {"model": "m" * 700}
    assert made.decide(body=too_long).status == 400
    nobody = fleet(Backend(identifier="a"), healthy=())
    refused = nobody.decide(body=CHAT)
    assert isinstance(refused, Refusal) and refused.status == 503 and refused.retry_after == 1


def test_no_frontend_for_the_host_is_404_naming_it() -> None:
    made = fleet(Backend(identifier="a"), hostname="only.example")
    refused = made.decide(body=CHAT, headers={b"host": b"other.example"})
    assert refused == Refusal(None, 404, "no frontend for host 'other.example'")


def test_a_frontends_flags_refuse_what_it_does_not_allow() -> None:
    made = fleet(Backend(identifier="a"), allow_completions=False, allow_model_management=False)
    assert made.decide(body=CHAT).status == 403
    pull = {"model": "llama3"}
    assert made.decide(path=b"/api/pull", body=pull).status == 403
    admin = {b"authorization": b"Bearer admin"}
    assert isinstance(made.decide(path=b"/api/pull", body=pull, headers=admin), FleetOperation)


def test_a_pinned_model_is_the_model_routed_by() -> None:
    made = fleet(
        Backend(identifier="a"),
        Backend(identifier="b"),
        pinned_completions_properties={"model": "mistral"},
    )
    made.inventory.models = {"a": {"llama3:latest": True}, "b": {"mistral:latest": False}}
    decision = made.decide(body=CHAT)
    assert isinstance(decision, Forward)
    assert [b.identifier for b in decision.ordered] == ["b"]
    assert decision.document is not None and decision.document["model"] == "mistral"


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        (b"POST", b"/api/pull", "pull"),
        (b"DELETE", b"/api/delete", "delete"),
        (b"POST", b"/api/copy", "copy"),
        (b"POST", b"/api/create", "create"),
        (b"POST", b"/api/blobs/sha256:" + b"0" * 64, "blob"),
        (b"HEAD", b"/api/blobs/sha256:" + b"0" * 64, "blob"),
    ],
)
def test_model_operations_are_done_across_the_frontend(
    method: bytes, path: bytes, name: str
) -> None:
    made = fleet(Backend(identifier="a"), Backend(identifier="b"))
    decision = made.decide(method=method, path=path, body={"model": "llama3", "source": "x"})
    assert isinstance(decision, FleetOperation) and decision.name == name
    assert [b.identifier for b in decision.candidates] == ["a", "b"]


def test_the_catalog_is_answered_from_the_inventories_read() -> None:
    made = fleet(Backend(identifier="a"), Backend(identifier="b"))
    assert isinstance(made.decide(method=b"GET", path=b"/api/tags"), Forward), "none read yet"
    made.inventory.models = {"a": {"llama3:latest": True}}
    answer = made.decide(method=b"GET", path=b"/api/tags")
    assert isinstance(answer, CatalogAnswer) and [b.identifier for b in answer.backends] == ["a"]
    assert [m["name"] for m in json.loads(answer.body)["models"]] == ["llama3:latest"]
    one = made.decide(method=b"GET", path=b"/v1/models/LLAMA3")
    assert isinstance(one, CatalogAnswer) and json.loads(one.body)["id"] == "LLAMA3"
    assert made.decide(method=b"GET", path=b"/v1/models/nope").status == 404


def test_ollama_stop_unloads_where_the_model_is_loaded() -> None:
    made = fleet(Backend(identifier="a"), Backend(identifier="b"))
    made.inventory.models = {"a": {"llama3:latest": True}, "b": {"llama3:latest": False}}
    stop = {"model": "llama3", "keep_alive": 0}
    decision = made.decide(path=b"/api/generate", body=stop)
    assert isinstance(decision, Unload) and [b.identifier for b in decision.loaded] == ["a"]
    made.inventory.models["a"]["llama3:latest"] = False
    assert isinstance(made.decide(path=b"/api/generate", body=stop), Forward), "loaded nowhere"


def test_sticky_clients_go_back_to_their_backend() -> None:
    made = fleet(
        Backend(identifier="a"),
        Backend(identifier="b"),
        use_sticky_sessions=True,
        load_balancing="RoundRobin",
    )
    first = made.decide(body=CHAT, client_host="10.9.9.9")
    assert isinstance(first, Forward) and first.client == b"10.9.9.9"
    made.router.pins.pin("f", b"10.9.9.9", "b", until=2000.0)
    for _ in range(3):
        again = made.decide(body=CHAT, client_host="10.9.9.9")
        assert isinstance(again, Forward) and again.ordered[0].identifier == "b"


def test_what_is_remembered_follows_health_and_inventories() -> None:
    made = fleet(Backend(identifier="a"), Backend(identifier="b"))
    made.inventory.models = {"a": {"llama3:latest": False}, "b": {"llama3:latest": False}}
    assert len(made.decide(body=CHAT).ordered) == 2
    made.runtime.state("b").failed(NOW, threshold=1, error="down")
    assert [b.identifier for b in made.decide(body=CHAT).ordered] == ["a"]
    made.inventory.models["a"] = {}
    made.inventory.changed("a")
    assert made.decide(body=CHAT).status == 404
    forward = Forward(
        made.catalog.frontends["f"],
        (),
        RequestClass.COMPLETIONS,
        CHAT,
        "llama3",
        "llama3:latest",
        None,
        None,
    )
    assert made.router.candidates_now(forward) == []


def test_a_push_goes_where_the_model_is_known_to_be() -> None:
    made = fleet(Backend(identifier="a"), Backend(identifier="b"), Backend(identifier="c"))
    made.inventory.models = {"a": {}, "b": {"me/mine:latest": False}}  # c not read yet
    for _ in range(3):
        decision = made.decide(path=b"/api/push", body={"model": "me/mine"})
        assert isinstance(decision, Forward)
        assert [b.identifier for b in decision.ordered] == ["b"]
    made.inventory.models["b"] = {}
    made.inventory.changed("b")
    unknown = made.decide(path=b"/api/push", body={"model": "me/mine"})
    assert isinstance(unknown, Forward) and [b.identifier for b in unknown.ordered] == ["c"]


def test_a_string_that_is_no_model_name_counts_as_none() -> None:
    assert model_key("llama3") == "llama3:latest"
    assert model_key("") is None and model_key("a b") is None and model_key(None) is None


def test_a_key_limited_to_models_never_sees_an_unfiltered_catalog() -> None:
    """Before any inventory is read the catalog routes go to a backend, which would list every
    model: for a key limited to some models the gateway answers from what it has (nothing yet),
    and refuses a model it may not use."""
    secret = new_secret()
    key = ApiKey(identifier="k", models=("llama3*",), secret_hash=hash_secret(secret))
    made = fleet(Backend(identifier="a"), keys=(key,))
    keyed = {b"authorization": b"Bearer " + secret.encode()}
    for path in (b"/api/tags", b"/api/ps", b"/v1/models"):
        answer = made.decide(method=b"GET", path=path, headers=keyed)
        assert isinstance(answer, CatalogAnswer), path
        listed = json.loads(answer.body)
        assert listed.get("models", listed.get("data")) == [], path
    refused = made.decide(method=b"GET", path=b"/v1/models/mistral", headers=keyed)
    assert isinstance(refused, Refusal) and refused.status == 403
    allowed = made.decide(method=b"GET", path=b"/v1/models/llama3", headers=keyed)
    assert isinstance(allowed, Forward), "nothing read yet: the backend answers for it"
    assert isinstance(made.decide(method=b"GET", path=b"/api/tags"), Forward), "no key: as before"


def placed(*backends: Backend) -> tuple[Fleet, Placement]:
    """A ModelAware frontend over ``backends``, with placement reading the same inventory."""
    made = fleet(*backends, load_balancing=LoadBalancing.MODEL_AWARE)
    placement = Placement(made.inventory, made.runtime, lambda: made.now[0])
    router = Router(
        registry=made.router.registry,
        runtime=made.runtime,
        seconds=lambda: made.now[0],
        inventory=made.inventory,
        placement=placement,
        hot_keep_alive="45m",
    )
    made.inventory.add_listener(router.inventory_changed)
    return attrs.evolve(made, router=router), placement


def test_a_model_aware_frontend_waits_for_a_warm_copy_instead_of_loading_another() -> None:
    made, _ = placed(Backend(identifier="a"), Backend(identifier="b"))
    made.inventory.models = {"a": {"llama3:latest": False}, "b": {"llama3:latest": True}}
    decision = made.decide(body=CHAT)
    assert isinstance(decision, Forward)
    assert [b.identifier for b in decision.ordered] == ["b"], "LeastOutstanding would add a"
    assert [b.identifier for b in made.router.candidates_now(decision)] == ["b"]
    made.inventory.models["b"] = {}  # b went away with it: loading on a is allowed
    made.router.inventory_changed("b")
    assert [b.identifier for b in made.router.candidates_now(decision)] == ["a"]


def test_a_model_aware_chat_carries_its_conversation_and_a_hot_model_its_keep_alive() -> None:
    made, placement = placed(Backend(identifier="a"))
    made.inventory.models = {"a": {"llama3:latest": True}}
    first = made.decide(body=CHAT)
    assert isinstance(first, Forward)
    assert first.conversation is not None and first.keep_alive is None
    made.decide(body=CHAT)
    hot = made.decide(body=CHAT)
    assert hot.keep_alive == "45m"
    asked = made.decide(body={**CHAT, "keep_alive": "1m"})
    assert asked.keep_alive is None, "the client's own keep_alive is kept"
    assert body_for(Req(json.dumps(CHAT).encode()), hot, Backend(identifier="a")) == (
        jsonlimits.dumps({**CHAT, "keep_alive": "45m"})
    )
    assert placement.is_hot("llama3")


def test_other_policies_are_not_placed() -> None:
    made = fleet(Backend(identifier="a"), Backend(identifier="b"))
    made.inventory.models = {"a": {"llama3:latest": False}, "b": {"llama3:latest": True}}
    decision = made.decide(body=CHAT)
    assert [b.identifier for b in decision.ordered] == ["b", "a"]
    assert decision.conversation is None and decision.keep_alive is None
