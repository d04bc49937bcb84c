"""``twistd ollamaflow``: options and the service maker (imported only when the plugin is used)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import attrs
from twisted.application.service import IService
from twisted.logger import Logger, LogLevel
from twisted.python import usage

from ollamaflow.settings import DatabaseDriver, LoadedSettings, SettingsError, load_settings

if TYPE_CHECKING:
    from ollamaflow.store import Snapshot, Store

log = Logger()


#: The options, accepted before ``start`` and after it: ``start --config X`` as a unit file
#: would put it, ``--config X start`` as twistd's own syntax has it.
_PARAMETERS: list[list[Any]] = [
    ["config", "c", "ollamaflow.json", "Settings file (created with defaults if missing)."],
    ["worker", None, None, "Internal: run as worker N of a daemon with Workers > 1.", int],
]
#: Flags, accepted on either side of ``start`` too.
_FLAGS: list[list[Any]] = [
    [
        "demo",
        None,
        "Run a demo: two simulated Ollama servers and some traffic, on throwaway settings and "
        "database in a temporary folder (--config is ignored: an existing configuration is "
        "never touched).",
    ],
]


def _no_arguments(args: tuple[str, ...]) -> None:
    if args:
        raise usage.UsageError(f"unexpected argument(s): {' '.join(args)}")


class StartOptions(usage.Options):
    """``start``: the same options, after the word; given there, they win."""

    synopsis = "[--config PATH] [--demo]"
    optParameters = [[name, short, None, *rest] for name, short, _default, *rest in _PARAMETERS]
    optFlags = _FLAGS

    def parseArgs(self, *args: str) -> None:
        _no_arguments(args)


class Options(usage.Options):
    synopsis = "[--config PATH] [--demo] [start [--config PATH] [--demo]]"
    longdesc = (
        "Run OllamaFlow. The settings file is created with defaults if it does not exist; "
        "frontends and backends live in the database it names."
    )
    optParameters = _PARAMETERS
    optFlags = _FLAGS
    subCommands = [
        ["start", None, StartOptions, "Run OllamaFlow: the same as no command (1.2's runbooks)."]
    ]

    def parseArgs(self, *args: str) -> None:
        _no_arguments(args)  # only reached without a command: twisted takes "start" itself

    def postOptions(self) -> None:
        given = getattr(self, "subOptions", None)
        if given is not None:
            for name, *_ in _PARAMETERS:
                if given[name] is not None:
                    self[name] = given[name]
            for name, *_ in _FLAGS:
                if given[name]:
                    self[name] = given[name]


def in_foreground(options: Options) -> bool:
    """Whether twistd runs in the foreground or logs to stdout (``-n``, ``--logfile=-``)."""
    parent = getattr(options, "parent", None) or {}
    return bool(parent.get("nodaemon") or parent.get("logfile") == "-")


def _console(options: Options) -> IO[str]:
    """Where console logging goes: stdout in the foreground, twistd's log file when daemonized."""
    if in_foreground(options):
        return sys.stdout
    parent = getattr(options, "parent", None) or {}
    logfile = parent.get("logfile") or "twistd.log"
    from twisted.python.logfile import LogFile

    return cast(IO[str], LogFile.fromFullPath(os.path.abspath(logfile)))


def makeService(options: Options) -> IService:
    """Load the settings and prepare the database before the reactor runs; fail in one line."""
    if options["demo"]:  # the daemon on throwaway settings, with simulators: see ollamaflow.demo
        from ollamaflow.demo import make_demo

        return make_demo(options, makeService)
    from ollamaflow.twisted_internals import TwistedChanged, self_check

    try:  # first: the modules below use the private Twisted APIs it checks
        self_check()
    except TwistedChanged as e:
        raise SystemExit(f"ollamaflow: {e}") from None
    from twisted.internet import reactor

    from ollamaflow.daemon import Daemon
    from ollamaflow.logs import observer_for
    from ollamaflow.utctime import utc_clock

    try:
        loaded = load_settings(Path(options["config"]))
    except SettingsError as e:
        raise SystemExit(f"ollamaflow: {e}") from None
    raise_open_files_limit(loaded.settings.webserver.max_connections)
    now = utc_clock(reactor.seconds)
    store, snapshot = prepare_store(loaded, reactor, now)
    logging = loaded.settings.logging
    syslog = None
    if logging.servers:
        from ollamaflow.syslog import SyslogSender

        syslog, problems = SyslogSender.open(logging.servers)  # resolves: before the reactor
        for problem in problems:
            log.warn("Logging.Servers: {problem}; its lines are not sent", problem=problem)
    observer = observer_for(logging, loaded.log_file, _console(options), syslog)
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


#: Open files a process needs besides two sockets per client connection: stdio, the reactor's
#: own (epoll, its waker), listening sockets, the database (SQLite's file, WAL and shared memory,
#: or up to 64 PostgreSQL connections and the one that LISTENs), log files, the connections of
#: health checks, model inventory and pulls (a few per backend), and up to 128 refused
#: connections lingering (``listener.MAX_LINGERING``).
FILES_MARGIN = 512
#: macOS refuses a soft limit above its own ceiling, even below an unlimited hard limit.
DARWIN_OPEN_MAX = 10240


def files_needed(max_connections: int) -> int:
    """Open files for ``MaxConnections``: each proxied request holds a client and a backend
    socket, plus :data:`FILES_MARGIN`."""
    return 2 * max_connections + FILES_MARGIN


def connections_carried(files: int) -> int:
    """The largest ``MaxConnections`` that a limit of ``files`` open files carries."""
    return max(0, (files - FILES_MARGIN) // 2)


@attrs.frozen
class OpenFiles:
    """The soft open-files limit before and after start-up, and what MaxConnections needs."""

    before: int
    after: int
    hard: int
    max_connections: int
    #: RLIM_INFINITY on this platform.
    unlimited: int
    #: The soft limit asked for and refused, if any.
    refused: int | None = None

    @property
    def needed(self) -> int:
        return files_needed(self.max_connections)

    @property
    def enough(self) -> bool:
        return self.after == self.unlimited or self.after >= self.needed

    @property
    def carried(self) -> int:
        """The MaxConnections the limit now carries."""
        return self.max_connections if self.enough else connections_carried(self.after)


def adjust_open_files(
    max_connections: int,
    get_limits: Callable[[], tuple[int, int]],
    set_limits: Callable[[int, int], None],
    unlimited: int,
) -> OpenFiles:
    """Raise the soft open-files limit (``get_limits``/``set_limits``: soft, hard) to what
    ``max_connections`` needs if it is lower: never beyond the hard limit, never lowering it."""
    soft, hard = get_limits()
    found = OpenFiles(soft, soft, hard, max_connections, unlimited)
    if found.enough:
        return found
    target = found.needed if hard == unlimited else min(found.needed, hard)
    if target <= soft:  # at a hard limit that is too low already
        return found
    attempts = [target]
    if hard == unlimited and target > DARWIN_OPEN_MAX > soft:
        attempts.append(DARWIN_OPEN_MAX)
    for attempt in attempts:
        try:
            set_limits(attempt, hard)
        except (OSError, ValueError):
            continue
        refused = None if attempt == target else target
        return attrs.evolve(found, after=attempt, refused=refused)
    return attrs.evolve(found, refused=target)


def describe_open_files(limit: OpenFiles) -> tuple[bool, str]:
    """Whether the outcome is a warning, and its log line (numbers and words only)."""
    n = f"MaxConnections {limit.max_connections}"
    hard = "unlimited" if limit.hard == limit.unlimited else str(limit.hard)
    if limit.enough:
        if limit.after == limit.before:
            return False, (
                f"open files limit {_files(limit, limit.after)} (hard limit {hard}): "
                f"enough for {n}, which needs {limit.needed}"
            )
        return False, (
            f"open files limit raised from {limit.before} to {limit.after} for {n} "
            f"(hard limit {hard})"
        )
    short = (
        f"it carries MaxConnections {limit.carried} at most; Webserver.{n} needs "
        f"{limit.needed} (hard limit {hard}): raise the hard limit (LimitNOFILE=, ulimit -Hn) "
        "or lower Webserver.MaxConnections"
    )
    if limit.refused is not None:
        return True, (
            f"open files limit {limit.after}: raising it to {limit.refused} was refused; {short}"
        )
    return True, f"open files limit {limit.after} is too low: {short}"


def _files(limit: OpenFiles, value: int) -> str:
    return "unlimited" if value == limit.unlimited else str(value)


def raise_open_files_limit(max_connections: int) -> OpenFiles | None:
    """At start-up: the soft RLIMIT_NOFILE raised as far as ``max_connections`` needs (see
    :func:`adjust_open_files`), logged; None when the platform has no such limit. Never raises."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    which = resource.RLIMIT_NOFILE

    def get_limits() -> tuple[int, int]:
        return resource.getrlimit(which)

    def set_limits(soft: int, hard: int) -> None:
        resource.setrlimit(which, (soft, hard))

    try:
        limit = adjust_open_files(max_connections, get_limits, set_limits, resource.RLIM_INFINITY)
    except (OSError, ValueError) as e:
        log.warn("cannot read the open files limit: {error}", error=e)
        return None
    warning, line = describe_open_files(limit)
    fields = attrs.asdict(limit, filter=lambda a, _v: a.name != "unlimited")
    fields |= {"needed": limit.needed, "carried": limit.carried}
    # The line holds no braces, so it is its own format string; the numbers go as fields too.
    log.emit(LogLevel.warn if warning else LogLevel.info, line, **fields)
    return limit
