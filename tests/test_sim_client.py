"""The official `ollama` and `openai` Python clients, unchanged, against an in-process simulator.

The clients are synchronous, so each scenario runs in a thread (`deferToThread`) while the
simulator serves on the reactor thread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama
import openai
import pytest
import pytest_twisted
from harness import until
from twisted.internet.threads import deferToThread

from ollamaflow.sim import RunningSimulator, SimConfig

Start = Callable[..., Awaitable[RunningSimulator]]
T = TypeVar("T")
CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


async def in_thread(fn: Callable[[], T]) -> T:
    result: T = await deferToThread(fn)
    return result


def client(sim: RunningSimulator, timeout: float = 10) -> ollama.Client:
    return ollama.Client(host=sim.url, timeout=timeout)


@pytest_twisted.ensureDeferred
async def test_list_show_ps(simulators: Start) -> None:
    sim = await simulators()
    c = client(sim)
    listed = await in_thread(c.list)
    assert sorted(m.model or "" for m in listed.models) == ["all-minilm:latest", "llama3:latest"]
    assert listed.models[0].details is not None and listed.models[0].size
    shown = await in_thread(lambda: c.show("llama3"))
    assert shown.modelinfo is not None and shown.capabilities == ["completion"]
    assert shown.details is not None and shown.details.family == "llama"
    assert (await in_thread(c.ps)).models == []
    await in_thread(lambda: c.generate("llama3", "hi"))
    (loaded,) = (await in_thread(c.ps)).models
    assert loaded.name == "llama3:latest" and loaded.expires_at is not None


@pytest_twisted.ensureDeferred
async def test_chat_and_generate(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(tokens=6))
    c = client(sim)
    reply = await in_thread(lambda: c.chat("llama3", messages=CHAT))
    assert reply.done and reply.message.content == "The quick brown fox jumps over"
    assert reply.eval_count == 6 and reply.model == "llama3"
    chunks = await in_thread(lambda: list(c.chat("llama3", messages=CHAT, stream=True)))
    assert [ch.done for ch in chunks] == [False] * 6 + [True]
    assert "".join(ch.message.content or "" for ch in chunks) == reply.message.content
    generated = await in_thread(lambda: c.generate("llama3:latest", "hello"))
    assert generated.response == reply.message.content and generated.context
    parts = await in_thread(lambda: list(c.generate("llama3", "hello", stream=True)))
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_duration


@pytest_twisted.ensureDeferred
async def test_embed(simulators: Start) -> None:
    sim = await simulators()
    c = client(sim)
    embedded = await in_thread(lambda: c.embed("all-minilm", ["one", "two"]))
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 384
    legacy = await in_thread(lambda: c.embeddings("all-minilm", "one"))
    assert list(legacy.embedding) == list(embedded.embeddings[0])


@pytest_twisted.ensureDeferred
async def test_pull_delete_and_unknown_model(simulators: Start) -> None:
    sim = await simulators()
    c = client(sim)
    progress = await in_thread(lambda: list(c.pull("mistral", stream=True)))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert any(p.completed == p.total and p.total for p in progress)
    done = await in_thread(lambda: c.pull("phi3"))
    assert done.status == "success"
    names = {m.model for m in (await in_thread(c.list)).models}
    assert {"mistral:latest", "phi3:latest"} <= names
    assert (await in_thread(lambda: c.delete("mistral"))).status == "success"
    names = {m.model for m in (await in_thread(c.list)).models}
    assert "mistral:latest" not in names

    with pytest.raises(ollama.ResponseError) as missing:
        await in_thread(lambda: c.chat("mistral", messages=CHAT))
    assert missing.value.status_code == 404
    assert missing.value.error == "model 'mistral' not found"
    with pytest.raises(ollama.ResponseError) as unknown:
        await in_thread(lambda: list(c.pull("no-such-model", stream=True)))
    assert unknown.value.error == "pull model manifest: file does not exist"
    with pytest.raises(ollama.ResponseError) as unknown:
        await in_thread(lambda: c.pull("no-such-model"))
    assert unknown.value.status_code == 500


@pytest_twisted.ensureDeferred
async def test_create_blob_then_create_from_files(simulators: Start, tmp_path: Path) -> None:
    sim = await simulators(config=SimConfig(create_time=0.2, pull_tick=0.05))
    c = client(sim)
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" + bytes(range(256)) * 400)  # over Twisted's in-memory body size
    digest = await in_thread(lambda: c.create_blob(weights))
    assert sim.state.has_blob(digest)
    assert await in_thread(lambda: c.create_blob(weights)) == digest, "a second upload: 200"
    progress = await in_thread(
        lambda: list(
            c.create("mine", files={"model.gguf": digest}, template="{{ .Prompt }}", stream=True)
        )
    )
    statuses = [p.status for p in progress]
    assert statuses[0] == "parsing GGUF" and statuses[-2:] == ["writing manifest", "success"]
    assert any(p.completed and p.completed < (p.total or 0) for p in progress), "paced progress"
    shown = await in_thread(lambda: c.show("mine"))
    assert shown.template == "{{ .Prompt }}" and shown.modelinfo is not None
    reply = await in_thread(lambda: c.generate("mine", "hi"))
    assert reply.done
    done = await in_thread(lambda: c.create("mine2", from_="mine", quantize=None))
    assert done.status == "success"
    assert sim.state.events.created[-1]["from"] == "mine"

    with pytest.raises(ollama.ResponseError) as missing:
        await in_thread(lambda: c.create("x", files={"m.gguf": "sha256:" + "0" * 64}))
    assert missing.value.status_code == 500 and "no such file" in missing.value.error
    with pytest.raises(ollama.ResponseError) as streamed:
        await in_thread(lambda: list(c.create("x", from_="no-such-model", stream=True)))
    assert streamed.value.error == "pull model manifest: file does not exist"
    with pytest.raises(ollama.ResponseError) as neither:
        await in_thread(lambda: c.create("x"))
    assert neither.value.status_code == 400


@pytest_twisted.ensureDeferred
async def test_push_copy_and_stop(simulators: Start) -> None:
    sim = await simulators()
    c = client(sim)
    progress = await in_thread(lambda: list(c.push("llama3", stream=True)))
    assert progress[0].status == "retrieving manifest" and progress[-1].status == "success"
    assert [e["model"] for e in sim.state.events.pushed] == ["llama3:latest"]
    with pytest.raises(ollama.ResponseError) as absent:
        await in_thread(lambda: c.push("nope"))
    assert absent.value.status_code == 500
    assert (await in_thread(lambda: c.copy("llama3", "mine"))).status == "success"
    with pytest.raises(ollama.ResponseError) as unknown:
        await in_thread(lambda: c.copy("nope", "mine"))
    assert (unknown.value.status_code, unknown.value.error) == (404, 'model "nope" not found')
    await in_thread(lambda: c.generate("llama3", "hi"))
    assert [m.model for m in (await in_thread(c.ps)).models] == ["llama3:latest"]
    stopped = await in_thread(lambda: c.generate("llama3", keep_alive=0))
    assert stopped.done_reason == "unload"
    assert (await in_thread(c.ps)).models == []


@pytest_twisted.ensureDeferred
async def test_fault_refuse(simulators: Start) -> None:
    sim = await simulators()
    await sim.configure(refuse=True)
    with pytest.raises(ConnectionError):
        await in_thread(client(sim).list)
    await sim.configure(refuse=False)
    assert (await in_thread(client(sim).list)).models


@pytest_twisted.ensureDeferred
async def test_fault_error500(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(error500=True))
    with pytest.raises(ollama.ResponseError) as failed:
        await in_thread(lambda: client(sim).chat("llama3", messages=CHAT))
    assert failed.value.status_code == 500


@pytest_twisted.ensureDeferred
async def test_fault_hang_times_out(simulators: Start) -> None:
    sim = await simulators()
    sim.config.hang = True
    with pytest.raises(httpx.TimeoutException):
        await in_thread(lambda: client(sim, timeout=0.5).list())
    await until(lambda: sim.counters.client_disconnects == 1)
    assert sim.counters.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_fault_drop_mid_stream(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(tokens=10, drop_mid_stream_after=3))
    seen: list[Any] = []

    def consume() -> None:
        for chunk in client(sim).chat("llama3", messages=CHAT, stream=True):
            seen.append(chunk)

    with pytest.raises(httpx.RemoteProtocolError):
        await in_thread(consume)
    assert len(seen) == 3
    assert sim.counters.dropped_streams == 1 and sim.counters.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_fault_stall_between_chunks(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(tokens=4, stall_after=2, stall_seconds=0.3))

    def timed() -> list[float]:
        stamps = []
        for _chunk in client(sim).generate("llama3", "hi", stream=True):
            stamps.append(time.monotonic())
        return stamps

    stamps = await in_thread(timed)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps[1] >= 0.29
    assert max(gaps[:1] + gaps[2:]) < 0.2


@pytest_twisted.ensureDeferred
async def test_busy_when_load_queue_is_full(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(load_time=0.5, max_queue=1))
    c = client(sim)
    first = deferToThread(lambda: c.generate("llama3", "hi"))
    await until(lambda: sim.counters.in_flight == 1)
    with pytest.raises(ollama.ResponseError) as busy:
        await in_thread(lambda: client(sim).generate("llama3", "hi"))
    assert busy.value.status_code == 503
    assert "server busy" in busy.value.error
    assert (await first).done


@pytest_twisted.ensureDeferred
async def test_openai_client_stream(simulators: Start) -> None:
    sim = await simulators(config=SimConfig(tokens=4))
    oa = openai.OpenAI(base_url=sim.url + "/v1", api_key="ollama", timeout=10)

    def chat_stream() -> list[str]:
        stream: Any = oa.chat.completions.create(model="llama3", messages=CHAT, stream=True)  # type: ignore[arg-type]
        return [c.choices[0].delta.content or "" for c in stream if c.choices]

    pieces = await in_thread(chat_stream)
    assert "".join(pieces) == "The quick brown fox"
    models = await in_thread(lambda: [m.id for m in oa.models.list()])
    assert "llama3:latest" in models
    vectors = await in_thread(lambda: oa.embeddings.create(model="all-minilm", input="x"))
    assert len(vectors.data[0].embedding) == 384
