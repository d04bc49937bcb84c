"""The simulator's behaviour knobs, live and patchable at run time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

DEFAULT_MODELS = ("llama3", "all-minilm")
DEFAULT_PULLABLE = (
    "llama3",
    "llama3.1",
    "llama3.2",
    "mistral",
    "qwen2.5",
    "qwen2.5:0.5b",
    "phi3",
    "gemma2",
    "all-minilm",
    "nomic-embed-text",
)


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0")


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1")


@attrs.define
class SimConfig:
    """Knobs read live by the request path; every delay 0 means "as fast as possible".

    The defaults are the zero-delay mode used by tests and benchmarks.
    """

    tokens: int = attrs.field(default=10, validator=_non_negative)
    """Tokens per generate/chat/completion response (before any `num_predict`/`max_tokens`)."""
    tokens_per_second: float = attrs.field(default=0.0, validator=_non_negative)
    """Streaming pace; 0 writes every token at once."""
    ttft: float = attrs.field(default=0.0, validator=_non_negative)
    """Seconds between getting a slot and the first token (prompt evaluation)."""
    load_time: float = attrs.field(default=0.0, validator=_non_negative)
    """Seconds to load a model that is not loaded."""
    keep_alive: float = 300.0
    """Default seconds a model stays loaded after its last request; negative = forever."""
    num_parallel: int = attrs.field(default=1, validator=_positive)
    """Parallel slots per loaded model; requests beyond them wait silently."""
    max_queue: int = attrs.field(default=512, validator=_positive)
    """Requests that may wait for a model load before the rest get 503 "server busy"."""
    vram_bytes: int = attrs.field(default=0, validator=_non_negative)
    """VRAM for loaded models, each taking its size; a load that does not fit evicts the least
    recently used idle models, or waits until enough are idle. 0 = unlimited."""
    load_seconds_per_gb: float = attrs.field(default=0.0, validator=_non_negative)
    """Seconds a load takes per GB (1e9 bytes) of the model, on top of `load_time`."""
    prompt_tokens_per_second: float = attrs.field(default=0.0, validator=_non_negative)
    """Prompt evaluation pace: the first token waits `ttft` + uncached prompt tokens / this.
    0 = free."""
    pull_time: float = attrs.field(default=0.0, validator=_non_negative)
    """Seconds a pull spends downloading layers."""
    pull_tick: float = attrs.field(default=0.06, validator=_non_negative)
    """Seconds between pull progress lines (Ollama: about 60 ms)."""
    create_time: float = attrs.field(default=0.0, validator=_non_negative)
    """Seconds a create spends validating or quantizing a model layer (its progress lines)."""
    push_time: float = attrs.field(default=0.0, validator=_non_negative)
    """Seconds a push spends uploading layers."""
    pullable: tuple[str, ...] = DEFAULT_PULLABLE
    """Names `/api/pull` accepts; `*` accepts any valid name."""
    version: str = "0.32.15"
    """What `/api/version` reports."""
    check_host: bool = True
    """Reject (403) non-local `Host` headers when listening on loopback, as Ollama does."""
    refuse: bool = False
    """Fault: stop listening and close every connection (connections are refused)."""
    refuse_seconds: float = attrs.field(default=0.0, validator=_non_negative)
    """With `refuse`: listen again after this many seconds; 0 refuses until turned off."""
    error500: bool = False
    """Fault: every API request answers 500."""
    hang: bool = False
    """Fault: every API request is accepted and never answered."""
    reset_head: bool = False
    """Fault: every API request gets the first bytes of a response head, then a TCP reset."""
    drop_mid_stream_after: int | None = attrs.field(default=None, validator=_non_negative)
    """Fault: close the connection after this many stream messages (the body is cut short)."""
    stall_after: int | None = attrs.field(default=None, validator=_non_negative)
    """Fault: pause `stall_seconds` once, after this many stream messages."""
    stall_seconds: float = attrs.field(default=5.0, validator=_non_negative)

    def caches_prompts(self) -> bool:
        """Whether slots keep prompt caches: on when `vram_bytes` or `prompt_tokens_per_second`
        is set, so the default mode does no placement bookkeeping."""
        return self.vram_bytes > 0 or self.prompt_tokens_per_second > 0

    def as_json(self) -> dict[str, Any]:
        """The knobs as a JSON-able dict."""
        data = attrs.asdict(self)
        data["pullable"] = list(self.pullable)
        return data

    def patch(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Validate all `changes` first, then apply them; return the changed knobs' new values.

        Raises `ValueError` naming the first bad knob; nothing is applied then.
        """
        fields = attrs.fields_dict(SimConfig)
        clean: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in fields:
                raise ValueError(f"unknown knob {name!r}")
            clean[name] = _coerce(name, fields[name].type, value)
        attrs.evolve(self, **clean)  # runs the validators on a copy
        for name, value in clean.items():
            setattr(self, name, value)
        return clean


def _coerce(name: str, kind: object, value: Any) -> Any:
    """Check a JSON value against a knob's annotated type; ints are accepted for floats."""
    if kind == "tuple[str, ...]":
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(v.strip() for v in value)
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif isinstance(value, bool):
        pass
    elif kind == "int | None" and value is None:
        return None
    elif kind in ("int", "int | None") and isinstance(value, int):
        return value
    elif kind == "float" and isinstance(value, int | float):
        return float(value)
    raise ValueError(f"knob {name!r} must be {kind}, got {value!r}")
