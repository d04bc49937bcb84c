"""What the configuration store refuses, each with a message fit to show an operator."""

from __future__ import annotations

import attrs


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


@attrs.define(auto_exc=True)
class NotFound(StoreError):
    """No record of this kind has this identifier."""

    kind: str
    identifier: str

    def __str__(self) -> str:
        return f"{self.kind} {self.identifier!r} does not exist"


@attrs.define(auto_exc=True)
class DuplicateIdentifier(StoreError):
    """A record of this kind already has this identifier."""

    kind: str
    identifier: str

    def __str__(self) -> str:
        return f"a {self.kind} with identifier {self.identifier!r} already exists"


@attrs.define(auto_exc=True)
class UnknownBackends(StoreError):
    """A frontend names backends that do not exist (all of them are listed)."""

    identifiers: tuple[str, ...]

    def __str__(self) -> str:
        names = ", ".join(repr(i) for i in self.identifiers)
        plural = "s do" if len(self.identifiers) > 1 else " does"
        return f"backend{plural} not exist: {names}"


@attrs.define(auto_exc=True)
class BackendInUse(StoreError):
    """A backend cannot be deleted while frontends list it (unless forced)."""

    identifier: str
    frontends: tuple[str, ...]

    def __str__(self) -> str:
        names = ", ".join(repr(f) for f in self.frontends)
        plural = "s" if len(self.frontends) > 1 else ""
        return (
            f"backend {self.identifier!r} is used by frontend{plural} {names}; remove it from "
            f"{'them' if plural else 'it'} first, or delete with force=true"
        )


@attrs.define(auto_exc=True)
class SchemaTooNew(StoreError):
    """The database was written by a newer OllamaFlow; refusing to touch it."""

    found: int
    supported: int

    def __str__(self) -> str:
        return (
            f"database schema version {self.found} is newer than this OllamaFlow supports "
            f"({self.supported}); upgrade OllamaFlow or use another DatabaseFilename"
        )


@attrs.define(auto_exc=True)
class InvalidStoredRecord(StoreError):
    """A stored row no longer parses as a record (edited by hand, or a stricter field)."""

    kind: str
    identifier: str
    reason: str

    def __str__(self) -> str:
        return f"stored {self.kind} {self.identifier!r} is not valid: {self.reason}"


class StoreClosed(StoreError):
    """The store was used after :meth:`Store.close`."""

    def __str__(self) -> str:
        return "the configuration store is closed"
