"""Bearer tokens of our own (admin, metrics): recognised in constant time, never forwarded."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import attrs


def bearer_token(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value (any case of the scheme)."""
    if not header:
        return None
    scheme, _, token = header.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


@attrs.frozen
class Tokens:
    """A set of secret tokens; :meth:`match` takes the same time whichever one matches."""

    values: tuple[bytes, ...]

    @classmethod
    def of(cls, *groups: Iterable[str | None]) -> Tokens:
        return cls(tuple(t.encode() for group in groups for t in group if t))

    def match(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries one of these tokens."""
        token = bearer_token(authorization)
        if token is None:
            return False
        matched = False
        for candidate in self.values:
            matched |= hmac.compare_digest(token, candidate)
        return matched

    def __bool__(self) -> bool:
        return bool(self.values)


#: No tokens at all: nothing matches.
NO_TOKENS = Tokens(())
