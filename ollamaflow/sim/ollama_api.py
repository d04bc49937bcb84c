"""The native Ollama routes under `/` and `/api/`."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from ollamaflow import modelnames
from ollamaflow.sim import content
from ollamaflow.sim.catalog import InstalledModel, can_pull, spec_for
from ollamaflow.sim.emitter import Emitter, Script
from ollamaflow.sim.generation import Format, OllamaFormat, generation_script, plan
from ollamaflow.sim.responses import (
    JSON,
    NDJSON,
    HTTPError,
    dumps,
    empty_response,
    json_response,
    line,
    model_not_found,
)
from ollamaflow.sim.scheduler import BUSY_MESSAGE, Lease, ServerBusy, parse_keep_alive
from ollamaflow.sim.state import SimState, model_field
from ollamaflow.sim.timefmt import rfc3339

PULL_NOT_FOUND = "pull model manifest: file does not exist"
Body = dict[str, Any]


def acquire(state: SimState, model: InstalledModel, body: Body) -> Deferred[Lease]:
    """A slot on `model` honouring the request's `keep_alive`; 400 or 503 errors raised."""
    try:
        keep_alive = parse_keep_alive(body.get("keep_alive"), state.config.keep_alive)
    except ValueError as e:
        raise HTTPError(400, str(e)) from None
    try:
        return state.scheduler.acquire(model, keep_alive)
    except ServerBusy:
        raise HTTPError(503, BUSY_MESSAGE) from None


def emit(
    state: SimState, request: Request, script: Script, *, streaming: bool, ctype: bytes
) -> int:
    """Run a script as this request's response."""
    request.setHeader(b"content-type", ctype)
    faults = state.stream_faults() if streaming else None
    emitter = Emitter(request, state.clock, state.counters, script, streaming)
    if faults is not None:
        emitter.faults = faults
    emitter.start()
    return NOT_DONE_YET


def _streams(body: Body) -> bool:
    """Native routes stream unless told `"stream": false`."""
    return body.get("stream") is not False


@attrs.define
class OllamaAPI:
    """Handlers for Ollama's own routes."""

    state: SimState
    _version_body: bytes = b""

    def root(self, request: Request, body: Body | None) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    def version(self, request: Request, body: Body | None) -> bytes:
        request.setHeader(b"content-type", JSON)
        return dumps({"version": self.state.config.version})

    def tags(self, request: Request, body: Body | None) -> bytes:
        request.setHeader(b"content-type", JSON)
        return self.state.catalog.tags_body()

    def ps(self, request: Request, body: Body | None) -> bytes:
        return json_response(request, {"models": self.state.scheduler.loaded()})

    def show(self, request: Request, body: Body | None) -> bytes:
        assert body is not None
        model = self.state.installed(model_field(body, legacy_name=True))
        return json_response(request, model.show())

    def generate(self, request: Request, body: Body | None) -> int | bytes:
        assert body is not None
        return self._generate(request, body, chat=False)

    def chat(self, request: Request, body: Body | None) -> int | bytes:
        assert body is not None
        return self._generate(request, body, chat=True)

    def _generate(self, request: Request, body: Body, *, chat: bool) -> int | bytes:
        state = self.state
        started = state.clock.seconds()
        name = model_field(body)
        model = state.installed(name)
        streaming = _streams(body)
        if chat:
            messages = body.get("messages") or []
            if not isinstance(messages, list):
                raise HTTPError(400, "messages must be a list")
            empty = not messages
            prompt_tokens = content.count_message_tokens(messages) if messages else 0
        else:
            prompt = body.get("prompt") or ""
            if not isinstance(prompt, str):
                raise HTTPError(400, "prompt must be a string")
            empty = not prompt
            prompt_tokens = content.count_tokens(prompt) if prompt else 0
        if model.spec.embedding_only:
            raise HTTPError(400, f'"{name}" does not support {"chat" if chat else "generate"}')
        fmt: Format = OllamaFormat(name, chat)
        if empty:
            return self._load_only(request, body, model, name, chat=chat, streaming=streaming)
        options = body.get("options")
        limit = options.get("num_predict") if isinstance(options, dict) else None
        the_plan = plan(state, name, prompt_tokens, limit)
        acquired = acquire(state, model, body)
        script = generation_script(
            state, acquired, the_plan, fmt, streaming=streaming, started=started
        )
        return emit(
            state, request, script, streaming=streaming, ctype=NDJSON if streaming else JSON
        )

    def _load_only(
        self,
        request: Request,
        body: Body,
        model: InstalledModel,
        name: str,
        *,
        chat: bool,
        streaming: bool,
    ) -> int | bytes:
        """An empty prompt loads the model (`done_reason: load`) or, with keep_alive 0, unloads."""
        state = self.state
        reply: Body = {"model": name, "created_at": "", "done": True}
        if chat:
            reply["message"] = {"role": "assistant", "content": ""}
        else:
            reply["response"] = ""
        if body.get("keep_alive") in (0, "0", "0s"):
            state.scheduler.unload(model.name)
            reply["created_at"] = rfc3339(state.clock.seconds())
            reply["done_reason"] = "unload"
            if streaming:
                request.setHeader(b"content-type", NDJSON)
                return line(reply)
            return json_response(request, reply)
        acquired = acquire(state, model, body)

        def script() -> Script:
            lease: Lease = yield acquired
            lease.release()
            reply["created_at"] = rfc3339(state.clock.seconds())
            reply["done_reason"] = "load"
            yield line(reply) if streaming else dumps(reply)

        return emit(
            state, request, script(), streaming=streaming, ctype=NDJSON if streaming else JSON
        )

    def embed(self, request: Request, body: Body | None) -> int:
        assert body is not None
        state = self.state
        started = state.clock.seconds()
        name = model_field(body)
        model = state.installed(name)
        raw = body.get("input", [])
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise HTTPError(400, "invalid input type")
        dims = body.get("dimensions")
        size = model.spec.embedding_length
        if isinstance(dims, int) and not isinstance(dims, bool):
            if not 0 < dims <= size:
                raise HTTPError(400, f"dimensions must be between 1 and {size}")
            size = dims
        acquired = acquire(state, model, body)

        def result(lease: Lease, now: float) -> bytes:
            key = model.name.lower()
            return dumps(
                {
                    "model": name,
                    "embeddings": [content.vector(key, text, size) for text in inputs],
                    "total_duration": max(1, int((now - started) * 1e9)),
                    "load_duration": max(1, int(lease.load_duration * 1e9)),
                    "prompt_eval_count": sum(content.count_tokens(t) for t in inputs),
                }
            )

        return emit(state, request, one_shot(state, acquired, result), streaming=False, ctype=JSON)

    def embeddings(self, request: Request, body: Body | None) -> int:
        """Legacy `/api/embeddings`: one `prompt`, one `embedding`."""
        assert body is not None
        state = self.state
        model = state.installed(model_field(body))
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise HTTPError(400, "prompt must be a string")
        acquired = acquire(state, model, body)

        def result(lease: Lease, now: float) -> bytes:
            if not prompt:
                return dumps({"embedding": []})
            return dumps(
                {
                    "embedding": content.vector(
                        model.name.lower(), prompt, model.spec.embedding_length
                    )
                }
            )

        return emit(state, request, one_shot(state, acquired, result), streaming=False, ctype=JSON)

    def pull(self, request: Request, body: Body | None) -> int:
        assert body is not None
        name = model_field(body, legacy_name=True)
        try:
            modelnames.parse(name)
        except modelnames.InvalidModelName:
            raise HTTPError(400, "invalid model name") from None
        steps = _pull_steps(self.state, name)
        if _streams(body):
            script = _stream_pull(steps)
            return emit(self.state, request, script, streaming=True, ctype=NDJSON)
        return emit(self.state, request, _last_of_pull(request, steps), streaming=False, ctype=JSON)

    def delete(self, request: Request, body: Body | None) -> bytes:
        assert body is not None
        name = model_field(body, legacy_name=True)
        try:
            removed = self.state.catalog.remove(name)
        except modelnames.InvalidModelName:
            raise HTTPError(400, "invalid model name") from None
        if removed is None:
            raise model_not_found(name)
        self.state.scheduler.unload(removed.name)
        return empty_response(request)

    def copy(self, request: Request, body: Body | None) -> bytes:
        assert body is not None
        source, destination = body.get("source"), body.get("destination")
        for field, value in (("source", source), ("destination", destination)):
            if not value or not isinstance(value, str):
                raise HTTPError(400, f"{field} is required")
        assert isinstance(source, str) and isinstance(destination, str)
        try:
            copied = self.state.catalog.copy(source, destination, self.state.clock.seconds())
        except modelnames.InvalidModelName:
            raise HTTPError(400, "invalid model name") from None
        if copied is None:
            raise model_not_found(source)
        return empty_response(request)

    def not_implemented(self, request: Request, body: Body | None) -> bytes:
        """Routes Ollama has but a simulator has no use for (push, create, blobs)."""
        raise HTTPError(501, "not implemented by ollamaflow-sim")


def one_shot(state: SimState, acquired: Deferred[Lease], result: Any) -> Script:
    """Wait for a slot and `ttft`, then send `result(lease, now)` as the single body."""
    lease: Lease = yield acquired
    try:
        if state.config.ttft > 0:
            yield state.config.ttft
        yield result(lease, state.clock.seconds())
    finally:
        lease.release()


def _pull_steps(state: SimState, name: str) -> Generator[float | Body, None, None]:
    """Pull progress as Ollama reports it: pauses and message objects."""
    yield {"status": "pulling manifest"}
    config = state.config
    if not can_pull(name, config.pullable):
        state.counters.pull_failures += 1
        yield {"error": PULL_NOT_FOUND}
        return
    spec = spec_for(name)
    total = sum(layer.size for layer in spec.layers) or 1
    for layer in spec.layers:
        seconds = config.pull_time * layer.size / total
        ticks = 1
        if seconds > 0 and config.pull_tick > 0:
            ticks = max(1, round(seconds / config.pull_tick))
        status = f"pulling {layer.digest[7:19]}"
        yield {"status": status, "digest": layer.digest, "total": layer.size}
        for tick in range(1, ticks + 1):
            if seconds > 0:
                yield seconds / ticks
            completed = layer.size * tick // ticks
            yield {
                "status": status,
                "digest": layer.digest,
                "total": layer.size,
                "completed": completed,
            }
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    state.catalog.add(name, state.clock.seconds(), spec=spec)
    state.counters.pulls += 1
    yield {"status": "success"}


def _stream_pull(steps: Generator[float | Body, None, None]) -> Script:
    for step in steps:
        yield line(step) if isinstance(step, dict) else step


def _last_of_pull(request: Request, steps: Generator[float | Body, None, None]) -> Script:
    """`stream: false`: only the last object, or a 500 with the error."""
    last: Body = {}
    for step in steps:
        if isinstance(step, dict):
            last = step
        else:
            yield step
    if "error" in last:
        request.setResponseCode(500)
    yield dumps(last)
