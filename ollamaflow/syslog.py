"""Syslog forwarding (``Logging.Servers``): each log line as one RFC 5424 message in a UDP
datagram (RFC 5426) to every configured server.

Host names are resolved once, at start-up, before the reactor runs; sending is one
non-blocking ``sendto`` per server, and a datagram that cannot be sent is dropped: forwarding
never raises into logging, never blocks, and never logs (which would recurse).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
from twisted.logger import LogLevel

from ollamaflow.settings import SyslogServer

#: The facility of every message: 1, user-level messages (as Python's SysLogHandler sends).
FACILITY = 1
APP_NAME = "ollamaflow"
#: The most bytes one datagram holds, header included: the size RFC 5424 (§6.1) says every
#: receiver should accept. A longer message is cut there, ending with a marker.
MAX_DATAGRAM_BYTES = 2048
#: Our levels as syslog severities (RFC 5424 §6.2.1).
SEVERITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}
_BOM = b"\xef\xbb\xbf"
_CUT = "...[{} more bytes]"
#: A field of the header: 1 to 255 printable US-ASCII characters (RFC 5424 §6.2.4).
_PRINTABLE = frozenset(range(33, 127))

GetAddrInfo = Callable[..., Sequence[tuple[Any, ...]]]


def severity(level: object) -> int:
    """The syslog severity of a twisted.logger level; an event without one is informational."""
    try:
        return SEVERITIES.get(level, 6)
    except TypeError:  # not hashable, so not a level
        return 6


def header_field(text: str, limit: int = 255) -> str:
    """``text`` fit for a header field: printable US-ASCII (others become ``_``), at most
    ``limit`` characters, ``-`` (nil) when empty."""
    fit = "".join(c if ord(c) in _PRINTABLE else "_" for c in text[:limit])
    return fit or "-"


def utc_timestamp(seconds: float) -> str:
    """``2024-05-01T12:00:00.123Z``: RFC 3339 in UTC, to the millisecond."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def datagram(
    level: object, seconds: float, hostname: str, procid: int, text: str, facility: int = FACILITY
) -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID - - MSG``, at most
    :data:`MAX_DATAGRAM_BYTES` bytes. MSG is UTF-8, after a BOM when it is not plain ASCII."""
    pri = facility * 8 + severity(level)
    head = f"<{pri}>1 {utc_timestamp(seconds)} {hostname} {APP_NAME} {procid} - - ".encode()
    body = text.encode("utf-8", "backslashreplace")
    if not body.isascii():
        head += _BOM
    room = MAX_DATAGRAM_BYTES - len(head)
    if len(body) <= room:
        return head + body
    # Cut on a character boundary, leaving room for the marker (its longest case).
    kept = body[: room - len(_CUT.format(len(body)))].decode("utf-8", "ignore").encode()
    return head + kept + _CUT.format(len(body) - len(kept)).encode()


@attrs.frozen
class Destination:
    """A syslog server as configured, and the address it resolved to."""

    server: SyslogServer
    family: int
    address: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.server.hostname}:{self.server.port}"


def resolve(
    servers: Iterable[SyslogServer], getaddrinfo: GetAddrInfo = socket.getaddrinfo
) -> tuple[list[Destination], list[str]]:
    """The servers' addresses (the first each name resolves to), and a problem for each one
    that does not resolve. Blocking: at start-up only."""
    found: list[Destination] = []
    problems: list[str] = []
    for server in servers:
        if server.hostname == "*":  # a listening wildcard (Webserver's), no place to send to
            problems.append("'*' is not a syslog server's address")
            continue
        try:
            infos = getaddrinfo(server.hostname, server.port, 0, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as e:
            problems.append(f"cannot resolve {server.hostname}: {e}")
            continue
        usable = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
        if not usable:
            problems.append(f"{server.hostname} has no IPv4 or IPv6 address")
            continue
        found.append(Destination(server, usable[0][0], usable[0][4]))
    return found, problems


@attrs.define(eq=False)
class SyslogSender:
    """Datagrams to every destination, from one non-blocking UDP socket per address family.

    ``on_error`` hears of a destination's first failed send (once: a server that is gone must
    not fill the other logs); later failures are only counted in ``dropped``.
    """

    destinations: list[Destination]
    on_error: Callable[[Destination, OSError], None] = lambda _d, _e: None
    dropped: int = 0
    _sockets: dict[int, socket.socket] = attrs.field(factory=dict)
    _failed: set[int] = attrs.field(factory=set)

    @classmethod
    def open(
        cls,
        servers: Iterable[SyslogServer],
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
    ) -> tuple[SyslogSender, list[str]]:
        """A sender to the servers that resolve, and what went wrong with the others."""
        destinations, problems = resolve(servers, getaddrinfo)
        sockets: dict[int, socket.socket] = {}
        for family in {d.family for d in destinations}:
            sockets[family] = socket.socket(family, socket.SOCK_DGRAM)
            sockets[family].setblocking(False)
        return cls(destinations, sockets=sockets), problems

    def send(self, data: bytes) -> None:
        """``data`` to every destination now; never raises, never blocks."""
        for i, destination in enumerate(self.destinations):
            try:
                self._sockets[destination.family].sendto(data, destination.address)
            except OSError as e:  # a full buffer, an unreachable network, a closed socket
                self.dropped += 1
                if i not in self._failed:
                    self._failed.add(i)
                    with contextlib.suppress(Exception):
                        self.on_error(destination, e)

    def close(self) -> None:
        """Close the sockets; later lines go nowhere."""
        self.destinations = []
        for sock in self._sockets.values():
            sock.close()
