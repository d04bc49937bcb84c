"""Who is asking: the API key a client request carries, and what that key may do.

Decisions only, no I/O: :func:`identify` turns an ``Authorization`` field into a
:class:`Caller` or a 401/403, :func:`may_manage` and :func:`may_use` say whether the caller may
manage models and use a model. A frontend without ``RequireApiKey`` serves requests without a
key as Ollama does; a key that is one of ours is honoured (and limited) wherever it is sent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ollamaflow.apikeys import MAX_SECRET, SECRET_PREFIX, hash_secret, model_allowed
from ollamaflow.credentials import Tokens, bearer_token
from ollamaflow.gateway.clienterrors import quoted
from ollamaflow.ratelimits.contracts import NO_LIMITS, Limits
from ollamaflow.records import ADMIN, ANONYMOUS, ApiKey, Frontend

_OURS = SECRET_PREFIX.encode()
#: Secrets a key ring remembers having matched (one per key in use, so rarely more than a few).
SEEN_SECRETS = 4096
#: Body fields that name the models an operation touches (``ollama cp``: both).
_MODEL_FIELDS = ("model", "name", "source", "destination", "from")


@attrs.frozen
class Caller:
    """The requester: its key (None without one), the name its usage is accounted under, the
    limits it is held to (none without a key), its place in queues, and until when it may ask
    (a POSIX time)."""

    key: ApiKey | None
    account: str
    limits: Limits = NO_LIMITS
    priority: int = 0
    expires: float = math.inf
    #: The frontends its key may be used on (empty: all).
    frontends: frozenset[str] = frozenset()
    #: Whether it has any limit (``bool(limits)``, asked on every request).
    limited: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "limited", bool(self.limits))

    @classmethod
    def of(cls, key: ApiKey) -> Caller:
        expires = key.expires_utc.timestamp() if key.expires_utc is not None else math.inf
        limits = limits_of(key)
        return cls(key, key.identifier, limits, key.priority, expires, frozenset(key.frontends))


ANONYMOUS_CALLER = Caller(None, ANONYMOUS)
ADMIN_CALLER = Caller(None, ADMIN)


class KeyRing:
    """A catalog's keys made ready for the hot path: the caller of each active key, by the
    hash of its secret. Built once per configuration, so a key deleted,
    deactivated or rotated is forgotten, with the secrets seen, when the configuration
    changes."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.by_hash: dict[str, Caller] = {k.secret_hash: Caller.of(k) for k in keys if k.active}
        #: ``Authorization`` values recently matched (as clients send them), so a key in use
        #: is parsed and hashed once, not on every request.
        self.seen: dict[bytes, Caller] = {}

    def caller(self, secret: bytes, authorization: bytes) -> Caller | None:
        """The caller whose key this secret is, if any; remembered under ``authorization``."""
        found = self.by_hash.get(hash_secret(secret))
        if found is not None:
            if len(self.seen) >= SEEN_SECRETS:
                self.seen.clear()
            self.seen[authorization] = found
        return found


NO_KEYS = KeyRing(())


@attrs.frozen
class Denied:
    """The request may not go: 401 (no valid key) or 403 (a key used beyond what it may);
    ``caller``: whom the refusal is counted against."""

    status: int
    message: str
    caller: Caller = ANONYMOUS_CALLER


def limits_of(key: ApiKey) -> Limits:
    return Limits(key.requests_per_minute, key.tokens_per_minute, key.max_concurrent_requests)


def identify(
    authorization: bytes | None,
    frontend: Frontend,
    ring: KeyRing,
    admin_tokens: Tokens,
    now: float,
) -> Caller | Denied:
    """The caller of a request to ``frontend``; an admin token is a key to everything.

    A bearer token that is one of our keys must be valid (active, not expired) on every
    frontend; any other token, or none, is anonymous where keys are not required (so the
    placeholder key an OpenAI SDK must send keeps working) and a 401 where they are.
    """
    if authorization is not None:
        caller = ring.seen.get(authorization)
        if (
            caller is not None
            and caller.expires > now
            and (not caller.frontends or frontend.identifier in caller.frontends)
        ):
            return caller
    token = bearer_token(authorization)
    if token is None:
        if frontend.require_api_key:
            return Denied(401, "an API key is required: send 'Authorization: Bearer <key>'")
        return ANONYMOUS_CALLER
    if token.startswith(_OURS) and len(token) <= MAX_SECRET:
        caller = ring.caller(token, authorization or b"")
        if caller is not None:
            return _valid(caller, frontend, now)
    if admin_tokens and admin_tokens.match(authorization):
        return ADMIN_CALLER
    if frontend.require_api_key or token.startswith(_OURS):
        return Denied(401, "the API key is not valid")
    return ANONYMOUS_CALLER


def _valid(caller: Caller, frontend: Frontend, now: float) -> Caller | Denied:
    """``caller`` if its key is not expired and may be used on ``frontend``."""
    key = caller.key
    assert key is not None
    if caller.expires <= now:
        return Denied(401, f"the API key {key.identifier!r} expired", caller)
    if caller.frontends and frontend.identifier not in caller.frontends:
        return Denied(
            403,
            f"the API key {key.identifier!r} may not be used on frontend {frontend.identifier!r}",
            caller,
        )
    return caller


def may_manage(caller: Caller) -> Denied | None:
    """A 403 if the caller's key may not pull, delete, copy, create or push models."""
    key = caller.key
    if key is None or key.allow_model_management:
        return None
    return Denied(
        403,
        f"the API key {key.identifier!r} may not manage models (pull, delete, copy, create, "
        "push, blob uploads)",
        caller,
    )


def may_use(caller: Caller, models: Iterable[str]) -> Denied | None:
    """A 403 naming the first of ``models`` the caller's key may not use."""
    key = caller.key
    if key is None or not key.models:
        return None
    for model in models:
        if not model_allowed(key.models, model):
            return Denied(
                403,
                f"the API key {key.identifier!r} may not use model {quoted(model)}",
                caller,
            )
    return None


def named_models(document: Mapping[str, Any] | None) -> list[str]:
    """The model names a model operation's body gives (pull, delete, copy, create, push)."""
    if not document:
        return []
    return [v for f in _MODEL_FIELDS if isinstance(v := document.get(f), str) and v]
