"""Fake text generation: the paced script shared by generate, chat and the OpenAI routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from ollamaflow.sim import content, prompts
from ollamaflow.sim.emitter import Script
from ollamaflow.sim.responses import SSE_DONE, dumps, event, line
from ollamaflow.sim.scheduler import Lease
from ollamaflow.sim.state import SimState
from ollamaflow.sim.timefmt import rfc3339

_NS = 1_000_000_000


@attrs.frozen
class Plan:
    """What one request will generate."""

    model: str
    """The model string exactly as the client sent it (echoed back)."""
    count: int
    done_reason: str
    prompt_tokens: int
    """Every prompt token, cached or not."""


def plan(state: SimState, model: str, prompt_tokens: int, limit: Any) -> Plan:
    """Tokens to produce: the configured count, cut to a non-negative `limit` ("length")."""
    count = state.config.tokens
    reason = "stop"
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < count:
        count, reason = limit, "length"
    return Plan(model=model, count=count, done_reason=reason, prompt_tokens=prompt_tokens)


@attrs.frozen
class Outcome:
    """The metrics of a finished generation, in nanoseconds as Ollama reports them."""

    done_reason: str
    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int
    prompt_tokens: int = 0
    """Every prompt token, cached or not (generate's `context` holds them all)."""

    def metrics(self) -> dict[str, Any]:
        """The `done: true` fields."""
        return {
            "done_reason": self.done_reason,
            "total_duration": self.total_duration,
            "load_duration": self.load_duration,
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": self.prompt_eval_duration,
            "eval_count": self.eval_count,
            "eval_duration": self.eval_duration,
        }


class Format(Protocol):
    """How one route renders tokens and the end of a generation."""

    def chunk(self, token: str, now: float) -> bytes:
        """A streamed message carrying one token."""

    def final(self, outcome: Outcome, now: float) -> Iterator[bytes]:
        """The messages that end a stream."""

    def whole(self, text: str, outcome: Outcome, now: float) -> bytes:
        """The single non-streaming body."""


@attrs.frozen
class OllamaFormat:
    """`/api/generate` (`response` tokens; the end carries `context`) and `/api/chat`
    (assistant `message` tokens)."""

    model: str
    chat: bool

    def _message(self, text: str, now: float, done: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": rfc3339(now)}
        if self.chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        body["done"] = done
        return body

    def chunk(self, token: str, now: float) -> bytes:
        return line(self._message(token, now, done=False))

    def _done(self, text: str, outcome: Outcome, now: float) -> dict[str, Any]:
        body = self._message(text, now, done=True)
        body.update(outcome.metrics())
        if not self.chat:
            body["context"] = list(range(1, outcome.prompt_tokens + outcome.eval_count + 1))
        return body

    def final(self, outcome: Outcome, now: float) -> Iterator[bytes]:
        yield line(self._done("", outcome, now))

    def whole(self, text: str, outcome: Outcome, now: float) -> bytes:
        return dumps(self._done(text, outcome, now))


@attrs.frozen
class OpenAIFormat:
    """`/v1/chat/completions` (chat=True) and `/v1/completions`: SSE chunks, then `[DONE]`."""

    model: str
    ident: str
    created: int
    chat: bool
    include_usage: bool = False

    def _envelope(self, choices: list[dict[str, Any]], streaming: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if streaming else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": self.ident,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": choices,
        }

    def _choice(self, text: str, finish: str | None, streaming: bool) -> dict[str, Any]:
        if not self.chat:
            return {"text": text, "index": 0, "finish_reason": finish}
        key = "delta" if streaming else "message"
        return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

    @staticmethod
    def _usage(outcome: Outcome) -> dict[str, int]:
        return {
            "prompt_tokens": outcome.prompt_eval_count,
            "completion_tokens": outcome.eval_count,
            "total_tokens": outcome.prompt_eval_count + outcome.eval_count,
        }

    def chunk(self, token: str, now: float) -> bytes:
        return event(self._envelope([self._choice(token, None, True)], True))

    def final(self, outcome: Outcome, now: float) -> Iterator[bytes]:
        yield event(self._envelope([self._choice("", outcome.done_reason, True)], True))
        if self.include_usage:
            usage = self._envelope([], True)
            usage["usage"] = self._usage(outcome)
            yield event(usage)
        yield SSE_DONE

    def whole(self, text: str, outcome: Outcome, now: float) -> bytes:
        body = self._envelope([self._choice(text, outcome.done_reason, False)], False)
        body["usage"] = self._usage(outcome)
        return dumps(body)


def generation_script(
    state: SimState,
    acquired: Deferred[Lease],
    the_plan: Plan,
    fmt: Format,
    *,
    streaming: bool,
    started: float,
) -> Script:
    """Wait for a slot, think for `ttft` plus the uncached prompt at `prompt_tokens_per_second`,
    emit tokens at `tokens_per_second`, then the end."""
    lease: Lease = yield acquired
    try:
        clock = state.clock
        config = state.config
        interval = 1.0 / config.tokens_per_second if config.tokens_per_second > 0 else 0.0
        granted = clock.seconds()
        evaluated = the_plan.prompt_tokens
        if lease.evaluated_tokens is not None:
            evaluated = lease.evaluated_tokens
        thinking = config.ttft
        if config.prompt_tokens_per_second > 0:
            thinking += evaluated / config.prompt_tokens_per_second
        if thinking > 0:
            yield thinking
        first = clock.seconds()
        pieces = content.tokens(the_plan.count)
        if streaming:
            for index, piece in enumerate(pieces):
                if index and interval:
                    yield interval
                yield fmt.chunk(piece, clock.seconds())
        elif interval and len(pieces) > 1:
            yield interval * (len(pieces) - 1)
        now = clock.seconds()
        state.counters.tokens += the_plan.count
        if lease.caches_prompt:
            lease.remember_reply(prompts.reply_key("".join(pieces)))
        outcome = Outcome(
            done_reason=the_plan.done_reason,
            total_duration=max(1, int((now - started) * _NS)),
            load_duration=max(1, int(lease.load_duration * _NS)),
            prompt_eval_count=evaluated,
            prompt_eval_duration=max(1, int((first - granted) * _NS)),
            eval_count=the_plan.count,
            eval_duration=max(1, int((now - first) * _NS)),
            prompt_tokens=the_plan.prompt_tokens,
        )
        if streaming:
            yield from fmt.final(outcome, now)
        else:
            yield fmt.whole("".join(pieces), outcome, now)
    finally:
        lease.release()
