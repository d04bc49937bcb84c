"""Log observers from the settings: the level filter, the console, an optional log file, and
the syslog servers (:mod:`ollamaflow.syslog`).

Each target writes text (twisted's classic lines) or JSON lines, one object per line:
``{"time", "level", "namespace", "message", ...the event's own fields}``.

Values often come from clients (model names, paths, backends' errors), so every value is cut to
:data:`MAX_VALUE_CHARS` and, where it is formatted into a message, escaped: one event is one
line, and no value can forge another line or reach a terminal as a control sequence. Exempt,
being meant to be long and bounded already: tracebacks, and the access log's opt-in request
head and bodies.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure
from zope.interface import provider

from ollamaflow.accesslog import NAMESPACE as ACCESS_NAMESPACE
from ollamaflow.settings import LogFormat, Logging
from ollamaflow.syslog import Destination, SyslogSender, datagram, header_field, utc_timestamp

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

#: The most characters one value puts in a log line; the rest is cut, and a marker says how much.
MAX_VALUE_CHARS = 300
_MORE = "...[{} more characters]"
#: Types whose text is always short and printable (ints only within :data:`_INT_BOUND`).
_SHORT_TYPES = frozenset({float, bool, type(None)})
_INT_BOUND = 10 ** (MAX_VALUE_CHARS - 1)
#: Keys the logging machinery sets, never from a client: not checked, never rewritten.
_MACHINERY = frozenset(
    {
        "log_logger",
        "log_level",
        "log_source",
        "log_format",
        "log_time",
        "log_failure",
        "log_legacy",
        "log_trace",
        "log_flattened",
    }
)
#: The access log's opt-in head and bodies: cut to 64 KiB by the gateway, written with ``!r``
#: or JSON.
_BODIES = frozenset({"request_head", "request_body", "response_body"})
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    """One non-printable character as ``repr`` writes it: ``\\n``, ``\\x1b``, ``\\ud800``..."""
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` fit for a log line: non-printable characters escaped (control characters, C1,
    lone surrogates, line separators...), at most ``limit`` characters written, then a marker of
    how many were left out. Short printable text is returned as it is."""
    if len(text) <= limit and text.isprintable():
        return text
    head = text[:limit]
    if head.isprintable():
        return head + _MORE.format(len(text) - limit)
    written: list[str] = []
    size = 0
    for char in head:
        piece = char if char.isprintable() else _escape(char)
        if size + len(piece) > limit:
            break
        written.append(piece)
        size += len(piece)
    rest = len(text) - len(written)
    return "".join(written) + (_MORE.format(rest) if rest else "")


def _cut(text: str) -> str:
    """``text`` cut to :data:`MAX_VALUE_CHARS`, not escaped: for JSON, whose encoder escapes."""
    if len(text) <= MAX_VALUE_CHARS:
        return text
    return text[:MAX_VALUE_CHARS] + _MORE.format(len(text) - MAX_VALUE_CHARS)


def _repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # a broken __repr__, an int past Python's digit limit
        return object.__repr__(value)


class _Clipped:
    """Stands for an event value while a message is formatted: whatever text formatting asks of
    it (``str``, ``repr``, a format spec, an attribute, an item, twisted's ``{f()}``) comes out
    clipped."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __format__(self, spec: str) -> str:
        return clip(format(self._value, spec))

    def __str__(self) -> str:
        return clip(str(self._value))

    def __repr__(self) -> str:
        return clip(_repr(self._value))

    def __getattr__(self, name: str) -> _Clipped:
        return _Clipped(getattr(self._value, name))

    def __getitem__(self, key: object) -> _Clipped:
        return _Clipped(self._value[key])  # type: ignore[index]

    def __call__(self) -> _Clipped:
        return _Clipped(self._value())  # type: ignore[operator]


def _legacy_error(event: dict[str, Any]) -> bool:
    """A twisted.python.log error: its ``log_text`` is why it failed and the traceback."""
    return isinstance(event.get("failure"), Failure)


def _exempt(event: dict[str, Any], key: str) -> bool:
    """Whether ``key`` of ``event`` is one of the values meant to be long (and bounded)."""
    if key in _BODIES:
        return event.get("log_namespace") == ACCESS_NAMESPACE
    return key == "log_text" and _legacy_error(event)


def clipped(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` itself when all its values are fit for a line (the usual case: no copy), else
    a copy whose unfit values format as clipped, escaped text."""
    copy: dict[str, Any] | None = None
    for key, value in event.items():
        if key in _MACHINERY:
            continue
        # Fit as it is: a short printable str, a moderate int, a float, a bool or None. Cheap
        # (a type test, a length, str.isprintable): it runs for every value of every line.
        kind = type(value)
        if kind is str:
            if len(value) <= MAX_VALUE_CHARS and value.isprintable():
                continue
        elif kind is int:
            if -_INT_BOUND < value < _INT_BOUND:
                continue
        elif kind in _SHORT_TYPES:
            continue
        if _exempt(event, key):
            continue
        if copy is None:
            copy = dict(event)
        copy[key] = _Clipped(value)
    return event if copy is None else copy


def _json_field(value: object) -> object:
    """A field's value for a JSON line, cut: strings to their first characters (the encoder
    escapes them), anything else to its JSON or ``repr``, kept as it is when that is short."""
    if isinstance(value, str):
        return _cut(value)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -_INT_BOUND < value < _INT_BOUND else _cut(_repr(value))
    if isinstance(value, list | tuple | dict):
        try:
            text = json.dumps(value, default=_repr, ensure_ascii=False)
        except (TypeError, ValueError):
            return _cut(_repr(value))
        return value if len(text) <= MAX_VALUE_CHARS else _cut(text)
    return _cut(_repr(value))


def _escape_lines(text: str) -> str:
    """Text of several lines (a traceback) with every non-printable character but the line
    breaks and tabs escaped: no terminal sequence, no lone surrogate for the writer to choke on."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.replace("\t", "").isprintable():
            lines[i] = "".join(c if c.isprintable() or c == "\t" else _escape(c) for c in line)
    return "\n".join(lines)


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


def _jsonable(value: object) -> object:
    return value if isinstance(value, _SCALARS) else _cut(_repr(value))


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


def _json_text(out: dict[str, object], ascii_only: bool) -> str:
    try:
        return json.dumps(out, default=_repr, ensure_ascii=ascii_only)
    except (TypeError, ValueError):  # non-string keys, cycles: fall back to repr per field
        return json.dumps({k: _jsonable(v) for k, v in out.items()}, ensure_ascii=ascii_only)


def json_line(event: dict[str, Any]) -> str:
    """One event as a JSON object and a newline: formatted message plus its own fields.

    The message is the text line's (values clipped and escaped); fields are cut, and escaped by
    JSON, losslessly: a line that would still carry a non-printable character (DEL, C1, a lone
    surrogate: ``ensure_ascii=False`` lets them through) is written with ``\\u`` escapes only.
    """
    safe = clipped(event)
    level = event.get("log_level")
    out: dict[str, object] = {
        "time": utc_timestamp(event.get("log_time") or 0.0),
        "level": getattr(level, "name", str(level)),
        "namespace": event.get("log_namespace"),
        "message": _message(safe),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        out["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _RESERVED:
            continue
        out[key] = value
    if safe is not event:  # some value is long, odd or not a plain scalar: cut the fields too
        for key, value in out.items():
            if key not in ("time", "level", "message", "traceback") and not _exempt(event, key):
                out[key] = _json_field(value)
    text = _json_text(out, ascii_only=False)
    if not (text.isascii() and "\x7f" not in text) and not text.isprintable():
        text = _json_text(out, ascii_only=True)
    return text + "\n"


def text_line(event: dict[str, Any]) -> str | None:
    """One event as twisted's classic text line (``textFileLogObserver``'s), its values clipped
    and escaped; a traceback, kept whole, has its control characters escaped."""
    line = formatEventAsClassicLogText(clipped(event))
    if line is not None and ("log_failure" in event or _legacy_error(event)):
        line = _escape_lines(line)
    return line


def target_observer(stream: IO[str], fmt: LogFormat) -> ILogObserver:
    """An observer writing to ``stream`` in ``fmt`` (``auto``: text on a terminal, else JSON)."""
    if fmt is LogFormat.TEXT or (fmt is LogFormat.AUTO and is_terminal(stream)):
        return FileLogObserver(stream, text_line)
    return FileLogObserver(stream, json_line)


def syslog_text(event: dict[str, Any]) -> str:
    """An event as a syslog message: ``[namespace] message``, then its traceback if it has one.

    Time, host and severity are in the syslog header. Values are clipped and escaped as in a
    text line; line breaks are kept only in tracebacks (and a legacy error's text).
    """
    text = f"[{event.get('log_namespace') or '-'}] {_message(clipped(event))}"
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text += "\n" + failure.getTraceback()
    return _escape_lines(text)


def syslog_observer(sender: SyslogSender, hostname: str | None = None) -> ILogObserver:
    """An observer sending every event it sees to ``sender`` as one syslog datagram; nothing
    it meets (an odd event, a failed send) raises into logging."""
    host = header_field(socket.gethostname() if hostname is None else hostname)

    @provider(ILogObserver)
    def forward(event: dict[str, Any]) -> None:
        try:
            data = datagram(
                event.get("log_level"),
                event.get("log_time") or time.time(),
                host,
                os.getpid(),  # per event: twistd forks to daemonize after this observer is made
                syslog_text(event),
            )
        except Exception:  # a bug formatting one event must not break every later one
            return
        sender.send(data)

    return forward


def observer_for(
    logging: Logging,
    log_file: Path | None,
    console: IO[str] | None = None,
    syslog: SyslogSender | None = None,
) -> ILogObserver:
    """One observer writing to the console and/or the log file, and forwarding to the syslog
    servers of ``syslog`` (see :meth:`SyslogSender.open`), above the configured level.

    Files are opened here, at start-up, never while serving.
    """
    targets: list[ILogObserver] = []
    if logging.console_logging:
        targets.append(target_observer(console or sys.stdout, logging.format))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        targets.append(target_observer(log_file.open("a", encoding="utf-8"), logging.format))
    local = list(targets)
    if syslog is not None:
        targets.append(syslog_observer(syslog))

        def unsent(destination: Destination, error: OSError) -> None:
            """A server's first failed send, told to the console and file (not to syslog)."""
            Logger(namespace=__name__, observer=local_out).warn(
                "syslog server {server}: cannot send: {error}; lines it misses are dropped "
                "(said once)",
                server=str(destination),
                error=str(error),
            )

        syslog.on_error = unsent

    @provider(ILogObserver)
    def fan_out(event: dict[str, object]) -> None:
        for target in targets:
            target(event)

    @provider(ILogObserver)
    def local_fan_out(event: dict[str, object]) -> None:
        for target in local:
            target(event)

    predicate = LogLevelFilterPredicate(defaultLogLevel=level_for(logging.minimum_severity))
    local_out = FilteringLogObserver(local_fan_out, [predicate])
    return FilteringLogObserver(fan_out, [predicate])
