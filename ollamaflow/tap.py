"""``twistd ollamaflow``: options and the service maker (imported only when the plugin is used)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from ollamaflow.settings import DatabaseDriver, LoadedSettings, SettingsError, load_settings

if TYPE_CHECKING:
    from ollamaflow.store import Snapshot, Store

log = Logger()

#: Where the soft open-files limit is raised to when the hard limit is unlimited.
NOFILE_CEILING = 1 << 20


class Options(usage.Options):
    synopsis = "[--config PATH] [start]"
    longdesc = (
        "Run OllamaFlow. The settings file is created with defaults if it does not exist; "
        "frontends and backends live in the database it names."
    )
    optParameters = [
        ["config", "c", "ollamaflow.json", "Settings file (created with defaults if missing)."],
        ["worker", None, None, "Internal: run as worker N of a daemon with Workers > 1.", int],
    ]

    def parseArgs(self, *args: str) -> None:
        if args not in ((), ("start",)):
            raise usage.UsageError(f"unexpected argument(s): {' '.join(args)} (only 'start')")


def _console(options: Options) -> IO[str]:
    """Where console logging goes: stdout in the foreground, twistd's log file when daemonized."""
    parent = getattr(options, "parent", None) or {}
    logfile = parent.get("logfile") or ""
    if parent.get("nodaemon") or logfile == "-":
        return sys.stdout
    from twisted.python.logfile import LogFile

    return cast(IO[str], LogFile.fromFullPath(os.path.abspath(logfile or "twistd.log")))


def makeService(options: Options) -> IService:
    """Load the settings and prepare the database before the reactor runs; fail in one line."""
    from ollamaflow.twisted_internals import TwistedChanged, self_check

    try:  # first: the modules below use the private Twisted APIs it checks
        self_check()
    except TwistedChanged as e:
        raise SystemExit(f"ollamaflow: {e}") from None
    from twisted.internet import reactor

    from ollamaflow.daemon import Daemon
    from ollamaflow.logs import observer_for
    from ollamaflow.runtime import utc_clock

    try:
        loaded = load_settings(Path(options["config"]))
    except SettingsError as e:
        raise SystemExit(f"ollamaflow: {e}") from None
    raise_open_files_limit()
    now = utc_clock(reactor.seconds)
    store, snapshot = prepare_store(loaded, reactor, now)
    observer = observer_for(loaded.settings.logging, loaded.log_file, _console(options))
    worker: int | None = options["worker"]
    workers = loaded.settings.workers
    daemon = Daemon(
        loaded=loaded,
        store=store,
        snapshot=snapshot,
        reactor=reactor,
        log_observer=observer,
        worker=worker,
    )
    if worker is None and workers > 1:
        from ollamaflow.workers import WorkerPool

        WorkerPool(reactor, str(loaded.path), workers - 1).setServiceParent(daemon)
    if worker is not None:
        from ollamaflow.workers import exit_with_parent

        exit_with_parent(reactor)
    return daemon


def prepare_store(
    loaded: LoadedSettings, reactor: Any, now: Callable[[], datetime]
) -> tuple[Store, Snapshot]:
    """Open the store the settings name (SQLite file or PostgreSQL), blocking, before the
    reactor runs: migrated, seeded and read once. Any failure is one line and exit status 1."""
    from ollamaflow.store import (
        StoreError,
        describe_postgresql,
        postgresql_conninfo,
        prepare_postgresql,
        prepare_sqlite,
    )

    where = str(loaded.database_path)
    try:
        if loaded.database_driver is DatabaseDriver.POSTGRESQL:
            where = "Database"
            database = loaded.settings.database
            conninfo = postgresql_conninfo(database.url, **loaded.postgresql_params())
            where = describe_postgresql(conninfo)
            return prepare_postgresql(
                conninfo,
                reactor=reactor,
                now=now,
                pool_size=database.pool_size,
            )
        return prepare_sqlite(where, reactor=reactor, now=now)
    except StoreError as e:
        raise SystemExit(f"ollamaflow: {where}: {e}") from None


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, where allowed: every client request
    holds a socket, and so does its backend connection. Returns (before, after), or None when
    the platform has no such limit; never raises."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as e:
        log.warn("cannot read the open files limit: {error}", error=e)
        return None
    unlimited = resource.RLIM_INFINITY
    target = NOFILE_CEILING if hard == unlimited else hard
    if soft == unlimited or soft >= target:
        log.info("open files limit {soft} (hard limit {hard})", soft=soft, hard=hard)
        return soft, soft
    # Some kernels refuse more than their own ceiling (macOS: 10240) below an unlimited hard one.
    for attempt in (target, 10240):
        if attempt <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (attempt, hard))
        except (OSError, ValueError):
            continue
        log.info("open files limit raised from {soft} to {new}", soft=soft, new=attempt)
        return soft, attempt
    log.warn(
        "open files limit stays at {soft}: raising it to {target} was refused",
        soft=soft,
        target=target,
    )
    return soft, soft
