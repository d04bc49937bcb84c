"""Log observers from the settings: the level filter, the console, and an optional log file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)
from zope.interface import provider

from ollamaflow.settings import Logging

_LEVELS = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error)


def level_for(severity: int) -> LogLevel:
    """OllamaFlow 1.2's MinimumSeverity (0 debug … 7) as a twisted.logger level."""
    return _LEVELS[severity] if severity < len(_LEVELS) else LogLevel.critical


def observer_for(
    logging: Logging, log_file: Path | None, console: IO[str] | None = None
) -> ILogObserver:
    """One observer writing to the console and/or the log file, above the configured level.

    Files are opened here, at start-up, never while serving.
    """
    targets: list[ILogObserver] = []
    if logging.console_logging:
        targets.append(textFileLogObserver(console or sys.stdout))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        targets.append(textFileLogObserver(log_file.open("a", encoding="utf-8")))

    @provider(ILogObserver)
    def fan_out(event: dict[str, object]) -> None:
        for target in targets:
            target(event)

    predicate = LogLevelFilterPredicate(defaultLogLevel=level_for(logging.minimum_severity))
    return FilteringLogObserver(fan_out, [predicate])
