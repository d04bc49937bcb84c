"""The live configuration: an immutable, indexed view that the hot path reads without locking,
and the registry through which every change is written to the store and published at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from urllib.parse import quote

import attrs
from twisted.logger import Logger

from ollamaflow.records import ApiKey, Backend, Frontend
from ollamaflow.store import InvalidStoredRecord, Snapshot, Store

CATCH_ALL = "*"


@attrs.frozen
class Catalog:
    """Frontends, backends and API keys by identifier (creation order), and frontends by
    Host."""

    generation: int
    frontends: Mapping[str, Frontend]
    backends: Mapping[str, Backend]
    by_host: Mapping[str, Frontend]
    catch_all: Frontend | None
    #: Every key, active or not, expired or not (whoever recognises one judges that).
    api_keys: Mapping[str, ApiKey] = attrs.field(factory=dict)
    #: Stored records that did not load, left out of this catalog (see :class:`Snapshot`).
    left_out: tuple[InvalidStoredRecord, ...] = attrs.field(
        default=(), eq=lambda errors: tuple(e.key for e in errors)
    )

    @classmethod
    def build(cls, snapshot: Snapshot) -> Catalog:
        by_host: dict[str, Frontend] = {}
        for fe in snapshot.frontends:
            if fe.active:
                by_host.setdefault(fe.hostname.lower(), fe)
        return cls(
            generation=snapshot.generation,
            frontends={fe.identifier: fe for fe in snapshot.frontends},
            backends={be.identifier: be for be in snapshot.backends},
            by_host=by_host,
            catch_all=by_host.get(CATCH_ALL),
            api_keys={key.identifier: key for key in snapshot.api_keys},
            left_out=snapshot.left_out,
        )

    def frontend_for_host(self, host: str) -> Frontend | None:
        """The active frontend for a ``Host`` (port dropped, any case), else the ``*`` one."""
        if host.startswith("["):
            name = host[1 : host.find("]")] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return self.by_host.get(name.lower(), self.catch_all)

    def frontends_listing(self, backend: str) -> tuple[str, ...]:
        return tuple(fe.identifier for fe in self.frontends.values() if backend in fe.backends)

    def missing_backends(self, frontend: Frontend) -> tuple[str, ...]:
        """The backends ``frontend`` lists that do not exist (not created yet, or left out):
        it is served by the others, and by each of these as soon as it is created."""
        return tuple(b for b in frontend.backends if b not in self.backends)


#: Called with each catalog :meth:`Registry.publish` accepts (not an HTTP listener).
CatalogSubscriber = Callable[[Catalog], None]


@attrs.define
class Registry:
    """Writes go to the store, then the fresh catalog is published to every subscriber.

    A snapshot older than the published one (two writes finishing out of order) is ignored.
    Stored records left out of a catalog are logged once each, when first seen.
    """

    store: Store
    catalog: Catalog
    _subscribers: list[CatalogSubscriber] = attrs.field(factory=list)
    _log: Logger = attrs.field(factory=Logger)
    #: The left-out records of the published catalog, already logged.
    _reported: frozenset[tuple[str, str, str]] = attrs.field(init=False, default=frozenset())
    #: The frontends' missing backends in the published catalog, already logged.
    _missing: frozenset[tuple[str, tuple[str, ...]]] = attrs.field(init=False, default=frozenset())

    def __attrs_post_init__(self) -> None:
        self._report_left_out(self.catalog)
        self._report_missing(self.catalog)

    def subscribe(self, subscriber: CatalogSubscriber) -> None:
        self._subscribers.append(subscriber)

    def publish(self, catalog: Catalog) -> None:
        if catalog.generation < self.catalog.generation:
            return
        self.catalog = catalog
        self._report_left_out(catalog)
        self._report_missing(catalog)
        for subscriber in self._subscribers:
            try:
                subscriber(catalog)
            except Exception:
                self._log.failure(
                    "configuration subscriber {subscriber!r} failed", subscriber=subscriber
                )

    def _report_left_out(self, catalog: Catalog) -> None:
        """Warn about each left-out record not left out (for the same reason) last time."""
        for error in catalog.left_out:
            if error.key not in self._reported:
                name = quote(error.identifier, safe="", errors="backslashreplace")
                self._log.warn(
                    "{error}; it is left out until repaired (PUT) or removed (DELETE) at {route}",
                    error=str(error),
                    route=f"/v1.0/{error.kind}s/{name}",
                )
        self._reported = frozenset(error.key for error in catalog.left_out)

    def _report_missing(self, catalog: Catalog) -> None:
        """Warn about each frontend whose missing backends changed to some (not to none)."""
        missing = frozenset(
            (fe.identifier, gone)
            for fe in catalog.frontends.values()
            if (gone := catalog.missing_backends(fe))
        )
        for identifier, gone in sorted(missing - self._missing):
            self._log.warn(
                "frontend {frontend} lists backends that do not exist: {missing}; it is served"
                " by its other backends, and by each of these once it is created",
                frontend=repr(identifier),
                missing=", ".join(repr(b) for b in gone),
            )
        self._missing = missing

    async def refresh(self) -> Catalog:
        self.publish(Catalog.build(await self.store.snapshot()))
        return self.catalog

    async def create_frontend(self, fe: Frontend) -> Frontend:
        stored = await self.store.create_frontend(fe)
        await self.refresh()
        return stored

    async def replace_frontend(self, fe: Frontend) -> Frontend:
        stored = await self.store.replace_frontend(fe)
        await self.refresh()
        return stored

    async def delete_frontend(self, identifier: str) -> None:
        await self.store.delete_frontend(identifier)
        await self.refresh()

    async def create_backend(self, be: Backend) -> Backend:
        stored = await self.store.create_backend(be)
        await self.refresh()
        return stored

    async def replace_backend(self, be: Backend) -> Backend:
        stored = await self.store.replace_backend(be)
        await self.refresh()
        return stored

    async def delete_backend(self, identifier: str, *, force: bool = False) -> tuple[str, ...]:
        removed_from = await self.store.delete_backend(identifier, force=force)
        await self.refresh()
        return removed_from

    async def create_api_key(self, key: ApiKey) -> ApiKey:
        stored = await self.store.create_api_key(key)
        await self.refresh()
        return stored

    async def replace_api_key(self, key: ApiKey) -> ApiKey:
        stored = await self.store.replace_api_key(key)
        await self.refresh()
        return stored

    async def rotate_api_key(self, identifier: str, secret_hash: str, key_prefix: str) -> ApiKey:
        stored = await self.store.rotate_api_key(identifier, secret_hash, key_prefix)
        await self.refresh()
        return stored

    async def delete_api_key(self, identifier: str) -> None:
        await self.store.delete_api_key(identifier)
        await self.refresh()
