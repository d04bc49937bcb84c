"""The OpenAI-compatible routes under `/v1/`, shaped as Ollama serves them."""

from __future__ import annotations

import base64
import itertools
import struct
from typing import Any

import attrs
from twisted.web.server import Request

from ollamaflow import modelnames
from ollamaflow.sim import content, prompts
from ollamaflow.sim.catalog import InstalledModel
from ollamaflow.sim.generation import OpenAIFormat, generation_script, plan
from ollamaflow.sim.ollama_api import acquire, emit, one_shot
from ollamaflow.sim.prompts import Prompt
from ollamaflow.sim.responses import JSON, SSE, HTTPError, dumps, json_response
from ollamaflow.sim.scheduler import Lease
from ollamaflow.sim.state import SimState, model_field

Body = dict[str, Any]
_ids = itertools.count(1)


def _model_entry(model: InstalledModel) -> Body:
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.modified_at),
        "owned_by": modelnames.parse(model.name).namespace,
    }


@attrs.define
class OpenAIAPI:
    """Handlers for `/v1/models`, chat and text completions, and embeddings."""

    state: SimState

    def models(self, request: Request, body: Body | None) -> bytes:
        data = [_model_entry(m) for m in self.state.catalog]
        return json_response(request, {"object": "list", "data": data})

    def model(self, request: Request, name: str) -> bytes:
        """`GET /v1/models/{name}`."""
        return json_response(request, _model_entry(self.state.installed(name)))

    def chat_completions(self, request: Request, body: Body | None) -> int:
        assert body is not None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "[] is too short - 'messages'")
        if self.state.config.caches_prompts():
            prompt = prompts.of_messages(messages)
            return self._complete(request, body, prompt.total, prompt, chat=True)
        tokens = content.count_message_tokens(messages)
        return self._complete(request, body, tokens, None, chat=True)

    def completions(self, request: Request, body: Body | None) -> int:
        assert body is not None
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise HTTPError(400, "prompt must be a string")
        if self.state.config.caches_prompts():
            cached = prompts.of_text(prompt)
            return self._complete(request, body, cached.total, cached, chat=False)
        return self._complete(request, body, content.count_tokens(prompt), None, chat=False)

    def _complete(
        self,
        request: Request,
        body: Body,
        prompt_tokens: int,
        prompt: Prompt | None,
        *,
        chat: bool,
    ) -> int:
        """Generate for chat or text completions; `prompt` when slots cache prompts."""
        state = self.state
        started = state.clock.seconds()
        name = model_field(body)
        model = state.installed(name)
        if model.spec.embedding_only:
            raise HTTPError(400, f'"{name}" does not support {"chat" if chat else "generate"}')
        streaming = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{next(_ids)}"
        fmt = OpenAIFormat(name, ident, int(started), chat=chat, include_usage=include_usage)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        the_plan = plan(state, name, prompt_tokens, limit)
        acquired = acquire(state, model, body, prompt)
        script = generation_script(
            state, acquired, the_plan, fmt, streaming=streaming, started=started
        )
        return emit(state, request, script, streaming=streaming, ctype=SSE if streaming else JSON)

    def embeddings(self, request: Request, body: Body | None) -> int:
        assert body is not None
        state = self.state
        name = model_field(body)
        model = state.installed(name)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if (
            not inputs
            or not isinstance(inputs, list)
            or not all(isinstance(i, str) for i in inputs)
        ):
            raise HTTPError(400, "invalid input")
        as_base64 = body.get("encoding_format") == "base64"
        size = model.spec.embedding_length
        dims = body.get("dimensions")
        if isinstance(dims, int) and not isinstance(dims, bool) and 0 < dims <= size:
            size = dims
        acquired = acquire(state, model, body)

        def result(lease: Lease, now: float) -> bytes:
            data = []
            for index, text in enumerate(inputs):
                vec = content.vector(model.name.lower(), text, size)
                encoded: Any = vec
                if as_base64:
                    encoded = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                data.append({"object": "embedding", "embedding": encoded, "index": index})
            tokens = sum(content.count_tokens(t) for t in inputs)
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return dumps({"object": "list", "data": data, "model": name, "usage": usage})

        return emit(state, request, one_shot(state, acquired, result), streaming=False, ctype=JSON)
