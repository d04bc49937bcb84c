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
        return f"{_kind(self.kind)} {self.identifier!r} does not exist"


@attrs.define(auto_exc=True)
class DuplicateIdentifier(StoreError):
    """A record of this kind already has this identifier."""

    kind: str
    identifier: str

    def __str__(self) -> str:
        kind = _kind(self.kind)
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        return f"{article} {kind} with identifier {self.identifier!r} already exists"


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
    #: The setting that points the daemon at its database (depends on the driver).
    setting: str = "DatabaseFilename"

    def __str__(self) -> str:
        return (
            f"database schema version {self.found} is newer than this OllamaFlow supports "
            f"({self.supported}); upgrade OllamaFlow or use another {self.setting}"
        )


@attrs.define(auto_exc=True)
class InvalidStoredRecord(StoreError):
    """A stored row no longer parses as a record (edited by hand, or a stricter field).

    Not raised by reads: a snapshot leaves the row out and lists this in ``left_out``."""

    kind: str
    identifier: str
    reason: str

    @property
    def key(self) -> tuple[str, str, str]:
        """What tells two of these apart (exceptions themselves compare by identity)."""
        return (self.kind, self.identifier, self.reason)

    def __str__(self) -> str:
        return f"stored {_kind(self.kind)} {_name(self.identifier)} is not valid: {self.reason}"


@attrs.define(auto_exc=True)
class InvalidRecord(StoreError):
    """A record refused before writing: it would be stored in a form that does not load back
    (it skipped the admin API's checks). ``reason`` names the field."""

    kind: str
    identifier: str
    reason: str

    def __str__(self) -> str:
        return f"{self.reason}; {_kind(self.kind)} {_name(self.identifier)} was not stored"


#: How a kind of record is named in a message, when not as its ``kind`` (which names its route).
_KIND_NAMES = {"apikey": "API key"}


def _kind(kind: str) -> str:
    return _KIND_NAMES.get(kind, kind)


def _name(identifier: str) -> str:
    """An identifier for a message: quoted, escaped and cut (it may be anything)."""
    text = repr(identifier)
    return text if len(text) <= 80 else text[:76] + "...'"


class StoreClosed(StoreError):
    """The store was used after :meth:`Store.close`."""

    def __str__(self) -> str:
        return "the configuration store is closed"


@attrs.define(auto_exc=True)
class StoreUnavailable(StoreError):
    """The database cannot be reached or the connection broke; the daemon keeps running.

    ``unsure`` is set when the connection broke while a write was committing, so the change may
    or may not have been saved.
    """

    reason: str
    unsure: bool = False

    def __str__(self) -> str:
        text = f"the configuration database is unavailable: {self.reason}"
        if self.unsure:
            return text + "; the change may or may not have been saved, check before retrying"
        return text + "; nothing was changed, retry later"


@attrs.define(auto_exc=True)
class DatabaseRefused(StoreError):
    """At start-up, the database answered but refused what opening needs (rights, say)."""

    reason: str

    def __str__(self) -> str:
        return f"the configuration database refused to open: {self.reason}"


@attrs.define(auto_exc=True)
class DriverMissing(StoreError):
    """The database driver's Python package is not installed."""

    database: str
    package: str
    extra: str

    def __str__(self) -> str:
        return (
            f"the {self.database} driver is not installed: "
            f"pip install '{self.package}' (or 'ollamaflow[{self.extra}]')"
        )


@attrs.define(auto_exc=True)
class InvalidConnectionSettings(StoreError):
    """The database URL or connection fields do not make a valid connection string."""

    reason: str

    def __str__(self) -> str:
        return f"invalid database connection settings: {self.reason}"


def one_line(error: BaseException, limit: int = 300) -> str:
    """A driver's message on one line (libpq's span several), cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
