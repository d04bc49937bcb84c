"""The access log: one ``twisted.logger`` info event per finished client request.

Events carry the request's fields as structured keys (the JSON log writes them as they are) and
a short ``log_format`` for text logs; nothing is formatted unless an observer formats it.
Headers only when a frontend or backend sets ``LogRequestFull``, and then with every credential
redacted (:mod:`ollamaflow.gateway.requesthead`); bodies only when the gateway captured them on
request.
"""

from __future__ import annotations

from time import time
from typing import Any

import attrs
from twisted.logger import Logger, LogLevel

from ollamaflow.gateway.completed import Completed
from ollamaflow.records import ANONYMOUS

NAMESPACE = "ollamaflow.access"

_FORMAT = (
    "{method} {path} {status} {outcome} client={client} frontend={frontend} backend={backend} "
    "model={model} bytes={bytes} queued_ms={queued_ms} ttfb_ms={ttfb_ms} "
    "duration_ms={duration_ms} retries={retries} id={request_id}"
)
_BACKENDS = " backends={backends}"
_KEY = " key={api_key}"
_TOKENS = " tokens={eval_count} tokens_per_second={tokens_per_second}"
_PROMPT_TOKENS = " prompt_tokens={prompt_eval_count}"
_REQUEST_HEAD = " request_head={request_head!r}"
_REQUEST_BODY = " request_body={request_body!r}"
_RESPONSE_BODY = " response_body={response_body!r}"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


@attrs.define(eq=False)
class AccessLog:
    """A gateway observer: each :class:`Completed` becomes one event (or nothing, if disabled).

    ``enabled`` is False when the configured level drops info events: then it costs one test.
    """

    enabled: bool = True
    logger: Logger = attrs.field(factory=lambda: Logger(namespace=NAMESPACE))

    def __call__(self, c: Completed) -> None:
        if not self.enabled:
            return
        fmt = _FORMAT
        ttfb = c.ttfb
        event: dict[str, Any] = {
            "request_id": c.request_id,
            "client": c.client,
            "frontend": c.frontend,
            "backend": c.backend,
            "method": c.method,
            "path": c.path,
            "model": c.model,
            "status": c.status,
            "outcome": c.outcome,
            "bytes": c.bytes,
            "queued_ms": _ms(c.queued),
            "ttfb_ms": None if ttfb is None else _ms(ttfb),
            "duration_ms": _ms(c.duration),
            "retries": c.retries,
        }
        if c.backends:
            fmt += _BACKENDS
            event["backends"] = ",".join(c.backends)
        if c.api_key != ANONYMOUS:
            fmt += _KEY
            event["api_key"] = c.api_key
        if c.prompt_eval_count is not None:
            fmt += _PROMPT_TOKENS
            event["prompt_eval_count"] = c.prompt_eval_count
        if c.eval_count is not None:
            fmt += _TOKENS
            event["eval_count"] = c.eval_count
            rate = c.tokens_per_second
            event["tokens_per_second"] = None if rate is None else round(rate, 1)
        if c.request_head is not None:
            fmt += _REQUEST_HEAD
            event["request_head"] = c.request_head
        if c.request_body is not None:
            fmt += _REQUEST_BODY
            event["request_body"] = c.request_body
        if c.response_body is not None:
            fmt += _RESPONSE_BODY
            event["response_body"] = c.response_body
        # What Logger.emit does, without its per-call scan of every log level.
        logger = self.logger
        event["log_logger"] = logger
        event["log_level"] = LogLevel.info
        event["log_namespace"] = logger.namespace
        event["log_source"] = None
        event["log_format"] = fmt
        event["log_time"] = time()
        logger.observer(event)
