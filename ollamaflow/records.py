"""Frontend and Backend: the configuration records, with OllamaFlow 1.2's fields and defaults."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

import attrs

from ollamaflow import modelnames
from ollamaflow.fieldkinds import (
    IDENTIFIER,
    Bool,
    Choice,
    HeaderFields,
    HostName,
    Int,
    JsonObject,
    Str,
    StrList,
    Timestamp,
)
from ollamaflow.jsonfields import field, from_wire

# The enums are declared in OllamaFlow 1.2's order: a member's position is the number 1.2
# accepts for it (``"LoadBalancing": 0`` is Random there); ours come after.


class LoadBalancing(StrEnum):
    RANDOM = "Random"
    ROUND_ROBIN = "RoundRobin"
    LEAST_OUTSTANDING = "LeastOutstanding"


class ApiFormat(StrEnum):
    OLLAMA = "Ollama"
    OPENAI = "OpenAI"


class HealthCheckMethod(StrEnum):
    GET = "GET"
    HEAD = "HEAD"


_TEXT = Str(allowed="a string", pattern=r"(?s).*")
_BACKEND_HOST = HostName()
_FRONTEND_HOST = HostName(wildcard=True)
# Paths, query strings and tokens are written into request lines and header fields as they
# are: visible ASCII only, and no '#' (a fragment is never sent).
_URL_PATH = Str(
    allowed="a path starting with '/' in visible ASCII, without '#'", pattern=r"/[!-\"$-~]*"
)
_QUERY = Str(
    allowed="a query string such as 'a=1&b=2' in visible ASCII, without '#'",
    pattern=r"[!-\"$-~]*",
    strip_prefix="?",
)
_BEARER = Str(
    allowed="a token of visible ASCII characters, at most 4096", pattern=r"[!-~]*", max_length=4096
)
_NAMES = StrList(item=IDENTIFIER)
#: Up to the longest name Ollama accepts (``modelnames.MAX_LENGTH``), as the gateway does.
_MODELS = StrList(
    item=Str(
        allowed=f"a model name without whitespace, at most {modelnames.MAX_LENGTH} characters",
        pattern=r"\S+",
        max_length=modelnames.MAX_LENGTH,
    )
)
_LABELS = StrList(item=Str(allowed="a label without whitespace", pattern=r"\S+", max_length=256))
_HEADERS = HeaderFields()
_OBJECT = JsonObject()
_TIME = Timestamp()


@attrs.frozen
class Frontend:
    """A virtual Ollama endpoint: which Host it answers, which backends serve it, and how."""

    identifier: str = field(IDENTIFIER)
    name: str | None = field(_TEXT, default=None)
    hostname: str = field(_FRONTEND_HOST, default="*")
    timeout_ms: int = field(Int(0), default=60000)
    #: New frontends balance by load; stored ones keep what they had (it is in their record).
    load_balancing: LoadBalancing = field(
        Choice(LoadBalancing, numbered=True), default=LoadBalancing.LEAST_OUTSTANDING
    )
    #: Stored and shown for 1.2's sake, never enforced (1.2 does not either): HTTP/1.0 clients
    #: such as ApacheBench and HAProxy's health check are served.
    block_http10: bool = field(Bool(), default=True)
    max_request_body_size: int = field(Int(1, 2**53), default=536870912)
    backends: tuple[str, ...] = field(_NAMES, default=())
    required_models: tuple[str, ...] = field(_MODELS, default=())
    log_request_full: bool = field(Bool(), default=False)
    log_request_body: bool = field(Bool(), default=False)
    log_response_body: bool = field(Bool(), default=False)
    use_sticky_sessions: bool = field(Bool(), default=False)
    sticky_session_expiration_ms: int = field(Int(10000, 86400000), default=1800000)
    pinned_embeddings_properties: Mapping[str, Any] = field(_OBJECT, factory=dict)
    pinned_completions_properties: Mapping[str, Any] = field(_OBJECT, factory=dict)
    allow_embeddings: bool = field(Bool(), default=True)
    allow_completions: bool = field(Bool(), default=True)
    allow_retries: bool = field(Bool(), default=True)
    #: Whether clients may pull, delete, copy, create and push models (and upload blobs)
    #: through this frontend; when false only requests carrying an admin token may.
    allow_model_management: bool = field(Bool(), default=True)
    active: bool = field(Bool(), default=True)
    #: Requests that may wait for a free backend slot, and for how long, before a 429.
    max_queue_depth: int = field(Int(0, 1_000_000), default=512)
    queue_timeout_ms: int = field(Int(0), default=30000)
    created_utc: datetime | None = field(_TIME, default=None, readonly=True)
    last_update_utc: datetime | None = field(_TIME, default=None, readonly=True)


@attrs.frozen
class Backend:
    """One Ollama (or OpenAI-compatible) server."""

    identifier: str = field(IDENTIFIER)
    name: str | None = field(_TEXT, default=None)
    hostname: str = field(_BACKEND_HOST, default="localhost")
    port: int = field(Int(1, 65535), default=11434)
    ssl: bool = field(Bool(), default=False)
    unhealthy_threshold: int = field(Int(1), default=2)
    healthy_threshold: int = field(Int(1), default=2)
    health_check_method: HealthCheckMethod = field(
        # 1.2 writes an HTTP method as {"Method": "GET"}; numbers in the order of its names.
        Choice(HealthCheckMethod, numbered=True, wrapper="Method"),
        default=HealthCheckMethod.GET,
    )
    health_check_url: str = field(_URL_PATH, default="/")
    max_parallel_requests: int = field(Int(1), default=4)
    #: Requests at once per model, like Ollama's OLLAMA_NUM_PARALLEL (0: no limit of its own).
    #: Set it to match the server and requests wait in OllamaFlow's queue for the first slot
    #: that frees anywhere, instead of inside one server behind one generation.
    model_parallel_requests: int = field(Int(0), default=0)
    #: Requests sent to it at once, at most (with MaxParallelRequests, the lower applies):
    #: never a refusal, those beyond wait in the frontend's queue.
    rate_limit_requests_threshold: int = field(Int(1), default=10)
    log_request_full: bool = field(Bool(), default=False)
    log_request_body: bool = field(Bool(), default=False)
    log_response_body: bool = field(Bool(), default=False)
    api_format: ApiFormat = field(Choice(ApiFormat, numbered=True), default=ApiFormat.OLLAMA)
    labels: tuple[str, ...] = field(_LABELS, default=())
    pinned_embeddings_properties: Mapping[str, Any] = field(_OBJECT, factory=dict)
    pinned_completions_properties: Mapping[str, Any] = field(_OBJECT, factory=dict)
    allow_embeddings: bool = field(Bool(), default=True)
    allow_completions: bool = field(Bool(), default=True)
    bearer_token: str | None = field(_BEARER, default=None)
    querystring: str | None = field(_QUERY, default=None)
    headers: Mapping[str, str] = field(_HEADERS, factory=dict)
    active: bool = field(Bool(), default=True)
    #: Share of the traffic relative to the frontend's other backends (RoundRobin and
    #: LeastOutstanding honour it).
    weight: int = field(Int(1, 1000), default=1)
    created_utc: datetime | None = field(_TIME, default=None, readonly=True)
    last_update_utc: datetime | None = field(_TIME, default=None, readonly=True)

    @property
    def slots(self) -> int:
        """Requests sent to it at once: ``MaxParallelRequests``, or the rate limit when lower.
        1.2 stored both and enforced neither; what is over the limit waits in the frontend's
        queue, as Ollama itself queues, instead of being refused."""
        return min(self.max_parallel_requests, self.rate_limit_requests_threshold)

    @property
    def base_url(self) -> str:
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}"


#: Keys the admin API writes beside a record's fields — runtime state (1.2's and the health
#: records') and what is derived from the configuration — accepted and ignored on input, so
#: that any record read with GET can be sent back with PUT. Any other unknown key is refused.
BACKEND_RUNTIME_KEYS = (
    # OllamaFlow 1.2's runtime fields
    "HealthySinceUtc",
    "UnhealthySinceUtc",
    "Uptime",
    "Downtime",
    "ActiveRequests",
    "IsSticky",
    # the health record's
    "Healthy",
    "InRotation",
    "ActiveRequestsByModel",
    "ConsecutiveSuccesses",
    "ConsecutiveFailures",
    "LastCheckUtc",
    "LastError",
    "SteeredModels",
    "Frontends",
)
#: The backends a frontend lists that do not exist (yet).
FRONTEND_RUNTIME_KEYS = ("MissingBackends",)

_IGNORED: dict[type, frozenset[str]] = {
    Backend: frozenset(k.lower() for k in BACKEND_RUNTIME_KEYS),
    Frontend: frozenset(k.lower() for k in FRONTEND_RUNTIME_KEYS),
}


R = TypeVar("R", Frontend, Backend)


def parse_record(cls: type[R], data: object) -> tuple[R, list[str]]:
    """Parse admin-API input into a record; returns it and the unknown keys."""
    if isinstance(data, dict):
        ignored = _IGNORED[cls]
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.lower() in ignored)}
    return from_wire(cls, data)
