"""The native Ollama routes under `/` and `/api/`."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.server import NOT_DONE_YET, Request

from ollamaflow import modelnames
from ollamaflow.sim import content, prompts
from ollamaflow.sim.blobs import INVALID_DIGEST, Blob, blob_key, hash_stream, valid_digest
from ollamaflow.sim.catalog import InstalledModel
from ollamaflow.sim.emitter import Emitter, Script
from ollamaflow.sim.generation import Format, OllamaFormat, generation_script, plan
from ollamaflow.sim.progress import Steps, last_progress, stream_progress
from ollamaflow.sim.prompts import Prompt
from ollamaflow.sim.responses import (
    JSON,
    NDJSON,
    HTTPError,
    dumps,
    empty_response,
    json_response,
    model_not_found,
)
from ollamaflow.sim.scheduler import (
    BUSY_MESSAGE,
    Lease,
    ModelTooLarge,
    ServerBusy,
    parse_keep_alive,
)
from ollamaflow.sim.state import SimState, model_field
from ollamaflow.sim.timefmt import rfc3339
from ollamaflow.sim.transfer import (
    bind_error,
    create_steps,
    go_quote,
    parse_create,
    pull_steps,
    push_steps,
    stream_field,
)

Body = dict[str, Any]


def keep_alive_of(state: SimState, body: Body) -> float:
    """The request's `keep_alive` in seconds (the default when absent); 400 when malformed."""
    try:
        return parse_keep_alive(
            body.get("keep_alive"), state.config.keep_alive, units_required=True
        )
    except ValueError as e:
        raise HTTPError(400, str(e)) from None


def acquire(
    state: SimState,
    model: InstalledModel,
    body: Body,
    prompt: Prompt | None = None,
    *,
    needs_slot: bool = True,
) -> Deferred[Lease]:
    """A slot on `model` honouring the request's `keep_alive`; 400, 500 (a model larger than
    the VRAM) or 503 errors raised."""
    keep_alive = keep_alive_of(state, body)
    try:
        return state.scheduler.acquire(model, keep_alive, prompt, needs_slot=needs_slot)
    except ServerBusy:
        raise HTTPError(503, BUSY_MESSAGE) from None
    except ModelTooLarge as e:
        raise HTTPError(500, str(e)) from None


def emit(
    state: SimState, request: Request, script: Script, *, streaming: bool, ctype: bytes | None
) -> int:
    """Run a script as this request's response (`ctype` None: no content type, as Ollama's
    empty answers)."""
    if ctype is None:
        request.defaultContentType = None
    else:
        request.setHeader(b"content-type", ctype)
    faults = state.stream_faults() if streaming else None
    emitter = Emitter(request, state.clock, state.counters, script, streaming)
    if faults is not None:
        emitter.faults = faults
    emitter.start()
    return NOT_DONE_YET


def _chat_prompt(state: SimState, body: Body) -> tuple[int, Prompt | None] | None:
    """A chat's prompt tokens and, when prompts are cached, its `Prompt`; None: no messages."""
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise HTTPError(400, "messages must be a list")
    if not messages:
        return None
    if state.config.caches_prompts():
        prompt = prompts.of_messages(messages)
        return prompt.total, prompt
    return content.count_message_tokens(messages), None


def _generate_prompt(state: SimState, body: Body) -> tuple[int, Prompt | None] | None:
    """A generate's prompt tokens and, when prompts are cached, its `Prompt` (with `system`);
    None: no prompt."""
    text = body.get("prompt") or ""
    if not isinstance(text, str):
        raise HTTPError(400, "prompt must be a string")
    if not text:
        return None
    if state.config.caches_prompts():
        system = body.get("system")
        prompt = prompts.of_text(text, system if isinstance(system, str) else "")
        return prompt.total, prompt
    return content.count_tokens(text), None


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
        parsed = _chat_prompt(state, body) if chat else _generate_prompt(state, body)
        stop = parsed is None and body.get("keep_alive") is not None
        if stop and keep_alive_of(state, body) == 0:
            return self._unload(request, model, name, chat=chat)
        if model.spec.embedding_only:
            raise HTTPError(400, f'"{name}" does not support {"chat" if chat else "generate"}')
        if parsed is None:
            return self._load_only(request, body, model, name, chat=chat)
        prompt_tokens, prompt = parsed
        options = body.get("options")
        limit = options.get("num_predict") if isinstance(options, dict) else None
        the_plan = plan(state, name, prompt_tokens, limit)
        acquired = acquire(state, model, body, prompt)
        fmt: Format = OllamaFormat(name, chat)
        script = generation_script(
            state, acquired, the_plan, fmt, streaming=streaming, started=started
        )
        return emit(
            state, request, script, streaming=streaming, ctype=NDJSON if streaming else JSON
        )

    @staticmethod
    def _empty_reply(name: str, now: float, reason: str, *, chat: bool) -> Body:
        """Ollama's answer to an empty prompt: `done_reason` `load` or `unload`."""
        reply: Body = {"model": name, "created_at": rfc3339(now)}
        if chat:
            reply["message"] = {"role": "assistant", "content": ""}
        else:
            reply["response"] = ""
        reply["done"] = True
        reply["done_reason"] = reason
        return reply

    def _unload(self, request: Request, model: InstalledModel, name: str, *, chat: bool) -> bytes:
        """An empty prompt with keep_alive 0 (`ollama stop`): the model unloads once idle and
        the answer is one JSON object, streaming or not, as Ollama's."""
        state = self.state
        state.scheduler.unload(model.name)
        reply = self._empty_reply(name, state.clock.seconds(), "unload", chat=chat)
        return json_response(request, reply)

    def _load_only(
        self, request: Request, body: Body, model: InstalledModel, name: str, *, chat: bool
    ) -> int:
        """An empty prompt loads the model (waiting for the load, not for a slot) and sets its
        keep_alive; the answer is one JSON object once loaded, streaming or not, as Ollama's."""
        state = self.state
        acquired = acquire(state, model, body, needs_slot=False)

        def script() -> Script:
            lease: Lease = yield acquired
            lease.release()
            yield dumps(self._empty_reply(name, state.clock.seconds(), "load", chat=chat))

        return emit(state, request, script(), streaming=False, ctype=JSON)

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
        return self._progress(request, pull_steps(self.state, name), streaming=_streams(body))

    def create(self, request: Request, body: Body | None) -> int:
        """`/api/create` from a model (`from`) or uploaded blobs (`files`, `adapters`)."""
        assert body is not None
        create = parse_create(body)
        steps = create_steps(self.state, create)
        return self._progress(request, steps, streaming=create.streaming)

    def push(self, request: Request, body: Body | None) -> int:
        """`/api/push`: progress per layer; every push of a model present here succeeds."""
        assert body is not None
        streaming = stream_field(body, "PushRequest")
        insecure = body.get("insecure")
        if insecure is not None and not isinstance(insecure, bool):
            raise bind_error("PushRequest", "insecure", insecure, "bool")
        name = model_field(body, legacy_name=True)
        return self._progress(request, push_steps(self.state, name), streaming=streaming)

    def _progress(self, request: Request, steps: Steps, *, streaming: bool) -> int:
        if streaming:
            script = stream_progress(request, steps)
            return emit(self.state, request, script, streaming=True, ctype=NDJSON)
        script = last_progress(request, steps)
        return emit(self.state, request, script, streaming=False, ctype=JSON)

    def delete(self, request: Request, body: Body | None) -> bytes:
        assert body is not None
        state = self.state
        name = model_field(body, legacy_name=True)
        try:
            removed = state.catalog.remove(name)
        except modelnames.InvalidModelName:
            raise HTTPError(400, "invalid model name") from None
        if removed is None:
            raise model_not_found(name)
        state.scheduler.unload(removed.name, "deleted")
        state.forget_layers(removed)
        state.events.deleted.append({"model": removed.name})
        return empty_response(request)

    def copy(self, request: Request, body: Body | None) -> bytes:
        """Ollama's CopyHandler: names checked, then 404 `model "x" not found` (Go's %q)."""
        assert body is not None
        names: dict[str, str] = {}
        for field in ("source", "destination"):
            value = body.get(field)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise bind_error("CopyRequest", field, value, "string")
            try:
                modelnames.parse(value)
            except modelnames.InvalidModelName:
                raise HTTPError(400, f"{field} {go_quote(value)} is invalid") from None
            names[field] = value
        source, destination = names["source"], names["destination"]
        state = self.state
        copied = state.catalog.copy(source, destination, state.clock.seconds())
        if copied is None:
            raise HTTPError(404, f"model {go_quote(source)} not found")
        state.events.copied.append({"source": source, "destination": copied.name})
        return empty_response(request)

    def blob_head(self, request: Request, digest: str) -> bytes:
        """`HEAD /api/blobs/:digest`: 200 if the blob is here, else 404."""
        if not valid_digest(digest):
            raise HTTPError(400, INVALID_DIGEST)
        if not self.state.has_blob(blob_key(digest)):
            raise HTTPError(404, f"blob {go_quote(digest)} not found")
        return empty_response(request)

    def blob_upload(self, request: Request, digest: str) -> int | bytes:
        """`POST /api/blobs/:digest`: 200 if already here, else the body is hashed (a chunk per
        reactor turn) and stored, 201, or 400 when its digest is not the one named (Ollama keeps
        such a body under its real digest all the same)."""
        if not valid_digest(digest):
            raise HTTPError(400, INVALID_DIGEST)
        state = self.state
        if state.has_blob(blob_key(digest)):
            return empty_response(request)
        body = request.content
        assert body is not None

        def script() -> Script:
            hashing = hash_stream(body)
            while True:
                try:
                    next(hashing)
                except StopIteration as done:
                    blob: Blob = done.value
                    break
                yield deferLater(state.clock, 0, lambda: None)
            state.blobs.add(blob)
            if blob.digest != digest:
                request.setResponseCode(400)
                request.setHeader(b"content-type", JSON)
                expected, got = go_quote(digest), go_quote(blob.digest)
                yield dumps({"error": f"digest mismatch, expected {expected}, got {got}"})
                return
            state.counters.blob_uploads += 1
            request.setResponseCode(201)
            yield b""

        return emit(state, request, script(), streaming=False, ctype=None)


def one_shot(state: SimState, acquired: Deferred[Lease], result: Any) -> Script:
    """Wait for a slot and `ttft`, then send `result(lease, now)` as the single body."""
    lease: Lease = yield acquired
    try:
        if state.config.ttft > 0:
            yield state.config.ttft
        yield result(lease, state.clock.seconds())
    finally:
        lease.release()
