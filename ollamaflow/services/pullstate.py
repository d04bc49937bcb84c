"""What :class:`~ollamaflow.services.sync.ModelSync` keeps per backend: each model's pull
(queued, running or finishing), who waits for it, and the last failure of each model."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ollamaflow.services.pull import ProgressCallback, PullProgress

log = Logger()


@attrs.define(eq=False)
class Watcher:
    """Someone waiting for a pull: a gateway request, via :meth:`ModelSync.ensure`."""

    done: Deferred[None]
    on_progress: ProgressCallback | None


@attrs.define(eq=False)
class Pull:
    """One pull of one model on one backend: queued, running, or finishing (re-reading tags)."""

    key: str
    name: str
    progress: PullProgress = attrs.field(factory=PullProgress)
    watchers: list[Watcher] = attrs.field(factory=list)
    running: Deferred[None] | None = None
    finishing: bool = False

    @property
    def queued(self) -> bool:
        return self.running is None and not self.finishing


@attrs.define(eq=False)
class FailedPull:
    """The last failed pull of a model on a backend, and when it may be tried again."""

    name: str
    error: str
    attempts: int
    next_retry: float
    timer: IDelayedCall | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


@attrs.define(eq=False)
class BackendPulls:
    """A backend's pulls by model key (queued, running or finishing), and its models' last
    failures."""

    pulls: dict[str, Pull] = attrs.field(factory=dict)
    failures: dict[str, FailedPull] = attrs.field(factory=dict)

    def running(self) -> int:
        return sum(1 for p in self.pulls.values() if p.running is not None)

    def keep_only(self, required: Collection[str]) -> None:
        """Forget what is no longer required: queued pulls nobody waits for, and the failures
        of models neither required nor pulling."""
        for key, p in list(self.pulls.items()):
            if p.queued and not p.watchers and key not in required:
                del self.pulls[key]
        for key in list(self.failures):
            if key not in required and key not in self.pulls:
                self.drop_failure(key)

    def drop_failure(self, key: str) -> None:
        failed = self.failures.pop(key, None)
        if failed is not None:
            failed.cancel_timer()


def detach(p: Pull, watcher: Watcher) -> None:
    """``watcher`` stops waiting for ``p`` (its request went away)."""
    if watcher in p.watchers:
        p.watchers.remove(watcher)


def notify(watcher: Watcher, message: dict[str, Any]) -> None:
    """Pass one progress message on; a watcher's bug is logged, never raised into the pull."""
    if watcher.on_progress is None:
        return
    try:
        watcher.on_progress(message)
    except Exception:
        log.failure("pull progress listener failed")
