"""``twistd ollamaflow``: options and the service maker (imported only when the plugin is used)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.application.service import IService
from twisted.python import usage

from ollamaflow.settings import DatabaseDriver, LoadedSettings, SettingsError, load_settings

if TYPE_CHECKING:
    from ollamaflow.store import Snapshot, Store


class Options(usage.Options):
    synopsis = "[--config PATH] [start]"
    longdesc = (
        "Run OllamaFlow. The settings file is created with defaults if it does not exist; "
        "frontends and backends live in the database it names."
    )
    optParameters = [
        ["config", "c", "ollamaflow.json", "Settings file (created with defaults if missing)."],
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
    from twisted.internet import reactor

    from ollamaflow.daemon import Daemon
    from ollamaflow.logs import observer_for
    from ollamaflow.runtime import utc_clock

    try:
        loaded = load_settings(Path(options["config"]))
    except SettingsError as e:
        raise SystemExit(f"ollamaflow: {e}") from None
    now = utc_clock(reactor.seconds)
    store, snapshot = prepare_store(loaded, reactor, now)
    observer = observer_for(loaded.settings.logging, loaded.log_file, _console(options))
    return Daemon(
        loaded=loaded, store=store, snapshot=snapshot, reactor=reactor, log_observer=observer
    )


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
