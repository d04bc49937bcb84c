"""API key secrets: how they are made, stored (hashed) and recognised, and which models a
key's patterns allow. No I/O: the admin API makes secrets, the gateway recognises them."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Sequence

from ollamaflow import modelnames
from ollamaflow.credentials import bearer_token

#: What every secret starts with, so a leaked one is recognisable (secret scanners, logs).
SECRET_PREFIX = "ofk_"
_PREFIX = SECRET_PREFIX.encode()
#: Random bytes per secret: 256 bits, so a fast hash is as good as a slow one for storing it.
SECRET_BYTES = 32
#: Characters of a secret shown after it is created: the prefix and 8 of its own.
SHOWN = len(SECRET_PREFIX) + 8
#: Longest bearer value worth hashing: every secret of ours is shorter.
MAX_SECRET = 128


def new_secret() -> str:
    """A fresh secret: ``ofk_`` and 43 URL-safe base64 characters."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=")
    return SECRET_PREFIX + raw.decode("ascii")


def hash_secret(secret: bytes | str) -> str:
    """What is stored, and looked up, for a secret: its SHA-256 in hex."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    return hashlib.sha256(secret).hexdigest()


def shown(secret: str) -> str:
    """The part of a secret an operator may see again (``KeyPrefix``)."""
    return secret[:SHOWN]


def is_api_key(authorization: bytes) -> bool:
    """Whether an ``Authorization`` value carries a key of ours (valid or not): never to be
    passed on to a backend."""
    token = bearer_token(authorization)
    return token is not None and token.startswith(_PREFIX)


def model_allowed(patterns: Sequence[str], model: str) -> bool:
    """Whether a key limited to ``patterns`` (names or ``*`` patterns; none: any) may use
    ``model``. Names compare as Ollama's do ("llama3" is "llama3:latest"); patterns match the
    name as written or as Ollama displays it, in any case."""
    if not patterns:
        return True
    try:
        display = modelnames.display(model)
    except modelnames.InvalidModelName:
        display = model
    for pattern in patterns:
        if "*" in pattern:
            if _glob(pattern, model) or _glob(pattern, display):
                return True
        elif modelnames.same_model(pattern, model):
            return True
    return False


def _glob(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern``, ``*`` being any run of characters, in any case.
    Each literal part is found once, left to right: time linear in the name, whatever the
    stars (a regular expression backtracks, and names come from clients)."""
    first, *middle, last = pattern.lower().split("*")
    name = name.lower()
    if len(name) < len(first) + len(last) or not (name.startswith(first) and name.endswith(last)):
        return False
    at, end = len(first), len(name) - len(last)
    for part in middle:
        found = name.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True
