"""Who is asking: the API key a client request carries, and what that key may do.

Decisions only, no I/O: :func:`identify` turns an ``Authorization`` field into a
:class:`Caller` or a 401/403, :func:`may_manage` and :func:`may_use` say whether the caller may
manage models and use a model. A frontend without ``RequireApiKey`` serves requests without a
key as Ollama does; a key that is one of ours is honoured (and limited) wherever it is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ollamaflow.apikeys import MAX_SECRET, SECRET_PREFIX, hash_secret, model_allowed
from ollamaflow.credentials import Tokens, bearer_token
from ollamaflow.gateway.clienterrors import quoted
from ollamaflow.ratelimits.contracts import NO_LIMITS, Limits
from ollamaflow.records import ADMIN, ANONYMOUS, ApiKey, Frontend

_OURS = SECRET_PREFIX.encode()
#: Body fields that name the models an operation touches (``ollama cp``: both).
_MODEL_FIELDS = ("model", "name", "source", "destination", "from")


@attrs.frozen
class Caller:
    """The requester: its key (None without one), the name its usage is accounted under, and
    the limits it is held to (empty without a key)."""

    key: ApiKey | None
    account: str
    limits: Limits = NO_LIMITS

    @property
    def priority(self) -> int:
        return self.key.priority if self.key is not None else 0


ANONYMOUS_CALLER = Caller(None, ANONYMOUS)
ADMIN_CALLER = Caller(None, ADMIN)


@attrs.frozen
class Denied:
    """The request may not go: 401 (no valid key) or 403 (a key used beyond what it may);
    ``account``: whom the refusal is counted against."""

    status: int
    message: str
    caller: Caller = ANONYMOUS_CALLER


def limits_of(key: ApiKey) -> Limits:
    return Limits(key.requests_per_minute, key.tokens_per_minute, key.max_concurrent_requests)


def identify(
    authorization: bytes | None,
    frontend: Frontend,
    keys_by_hash: Mapping[str, ApiKey],
    admin_tokens: Tokens,
    now: float,
) -> Caller | Denied:
    """The caller of a request to ``frontend``; an admin token is a key to everything.

    A bearer token that is one of our keys must be valid (active, not expired) on every
    frontend; any other token, or none, is anonymous where keys are not required (so the
    placeholder key an OpenAI SDK must send keeps working) and a 401 where they are.
    """
    token = bearer_token(authorization)
    if token is None:
        if frontend.require_api_key:
            return Denied(401, "an API key is required: send 'Authorization: Bearer <key>'")
        return ANONYMOUS_CALLER
    if admin_tokens and admin_tokens.match(authorization):
        return ADMIN_CALLER
    if token.startswith(_OURS) and len(token) <= MAX_SECRET:
        key = keys_by_hash.get(hash_secret(token))
        if key is None or not key.active:
            return Denied(401, "the API key is not valid")
        if key.expires_utc is not None and key.expires_utc.timestamp() <= now:
            return Denied(
                401, f"the API key {key.identifier!r} expired", Caller(key, key.identifier)
            )
        if key.frontends and frontend.identifier not in key.frontends:
            return Denied(
                403,
                f"the API key {key.identifier!r} may not be used on frontend "
                f"{frontend.identifier!r}",
                Caller(key, key.identifier),
            )
        return Caller(key, key.identifier, limits_of(key))
    if frontend.require_api_key:
        return Denied(401, "the API key is not valid")
    return ANONYMOUS_CALLER


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
