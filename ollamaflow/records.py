"""Frontend and Backend: the configuration records, with OllamaFlow 1.2's fields and defaults;
ApiKey, a client's key (ours: 1.2 has none), and UsageRow, what one key used in one hour."""

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
    #: LeastOutstanding among warm copies; loads planned (:mod:`ollamaflow.gateway.placement`).
    MODEL_AWARE = "ModelAware"


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
#: A model name, or a pattern where ``*`` stands for any run of characters ("llama3*").
_MODEL_PATTERNS = StrList(
    item=Str(
        allowed=f"a model name or '*' pattern without whitespace, at most "
        f"{modelnames.MAX_LENGTH} characters",
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
    #: Whether client requests need an API key (``Authorization: Bearer <key>``) valid for
    #: this frontend; false keeps Ollama's behaviour: anyone who can connect may ask.
    require_api_key: bool = field(Bool(), default=False)
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
    #: Bytes of VRAM its models may fill (what ``ModelAware`` frontends plan loads by); 0:
    #: learned, as the most ``/api/ps`` has shown loaded at once.
    vram_bytes: int = field(Int(0, 2**53), default=0)
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


@attrs.frozen
class ApiKey:
    """A client's key: which frontends and models it may use, how much, and how urgently.

    The secret itself is never stored: only its SHA-256 (``secret_hash``, not on the wire) and
    the first characters (``key_prefix``) by which an operator recognises it.
    """

    identifier: str = field(IDENTIFIER)
    name: str | None = field(_TEXT, default=None)
    active: bool = field(Bool(), default=True)
    #: After this moment the key is refused (401), as if it did not exist.
    expires_utc: datetime | None = field(_TIME, default=None)
    #: The frontends it may be used on; empty: all.
    frontends: tuple[str, ...] = field(_NAMES, default=())
    #: The models it may name (names, or ``*`` patterns); empty: all.
    models: tuple[str, ...] = field(_MODEL_PATTERNS, default=())
    #: Whether it may pull, delete, copy, create and push models (and upload blobs).
    allow_model_management: bool = field(Bool(), default=False)
    #: 0: no limit.
    requests_per_minute: int = field(Int(0), default=0)
    tokens_per_minute: int = field(Int(0), default=0)
    max_concurrent_requests: int = field(Int(0), default=0)
    #: Higher goes first in a frontend's queue; FIFO within one priority.
    priority: int = field(Int(-1000, 1000), default=0)
    key_prefix: str | None = field(_TEXT, default=None, readonly=True)
    created_utc: datetime | None = field(_TIME, default=None, readonly=True)
    last_update_utc: datetime | None = field(_TIME, default=None, readonly=True)
    #: Hex SHA-256 of the secret; kept out of the wire form.
    secret_hash: str = attrs.field(default="", repr=False)


#: Usage is accounted under these names for requests made without a key (or with an admin
#: token); no key may take them as its Identifier.
ANONYMOUS = "anonymous"
ADMIN = "admin"
RESERVED_KEY_IDENTIFIERS = frozenset({ANONYMOUS, ADMIN})


@attrs.frozen
class UsageRow:
    """What one key used of one model in one hour (``hour``: its start, UTC)."""

    key_id: str
    model: str
    hour: datetime
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


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
    "Placement",
)
#: The backends a frontend lists that do not exist (yet).
FRONTEND_RUNTIME_KEYS = ("MissingBackends",)

_IGNORED: dict[type, frozenset[str]] = {
    Backend: frozenset(k.lower() for k in BACKEND_RUNTIME_KEYS),
    Frontend: frozenset(k.lower() for k in FRONTEND_RUNTIME_KEYS),
    # The secret, which a create or rotate answers once: sent back, it is not a way to set one.
    ApiKey: frozenset({"key"}),
}


R = TypeVar("R", Frontend, Backend, ApiKey)


def parse_record(cls: type[R], data: object) -> tuple[R, list[str]]:
    """Parse admin-API input into a record; returns it and the unknown keys."""
    if isinstance(data, dict):
        ignored = _IGNORED[cls]
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.lower() in ignored)}
    return from_wire(cls, data)
