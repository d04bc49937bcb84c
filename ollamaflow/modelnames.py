"""Ollama model names: parse, display and compare them the way Ollama does.

`llama3`, `llama3:latest`, `library/llama3:latest` and `registry.ollama.ai/library/llama3:latest`
name the same model; parts compare case-insensitively.
"""

from __future__ import annotations

import functools
import re

import attrs

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Ollama's part rules: letters, digits, `_`, `-`, `.`; hosts may carry a `:port`. Lengths as
# Ollama's isValidLen: a host up to 350 characters, every other part up to 80.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}\Z")
_HOST = re.compile(r"(?=.{1,350}\Z)[A-Za-z0-9_][A-Za-z0-9_.\-]*(:[0-9]+)?\Z")
_DIGEST = re.compile(r"sha256[:\-][0-9a-fA-F]{64}\Z")

#: The longest name Ollama accepts: `https://`, a host of 350, three parts of 80 with their
#: separators, and an `@sha256:` digest. Anything longer is refused before it is parsed (or
#: remembered: the parse cache is keyed by the client's string).
MAX_LENGTH = 8 + 350 + 3 * 81 + 72


class InvalidModelName(ValueError):
    """Raised for a string that is not a valid Ollama model name."""


@attrs.frozen
class ModelName:
    """A parsed model name with defaults filled in; case is kept as written."""

    host: str
    namespace: str
    model: str
    tag: str
    digest: str = ""

    def display(self) -> str:
        """The shortest form Ollama shows: default host and `library` namespace dropped."""
        if self.host.lower() == DEFAULT_HOST:
            if self.namespace.lower() == DEFAULT_NAMESPACE:
                base = f"{self.model}:{self.tag}"
            else:
                base = f"{self.namespace}/{self.model}:{self.tag}"
        else:
            base = f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        return f"{base}@{self.digest}" if self.digest else base

    def key(self) -> str:
        """The comparable key: the display form, lower-cased."""
        return self.display().lower()

    def full(self) -> str:
        """The fully qualified form `host/namespace/model:tag`."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


def parse(name: str) -> ModelName:
    """Parse `[scheme://][host/][namespace/]model[:tag][@digest]`; raise `InvalidModelName`."""
    if len(name) > MAX_LENGTH:
        raise InvalidModelName(f"a model name is at most {MAX_LENGTH} characters")
    return _parse(name)


def is_valid(name: str) -> bool:
    """Whether ``name`` is a model name Ollama would accept."""
    try:
        parse(name)
    except InvalidModelName:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _parse(name: str) -> ModelName:
    s = name.strip()
    digest = ""
    if "@" in s:
        s, digest = s.rsplit("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidModelName(f"invalid model name {name!r}")
        digest = digest.lower().replace("sha256-", "sha256:")
    if "://" in s:
        s = s.split("://", 1)[1]
    tag = ""
    # A ":" before the last "/" belongs to a host:port, not to the tag.
    if s.rfind(":") > s.rfind("/"):
        s, tag = s.rsplit(":", 1)
        if tag and not _PART.match(tag):
            raise InvalidModelName(f"invalid model name {name!r}")
    parts = s.split("/")
    if len(parts) > 3:
        raise InvalidModelName(f"invalid model name {name!r}")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    if not (_PART.match(model) and _PART.match(namespace) and _HOST.match(host)):
        raise InvalidModelName(f"invalid model name {name!r}")
    return ModelName(
        host=host, namespace=namespace, model=model, tag=tag or DEFAULT_TAG, digest=digest
    )


def normalize(name: str) -> str:
    """The canonical comparable key of a model name (`LLama3` → `llama3:latest`)."""
    return parse(name).key()


@functools.lru_cache(maxsize=4096)
def comparable(name: str) -> str:
    """:func:`normalize`, or the name itself when it is not a model name Ollama would accept:
    a key to count by that never raises."""
    try:
        return normalize(name)
    except InvalidModelName:
        return name


def display(name: str) -> str:
    """The name as Ollama displays it (`registry.ollama.ai/library/llama3` → `llama3:latest`)."""
    return parse(name).display()


def same_model(a: str, b: str) -> bool:
    """Whether two names refer to the same model; invalid names match nothing."""
    try:
        return normalize(a) == normalize(b)
    except InvalidModelName:
        return False
