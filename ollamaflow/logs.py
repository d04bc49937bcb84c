"""Log observers from the settings: the level filter, the console, and an optional log file.

Each target writes text (twisted's classic lines) or JSON lines, one object per line:
``{"time", "level", "namespace", "message", ...the event's own fields}``.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import provider

from ollamaflow.settings import LogFormat, Logging

_LEVELS = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error)

#: Event keys never copied into a JSON line: ours, and those of legacy (twisted.python.log)
#: events, whose content is already in ``message``.
_RESERVED = frozenset(
    {
        "time",
        "level",
        "namespace",
        "message",
        "traceback",
        "format",
        "isError",
        "why",
        "failure",
        "system",
    }
)
_SCALARS = (str, int, float, bool, type(None))


def level_for(severity: int) -> LogLevel:
    """OllamaFlow 1.2's MinimumSeverity (0 debug … 7) as a twisted.logger level."""
    return _LEVELS[severity] if severity < len(_LEVELS) else LogLevel.critical


def logs_info(logging: Logging) -> bool:
    """Whether info events (the access log) pass the configured level."""
    return level_for(logging.minimum_severity) <= LogLevel.info


def is_terminal(stream: object) -> bool:
    """Whether ``stream`` is a TTY; anything that cannot tell is not."""
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _jsonable(value: object) -> object:
    return value if isinstance(value, _SCALARS) else repr(value)


def _message(event: dict[str, Any]) -> str:
    """The event's text: ``str.format_map`` when it suffices (several times faster than
    twisted's ``formatEvent``), else ``formatEvent`` (``{f()}`` calls, failures, no format)."""
    fmt = event.get("log_format")
    if isinstance(fmt, str):
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


def json_line(event: dict[str, Any]) -> str:
    """One event as a JSON object and a newline: formatted message plus its own fields."""
    level = event.get("log_level")
    out: dict[str, object] = {
        "time": _utc(event.get("log_time") or 0.0),
        "level": getattr(level, "name", str(level)),
        "namespace": event.get("log_namespace"),
        "message": _message(event),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        out["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _RESERVED:
            continue
        out[key] = value
    try:
        text = json.dumps(out, default=repr, ensure_ascii=False)
    except (TypeError, ValueError):  # non-string keys, cycles: fall back to repr per field
        text = json.dumps({k: _jsonable(v) for k, v in out.items()}, ensure_ascii=False)
    return text + "\n"


def target_observer(stream: IO[str], fmt: LogFormat) -> ILogObserver:
    """An observer writing to ``stream`` in ``fmt`` (``auto``: text on a terminal, else JSON)."""
    if fmt is LogFormat.TEXT or (fmt is LogFormat.AUTO and is_terminal(stream)):
        return textFileLogObserver(stream)
    return FileLogObserver(stream, json_line)


def observer_for(
    logging: Logging, log_file: Path | None, console: IO[str] | None = None
) -> ILogObserver:
    """One observer writing to the console and/or the log file, above the configured level.

    Files are opened here, at start-up, never while serving.
    """
    targets: list[ILogObserver] = []
    if logging.console_logging:
        targets.append(target_observer(console or sys.stdout, logging.format))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        targets.append(target_observer(log_file.open("a", encoding="utf-8"), logging.format))

    @provider(ILogObserver)
    def fan_out(event: dict[str, object]) -> None:
        for target in targets:
            target(event)

    predicate = LogLevelFilterPredicate(defaultLogLevel=level_for(logging.minimum_severity))
    return FilteringLogObserver(fan_out, [predicate])
