"""The settings file, ``ollamaflow.json``: read, validated, and written with defaults if absent.

Keys and defaults follow OllamaFlow 1.2 so an existing file keeps working; frontends and
backends live in the database, not here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

from ollamaflow.wire import (
    Bool,
    FieldError,
    Int,
    Nested,
    ObjectList,
    Str,
    StrList,
    field,
    from_wire,
    to_wire,
)

DEFAULT_ADMIN_TOKEN = "ollamaflowadmin"

_HOST = Str(allowed="a host name, an address, or '*' for all interfaces", pattern=r"\S+")
_PATH = Str(allowed="a file or folder path", pattern=r"(?s).+")
_TOKEN = Str(allowed="a token without spaces", pattern=r"\S+")
_HEADER = Str(allowed="an HTTP header name", pattern=r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@attrs.frozen
class Webserver:
    hostname: str = field(_HOST, default="*")
    port: int = field(Int(0, 65535), default=43411)


@attrs.frozen
class SyslogServer:
    hostname: str = field(_HOST, default="127.0.0.1")
    port: int = field(Int(1, 65535), default=514)


@attrs.frozen
class Logging:
    """Where log lines go and how many: severity 0 (debug) to 7, as in OllamaFlow 1.2."""

    servers: tuple[SyslogServer, ...] = field(ObjectList(SyslogServer), default=())
    log_directory: str = field(_PATH, default="./logs/")
    log_filename: str | None = field(_PATH, default=None)
    console_logging: bool = field(Bool(), default=True)
    enable_colors: bool = field(Bool(), default=False)
    minimum_severity: int = field(Int(0, 7), default=1)


@attrs.frozen
class Settings:
    webserver: Webserver = field(Nested(Webserver), factory=Webserver)
    database_filename: str = field(_PATH, default="ollamaflow.db")
    admin_bearer_tokens: tuple[str, ...] = field(
        StrList(item=_TOKEN), default=(DEFAULT_ADMIN_TOKEN,)
    )
    sticky_headers: tuple[str, ...] = field(
        StrList(item=_HEADER), default=("x-conversation-id", "x-thread-id")
    )
    logging: Logging = field(Nested(Logging), factory=Logging)
    health_check_interval_ms: int = field(Int(100, 86_400_000), default=5000)
    health_check_timeout_ms: int = field(Int(100, 600_000), default=3000)
    model_refresh_interval_ms: int = field(Int(1000, 86_400_000), default=30000)
    max_concurrent_pulls: int = field(Int(1, 64), default=3)
    pull_idle_timeout_ms: int = field(Int(1000, 86_400_000), default=600_000)


class SettingsError(Exception):
    """The settings file cannot be used; the message is one line for the operator."""


@attrs.frozen
class LoadedSettings:
    """Settings plus what the operator should hear about them, and paths made absolute."""

    settings: Settings
    path: Path
    created: bool
    warnings: tuple[str, ...]

    def resolve(self, relative: str) -> Path:
        """A path from the settings, relative to the settings file's folder."""
        return (self.path.parent / os.path.expanduser(relative)).resolve()

    @property
    def database_path(self) -> Path:
        return self.resolve(self.settings.database_filename)

    @property
    def log_file(self) -> Path | None:
        name = self.settings.logging.log_filename
        if name is None:
            return None
        return self.resolve(os.path.join(self.settings.logging.log_directory, name))


def load_settings(path: Path) -> LoadedSettings:
    """Read (or create with defaults) the settings file; raises SettingsError on any problem.

    Runs at start-up only, before the reactor serves anything, so plain file I/O is fine.
    """
    path = path.absolute()
    created = False
    if not path.exists():
        settings = Settings()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(to_wire(settings), indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise SettingsError(f"{path}: cannot write default settings: {e.strerror}") from e
        created = True
        unknown: list[str] = []
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise SettingsError(f"{path}: cannot read settings: {e.strerror}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SettingsError(f"{path}: not valid JSON: {e}") from e
        try:
            settings, unknown = from_wire(Settings, data)
        except FieldError as e:
            raise SettingsError(f"{path}: {e}") from e
    return LoadedSettings(settings, path, created, tuple(_warnings(settings, unknown)))


def _warnings(settings: Settings, unknown: list[str]) -> list[str]:
    out = [f"unknown setting {key} ignored" for key in unknown]
    if DEFAULT_ADMIN_TOKEN in settings.admin_bearer_tokens:
        out.append(
            f"AdminBearerTokens contains the default token {DEFAULT_ADMIN_TOKEN!r}: "
            "anyone who knows it can reconfigure this daemon; replace it"
        )
    if not settings.admin_bearer_tokens:
        out.append("AdminBearerTokens is empty: the admin API will refuse every request")
    if settings.logging.servers:
        out.append(
            "Logging.Servers: syslog forwarding is not supported; logs go to the console "
            "and Logging.LogFilename"
        )
    return out
