"""The simulator's model operations as Ollama 0.32 answers them: blobs, create, push, copy,
delete and unloading, on a `task.Clock` over in-memory connections."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from simwire import Sim

from ollamaflow.sim import blobs
from ollamaflow.sim.blobs import Blob, BlobStore, hash_stream
from ollamaflow.sim.transfer import go_json, go_quote, valid_path

GGUF = b"GGUF\x03\x00\x00\x00" + b"simulated weights" * 10
GGUF_DIGEST = "sha256:" + hashlib.sha256(GGUF).hexdigest()
NOT_GGUF = b"just some bytes"
NOT_GGUF_DIGEST = "sha256:" + hashlib.sha256(NOT_GGUF).hexdigest()
ABSENT = "sha256:" + "ab" * 32


def upload(sim: Sim, data: bytes, digest: str | None = None) -> int:
    digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
    conn = sim.request("POST", f"/api/blobs/{digest}", raw=data)
    return conn.status()


def statuses(lines: list[dict[str, Any]]) -> list[str]:
    return [line.get("status") or "error: " + line["error"] for line in lines]


def tags(sim: Sim) -> list[str]:
    return [m["name"] for m in sim.request("GET", "/api/tags").json()["models"]]


# -- blobs -------------------------------------------------------------------------------------


def test_blob_upload_then_head() -> None:
    sim = Sim()
    head = sim.request("HEAD", f"/api/blobs/{GGUF_DIGEST}")
    assert head.status() == 404
    assert b"content-length: " in head.headers() and head.body() == b""
    conn = sim.request("POST", f"/api/blobs/{GGUF_DIGEST}", raw=GGUF)
    assert conn.status() == 201
    assert conn.body() == b"" and b"content-type" not in conn.headers()
    assert sim.request("HEAD", f"/api/blobs/{GGUF_DIGEST}").status() == 200
    assert sim.request("HEAD", "/api/blobs/sha256-" + GGUF_DIGEST[7:]).status() == 200
    again = sim.request("POST", f"/api/blobs/{GGUF_DIGEST}", raw=GGUF)
    assert (again.status(), again.body()) == (200, b""), "already here: 200, body unread"
    assert sim.sim_state()["blobs"] == [{"digest": GGUF_DIGEST, "size": len(GGUF)}]
    assert sim.state.counters.blob_uploads == 1


def test_blob_404_names_the_digest() -> None:
    sim = Sim()
    # HEAD has no body; the length is the error's, as Go's server reports it.
    length = len(f'{{"error":"blob \\"{ABSENT}\\" not found"}}')
    head = sim.request("HEAD", f"/api/blobs/{ABSENT}")
    assert f"content-length: {length}".encode() in head.headers()


def test_blob_digest_mismatch_is_a_400_and_keeps_the_body_under_its_own_digest() -> None:
    sim = Sim()
    conn = sim.request("POST", f"/api/blobs/{ABSENT}", raw=NOT_GGUF)
    assert conn.status() == 400
    assert conn.json() == {
        "error": f'digest mismatch, expected "{ABSENT}", got "{NOT_GGUF_DIGEST}"'
    }
    assert sim.request("HEAD", f"/api/blobs/{ABSENT}").status() == 404
    # Ollama writes the body to the blob store before comparing digests.
    assert sim.request("HEAD", f"/api/blobs/{NOT_GGUF_DIGEST}").status() == 200
    dashed = "sha256-" + hashlib.sha256(b"x").hexdigest()
    conn = sim.request("POST", f"/api/blobs/{dashed}", raw=b"x")
    assert conn.status() == 400, "Ollama compares the digest as written: sha256- never matches"


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("POST", "/api/blobs/sha256:abc", 400, "invalid digest format"),
        ("POST", "/api/blobs/md5:" + "0" * 64, 400, "invalid digest format"),
        ("POST", "/api/blobs/sha256:" + "g" * 64, 400, "invalid digest format"),
        ("HEAD", "/api/blobs/nope", 400, None),
        ("GET", f"/api/blobs/{ABSENT}", 405, "405 method not allowed"),
        ("DELETE", f"/api/blobs/{ABSENT}", 405, "405 method not allowed"),
        ("POST", "/api/blobs/", 404, "404 page not found"),
        ("POST", f"/api/blobs/{ABSENT}/x", 404, "404 page not found"),
    ],
)
def test_blob_errors(method: str, path: str, status: int, error: str | None) -> None:
    sim = Sim()
    conn = sim.request(method, path, raw=b"data")
    assert conn.status() == status
    if error is not None:
        assert conn.json() == {"error": error}


def test_blob_of_an_installed_models_layer_is_here() -> None:
    sim = Sim()
    model = sim.state.catalog.get("llama3")
    assert model is not None
    for layer in model.spec.layers:
        assert sim.request("HEAD", f"/api/blobs/{layer.digest}").status() == 200
    assert sim.sim_state()["blobs"] == [], "only uploads are listed"


def test_a_large_blob_is_hashed_a_chunk_per_reactor_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobs, "HASH_CHUNK", 8)
    sim = Sim()
    data = bytes(range(30))
    conn = sim.request("POST", "/api/blobs/sha256:" + hashlib.sha256(data).hexdigest(), raw=data)
    assert conn.raw() == b"", "not answered before the reactor ran"
    for _ in range(3):
        sim.clock.advance(0)
    assert conn.status() == 201
    (stored,) = sim.state.blobs
    assert stored.size == 30 and stored.magic == data[:4]


def test_a_client_gone_mid_hash_stops_the_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobs, "HASH_CHUNK", 8)
    sim = Sim()
    data = bytes(64)
    conn = sim.request("POST", "/api/blobs/sha256:" + hashlib.sha256(data).hexdigest(), raw=data)
    conn.hang_up()
    assert sim.clock.getDelayedCalls() == []
    assert len(sim.state.blobs) == 0
    assert sim.state.counters.in_flight == 0


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=64))
def test_hash_stream_is_sha256_whatever_the_chunking(data: bytes, chunk: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blobs, "HASH_CHUNK", chunk)
        steps = hash_stream(io.BytesIO(data))
        turns = 0
        while True:
            try:
                next(steps)
                turns += 1
            except StopIteration as done:
                blob = done.value
                break
    assert blob == Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data), data[:4])
    assert turns == max(0, (len(data) - 1) // chunk)


def test_blob_store_forgets_the_oldest_beyond_its_limit() -> None:
    store = BlobStore(limit=2)
    for n in range(3):
        store.add(Blob(f"sha256:{n}", n))
    assert [b.digest for b in store] == ["sha256:1", "sha256:2"]


# -- create ------------------------------------------------------------------------------------


def test_create_from_files_streams_paced_progress() -> None:
    sim = Sim(create_time=0.2, pull_tick=0.1)
    assert upload(sim, GGUF) == 201
    conn = sim.request("POST", "/api/create", {"model": "mine", "files": {"m.gguf": GGUF_DIGEST}})
    assert b"application/x-ndjson" in conn.headers()
    first = conn.lines()
    assert statuses(first) == ["parsing GGUF", "validating GGUF model"]
    assert first[1] == {
        "status": "validating GGUF model",
        "digest": "0000000000000000000",
        "total": len(GGUF),
    }
    sim.advance(0.1)
    assert conn.lines()[2]["completed"] == len(GGUF) // 2
    assert "mine:latest" not in tags(sim)
    sim.advance(0.1)
    lines = conn.lines()
    validated = "sha256:" + hashlib.sha256(f"{GGUF_DIGEST}/validated".encode()).hexdigest()
    assert statuses(lines)[3:] == [
        "validating GGUF model",
        "verifying conversion",
        f"creating new layer {validated}",
        "writing manifest",
        "success",
    ]
    assert lines[3]["completed"] == len(GGUF)
    assert "mine:latest" in tags(sim)
    shown = sim.request("POST", "/api/show", {"model": "mine"}).json()
    assert shown["details"]["quantization_level"] == "F16"
    assert sim.sim_state()["created"] == [
        {
            "model": "mine:latest",
            "from": None,
            "files": {"m.gguf": GGUF_DIGEST},
            "adapters": {},
            "quantize": None,
        }
    ]
    # The same file again: the validated layer is here now.
    again = sim.request("POST", "/api/create", {"model": "other", "files": {"m": GGUF_DIGEST}})
    sim.advance(0.3)
    assert f"using existing layer {validated}" in statuses(again.lines())
    assert sim.state.counters.creates == 2


def test_create_without_streaming_answers_the_last_object() -> None:
    sim = Sim()
    upload(sim, GGUF)
    body = {"model": "mine", "files": {"m.gguf": GGUF_DIGEST}, "stream": False}
    conn = sim.request("POST", "/api/create", body)
    assert (conn.status(), conn.json()) == (200, {"status": "success"})
    assert b"content-length" in conn.headers()


def test_create_from_a_model_with_template_system_and_parameters() -> None:
    sim = Sim()
    body = {
        "model": "Pirate",
        "from": "llama3",
        "template": "{{ .Prompt }}",
        "system": "Talk like a pirate.",
        "parameters": {"temperature": 0.5, "stop": ["<x>", "y"]},
    }
    lines = sim.request("POST", "/api/create", body).lines()
    source = sim.state.catalog.get("llama3")
    assert source is not None
    kept = [layer.digest for layer in source.spec.layers if layer.kind in ("model", "license")]
    params = go_json({"stop": ["<x>", "y"], "temperature": 0.5})
    assert params == b'{"stop":["\\u003cx\\u003e","y"],"temperature":0.5}\n'
    new = [hashlib.sha256(x).hexdigest() for x in (b"{{ .Prompt }}", b"Talk like a pirate.")]
    assert statuses(lines) == [
        f"using existing layer {kept[0]}",
        f"using existing layer {kept[1]}",
        f"creating new layer sha256:{new[0]}",
        f"creating new layer sha256:{new[1]}",
        f"creating new layer sha256:{hashlib.sha256(params).hexdigest()}",
        "writing manifest",
        "success",
    ]
    shown = sim.request("POST", "/api/show", {"model": "pirate"}).json()
    assert shown["template"] == "{{ .Prompt }}" and shown["system"] == "Talk like a pirate."
    assert shown["parameters"].splitlines() == [
        'stop                           "<x>"',
        'stop                           "y"',
        "temperature                    0.5",
    ]
    assert shown["details"]["parent_model"] == "llama3:latest"
    assert shown["details"]["family"] == "llama"
    assert "Pirate:latest" in tags(sim)
    assert sim.request("POST", "/api/generate", {"model": "pirate", "prompt": "hi"}).status() == 200


def test_create_from_a_model_absent_here_pulls_it_first() -> None:
    sim = Sim()
    lines = sim.request("POST", "/api/create", {"model": "m2", "from": "mistral"}).lines()
    got = statuses(lines)
    pull_ends = got.index("success")
    assert got[0] == "pulling manifest" and got[pull_ends - 1] == "writing manifest"
    assert got[pull_ends + 1].startswith("using existing layer sha256:"), "Ollama's pull says so"
    assert got[-2:] == ["writing manifest", "success"]
    assert {"mistral:latest", "m2:latest"} <= set(tags(sim))
    assert sim.sim_state()["pulled"] == [{"model": "mistral:latest"}]


def test_create_from_a_model_nowhere_fails_like_its_pull() -> None:
    sim = Sim()
    conn = sim.request("POST", "/api/create", {"model": "m2", "from": "nowhere"})
    assert conn.status() == 200
    assert statuses(conn.lines()) == [
        "pulling manifest",
        "error: pull model manifest: file does not exist",
    ]
    body = {"model": "m2", "from": "nowhere", "stream": False}
    conn = sim.request("POST", "/api/create", body)
    assert conn.status() == 500
    assert conn.json() == {"error": "pull model manifest: file does not exist"}
    assert sim.state.counters.create_failures == 2 and "m2:latest" not in tags(sim)


@pytest.mark.parametrize(
    ("files", "streamed", "status", "error"),
    [
        (
            {"m.gguf": ABSENT},
            ["parsing GGUF"],
            500,
            f"open /root/.ollama/models/blobs/sha256-{ABSENT[7:]}: no such file or directory",
        ),
        (
            {"m.gguf": NOT_GGUF_DIGEST},
            ["parsing GGUF"],
            400,
            "supplied file was not in GGUF format",
        ),
        ({"m.gguf": "sha256:short"}, ["parsing GGUF"], 500, "invalid digest format"),
        ({"m.bin": NOT_GGUF_DIGEST}, [], 400, "unknown type"),
        ({"m.bin": ABSENT}, [], 400, "unknown type"),
        ({"w.safetensors": ABSENT}, [], 500, "no such file or directory"),
    ],
)
def test_create_from_files_that_are_not_usable(
    files: dict[str, str], streamed: list[str], status: int, error: str
) -> None:
    sim = Sim()
    upload(sim, NOT_GGUF)
    conn = sim.request("POST", "/api/create", {"model": "m", "files": files})
    if streamed:
        assert conn.status() == 200, "an error after progress is one more line"
        *before, last = conn.lines()
        assert statuses(before) == streamed
        assert error in last["error"]
    else:
        assert conn.status() == status
        assert error in conn.json()["error"]
    conn = sim.request("POST", "/api/create", {"model": "m", "files": files, "stream": False})
    assert conn.status() == status and error in conn.json()["error"]
    assert "m:latest" not in tags(sim)


def test_create_from_safetensors_converts() -> None:
    sim = Sim()
    upload(sim, NOT_GGUF)
    files = {"model.safetensors": NOT_GGUF_DIGEST, "config.json": NOT_GGUF_DIGEST}
    lines = sim.request("POST", "/api/create", {"model": "st", "files": files}).lines()
    got = statuses(lines)
    assert got[0] == "converting model" and got[1].startswith("creating new layer sha256:")
    assert got[-1] == "success" and "st:latest" in tags(sim)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"files": {"m.gguf": GGUF_DIGEST}}, "invalid model name"),
        ({"model": "a b", "from": "llama3"}, "invalid model name"),
        ({"model": "m"}, "neither 'from' or 'files' was specified"),
        ({"model": "m", "from": "bad name"}, "invalid model name"),
        ({"model": "m", "files": {"../m.gguf": GGUF_DIGEST}}, "file path must be relative"),
        ({"model": "m", "files": {"/m.gguf": GGUF_DIGEST}}, "file path must be relative"),
        ({"model": "m", "files": {"m.gguf": ""}}, "invalid digest format"),
        ({"model": "m", "from": "llama3", "adapters": {"a": ""}}, "invalid digest format"),
        (
            {"model": "m", "files": ["m.gguf"]},
            "json: cannot unmarshal array into Go struct field CreateRequest.files of type "
            "map[string]string",
        ),
        (
            {"model": "m", "files": {"m.gguf": 1}},
            "json: cannot unmarshal number into Go struct field CreateRequest.files of type string",
        ),
        (
            {"model": 5},
            "json: cannot unmarshal number into Go struct field CreateRequest.model of type string",
        ),
        (
            {"model": "m", "from": "llama3", "stream": "no"},
            "json: cannot unmarshal string into Go struct field CreateRequest.stream of type bool",
        ),
        ({"model": "m", "from": "llama3", "template": "x" * (1 << 20 + 1)}, "longer than"),
        ({"model": "m", "files": {str(n): GGUF_DIGEST for n in range(1025)}}, "more than 1024"),
        ({"model": "m", "draft_quantize": "q8_0", "from": "llama3"}, "requires a DRAFT model"),
    ],
)
def test_create_refusals_before_any_progress(body: dict[str, Any], error: str) -> None:
    sim = Sim()
    upload(sim, GGUF)
    conn = sim.request("POST", "/api/create", body)
    assert conn.status() == 400
    assert b"application/json" in conn.headers()
    assert error in conn.json()["error"]


def test_create_quantizes_only_unquantized_weights() -> None:
    sim = Sim(create_time=0.1, pull_tick=0.1)
    upload(sim, GGUF)
    body = {"model": "q", "files": {"m.gguf": GGUF_DIGEST}, "quantize": "q4_K_M"}
    conn = sim.request("POST", "/api/create", body)
    sim.advance(0.1)
    got = statuses(conn.lines())
    quantizing = "quantizing F16 model to Q4_K_M"
    assert got[:4] == ["parsing GGUF", quantizing, quantizing, "verifying conversion"]
    assert "validating GGUF model" not in got and got[-1] == "success"
    shown = sim.request("POST", "/api/show", {"model": "q"}).json()
    assert shown["details"]["quantization_level"] == "Q4_K_M"
    assert sim.sim_state()["created"][-1]["quantize"] == "Q4_K_M"
    # llama3 is Q4_0 already.
    lines = sim.request(
        "POST", "/api/create", {"model": "q2", "from": "llama3", "quantize": "q8_0"}
    )
    assert lines.lines() == [
        {"error": "quantization is only supported for F16, BF16 and F32 models"}
    ]
    bad = {"model": "q3", "files": {"m.gguf": GGUF_DIGEST}, "quantize": "q2", "stream": False}
    conn = sim.request("POST", "/api/create", bad)
    assert conn.status() == 500
    assert conn.json()["error"].startswith("unsupported quantization type Q2 - supported types")


def test_create_with_an_adapter_and_delete_prunes_it() -> None:
    sim = Sim()
    adapter = b"GGUF adapter"
    digest = "sha256:" + hashlib.sha256(adapter).hexdigest()
    upload(sim, adapter)
    body = {"model": "tuned", "from": "llama3", "adapters": {"a.gguf": digest}}
    got = statuses(sim.request("POST", "/api/create", body).lines())
    assert got[0] == "parsing GGUF" and f"using existing layer {digest}" in got
    assert got[-1] == "success"
    two = {"model": "t2", "from": "llama3", "adapters": {"a.gguf": digest, "b.gguf": digest}}
    assert sim.request("POST", "/api/create", two).lines() == [
        {"error": "only one adapter is currently supported"}
    ]
    assert sim.request("DELETE", "/api/delete", {"model": "tuned"}).status() == 200
    assert sim.request("HEAD", f"/api/blobs/{digest}").status() == 404, "only it used the adapter"
    assert sim.sim_state()["deleted"] == [{"model": "tuned:latest"}]


def test_create_replaces_a_model_of_the_same_name() -> None:
    sim = Sim()
    sim.request("POST", "/api/create", {"model": "llama3", "from": "llama3", "system": "S"})
    assert tags(sim).count("llama3:latest") == 1
    assert sim.request("POST", "/api/show", {"model": "llama3"}).json()["system"] == "S"


# -- push --------------------------------------------------------------------------------------


def test_push_reports_every_layer_paced() -> None:
    sim = Sim(push_time=0.4, pull_tick=0.1)
    conn = sim.request("POST", "/api/push", {"model": "llama3"})
    model = sim.state.catalog.get("llama3")
    assert model is not None
    first = model.spec.layers[0]
    assert conn.lines()[:2] == [
        {"status": "retrieving manifest"},
        {"status": f"pushing {first.digest[7:19]}", "digest": first.digest, "total": first.size},
    ]
    sim.advance(0.5)
    lines = conn.lines()
    assert statuses(lines)[-2:] == ["pushing manifest", "success"]
    done = [line for line in lines if "total" in line and line.get("completed") == line["total"]]
    assert [line["digest"] for line in done] == [layer.digest for layer in model.spec.layers]
    assert sim.sim_state()["pushed"] == [
        {"model": "llama3:latest", "digests": [layer.digest for layer in model.spec.layers]}
    ]
    assert sim.state.counters.pushes == 1


def test_push_of_a_model_not_here() -> None:
    sim = Sim()
    lines = sim.request("POST", "/api/push", {"name": "nope"}).lines()
    assert statuses(lines) == [
        "retrieving manifest",
        "couldn't retrieve manifest",
        "error: open /root/.ollama/models/manifests/registry.ollama.ai/library/nope/latest:"
        " no such file or directory",
    ]
    conn = sim.request("POST", "/api/push", {"model": "nope", "stream": False})
    assert conn.status() == 500 and "no such file" in conn.json()["error"]
    conn = sim.request("POST", "/api/push", {"model": "llama3", "stream": False})
    assert (conn.status(), conn.json()) == (200, {"status": "success"})
    assert sim.request("POST", "/api/push", {}).json() == {"error": "model is required"}
    assert sim.request("POST", "/api/push", {"model": "x", "insecure": 1}).status() == 400
    assert sim.state.counters.push_failures == 2


# -- copy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"source": "nope", "destination": "x"}, 404, 'model "nope" not found'),
        ({"source": "a b", "destination": "x"}, 400, 'source "a b" is invalid'),
        ({"source": "llama3"}, 400, 'destination "" is invalid'),
        ({"destination": "x"}, 400, 'source "" is invalid'),
        (
            {"source": 1, "destination": "x"},
            400,
            "json: cannot unmarshal number into Go struct field CopyRequest.source of type string",
        ),
    ],
)
def test_copy_errors(body: dict[str, Any], status: int, error: str) -> None:
    conn = Sim().request("POST", "/api/copy", body)
    assert (conn.status(), conn.json()) == (status, {"error": error})


def test_copy_records_the_copy() -> None:
    sim = Sim()
    conn = sim.request("POST", "/api/copy", {"source": "llama3", "destination": "Mine:v1"})
    assert (conn.status(), conn.body()) == (200, b"")
    assert sim.sim_state()["copied"] == [{"source": "llama3", "destination": "Mine:v1"}]


def test_go_quote() -> None:
    assert go_quote('a"b\\c\n\x01é\u200b') == '"a\\"b\\\\c\\n\\x01é\\u200b"'


@pytest.mark.parametrize(
    ("path", "valid"),
    [("m.gguf", True), ("a/b", True), (".", True), ("", False), ("/a", False), ("a/../b", False)],
)
def test_valid_path(path: str, valid: bool) -> None:
    assert valid_path(path) is valid


# -- unloading and ps --------------------------------------------------------------------------


@pytest.mark.parametrize("keep_alive", [0, 0.0, "0", "0s", "0m"])
@pytest.mark.parametrize("route", ["/api/generate", "/api/chat"])
def test_keep_alive_zero_with_nothing_to_say_unloads(route: str, keep_alive: Any) -> None:
    """What `ollama stop` sends: the model leaves ps and the answer is one JSON object."""
    sim = Sim()
    sim.request("POST", "/api/generate", {"model": "llama3", "prompt": "hi"})
    assert len(sim.ps()) == 1
    conn = sim.request("POST", route, {"model": "llama3", "keep_alive": keep_alive})
    assert conn.status() == 200
    assert b"content-type: application/json" in conn.headers()
    reply = conn.json()
    assert reply["done"] is True and reply["done_reason"] == "unload"
    assert reply["model"] == "llama3"
    if route == "/api/chat":
        assert reply["message"] == {"role": "assistant", "content": ""}
    else:
        assert reply["response"] == ""
    assert sim.ps() == []
    assert sim.sim_state()["unloaded"] == [{"model": "llama3:latest", "reason": "keep_alive"}]


def test_stop_works_for_an_embedding_model_and_a_model_not_loaded() -> None:
    sim = Sim()
    sim.request("POST", "/api/embed", {"model": "all-minilm", "input": "x"})
    conn = sim.request("POST", "/api/generate", {"model": "all-minilm", "keep_alive": 0})
    assert conn.json()["done_reason"] == "unload" and sim.ps() == []
    conn = sim.request("POST", "/api/generate", {"model": "llama3", "keep_alive": 0})
    assert conn.json()["done_reason"] == "unload"
    conn = sim.request("POST", "/api/generate", {"model": "nope", "keep_alive": 0})
    assert conn.status() == 404


def test_unloading_a_busy_model_waits_for_its_request() -> None:
    sim = Sim(tokens=3, tokens_per_second=10)
    streaming = sim.request("POST", "/api/generate", {"model": "llama3", "prompt": "hi"})
    sim.advance(0.05)
    sim.request("POST", "/api/generate", {"model": "llama3", "keep_alive": 0})
    (loaded,) = sim.ps()
    assert loaded["expires_at"].startswith("2023-11-14T22:13:20.05"), "expires now, as Ollama"
    sim.advance(0.3)
    assert streaming.lines()[-1]["done"] is True
    assert sim.ps() == []


def test_ps_lists_the_longest_to_live_first_and_keeps_expires_at_while_busy() -> None:
    sim = Sim(tokens=3, tokens_per_second=10)
    sim.request("POST", "/api/generate", {"model": "llama3", "prompt": "x", "keep_alive": "1m"})
    sim.advance(1)
    sim.request("POST", "/api/embed", {"model": "all-minilm", "input": "x", "keep_alive": "1h"})
    assert [m["name"] for m in sim.ps()] == ["all-minilm:latest", "llama3:latest"]
    (_, llama) = sim.ps()
    before = llama["expires_at"]
    sim.request("POST", "/api/generate", {"model": "llama3", "prompt": "x", "keep_alive": "2h"})
    assert sim.ps()[1]["expires_at"] == before, "while it serves, the last expiry stands"
    sim.advance(1)
    assert [m["name"] for m in sim.ps()] == ["llama3:latest", "all-minilm:latest"]


def test_a_model_expires_from_ps_after_its_keep_alive() -> None:
    sim = Sim()
    sim.request("POST", "/api/generate", {"model": "llama3", "prompt": "x", "keep_alive": 30})
    sim.advance(29.9, step=0.1)
    assert len(sim.ps()) == 1
    sim.advance(0.1)
    assert sim.ps() == []
    assert sim.sim_state()["unloaded"] == [{"model": "llama3:latest", "reason": "expired"}]


# -- /_sim/state -------------------------------------------------------------------------------


def test_sim_state_shows_model_operations_and_reset_clears_them() -> None:
    sim = Sim()
    upload(sim, GGUF)
    sim.request("POST", "/api/create", {"model": "a", "files": {"m.gguf": GGUF_DIGEST}})
    sim.request("POST", "/api/copy", {"source": "a", "destination": "b"})
    sim.request("POST", "/api/push", {"model": "b"})
    sim.request("POST", "/api/generate", {"model": "b", "prompt": "x"})
    sim.request("DELETE", "/api/delete", {"model": "b"})
    sim.request("POST", "/api/pull", {"model": "phi3"})
    sim.request("POST", "/api/generate", {"model": "phi3", "prompt": "x"})
    state = sim.sim_state()
    assert [e["model"] for e in state["created"]] == ["a:latest"]
    assert state["copied"] == [{"source": "a", "destination": "b:latest"}]
    assert [e["model"] for e in state["pushed"]] == ["b:latest"]
    assert state["deleted"] == [{"model": "b:latest"}]
    assert state["unloaded"] == [{"model": "b:latest", "reason": "deleted"}]
    assert state["pulled"] == [{"model": "phi3:latest"}]
    assert state["loaded"] == ["phi3:latest"]
    assert [m["name"] for m in state["ps"]] == ["phi3:latest"]
    assert state["blobs"] == [{"digest": GGUF_DIGEST, "size": len(GGUF)}]
    sim.request("POST", "/_sim/reset")
    state = sim.sim_state()
    assert all(state[k] == [] for k in ("created", "copied", "pushed", "deleted", "unloaded"))
    assert state["blobs"] != [], "blobs are what the server holds, not events"


# -- hostile bodies ----------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_fields = st.sampled_from(
    ["model", "name", "from", "files", "adapters", "template", "system", "license", "parameters",
     "messages", "quantize", "stream", "source", "destination", "insecure", "keep_alive", "prompt"]
)  # fmt: skip
_values = _json | st.sampled_from(["llama3", GGUF_DIGEST, {"m.gguf": GGUF_DIGEST}, "q4_K_M", 0])


@given(
    st.sampled_from(["/api/create", "/api/push", "/api/copy", "/api/generate", "/api/chat"]),
    st.dictionaries(_fields, _values, max_size=6),
)
def test_no_body_makes_a_model_operation_fail_inside(path: str, body: dict[str, Any]) -> None:
    """Whatever the body, the answer is Ollama's: never the simulator's own internal error."""
    sim = Sim()
    upload(sim, GGUF)
    conn = sim.request("POST", path, body)
    sim.advance(0.01)
    assert b"internal simulator error" not in conn.raw()
    assert conn.status() in (200, 400, 404, 500)
