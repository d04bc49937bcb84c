"""A client request's JSON body, and the model it names: read strictly and bounded, before
any cache, log or backend sees them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from ollamaflow import jsonlimits, modelnames


class ModelNameTooLong(ValueError):
    """A model name longer than Ollama accepts: refused before it reaches any cache or log."""


def model_of(document: Mapping[str, Any], path: bytes) -> str | None:
    """The model a request names (``model``, legacy ``name``, copy's ``source``), if valid;
    None for a name that is not Ollama's (an OpenAI-style backend may still know it)."""
    name = document.get("source") if path == b"/api/copy" else None
    if name is None:
        name = document.get("model") or document.get("name")
    if not isinstance(name, str) or not name:
        return None
    if len(name) > modelnames.MAX_LENGTH:
        raise ModelNameTooLong(
            f"the model name is {len(name)} characters long; "
            f"Ollama accepts at most {modelnames.MAX_LENGTH}"
        )
    try:
        modelnames.parse(name)
    except modelnames.InvalidModelName:
        return None
    return name


def json_object(content: IO[bytes] | None) -> dict[str, Any]:
    """The body as a JSON object (strict, and at most jsonlimits.MAX_DEPTH deep), or a
    ValueError saying what is wrong with it."""
    raw = content.read() if content is not None else b""
    if content is not None:
        content.seek(0)
    document = jsonlimits.loads_strict(raw)
    if not isinstance(document, dict):
        raise ValueError("the request body must be a JSON object")
    return document


def body_size(content: IO[bytes]) -> int:
    """The size of a request body, read back from its start afterwards."""
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size
