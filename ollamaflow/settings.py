"""The settings file, ``ollamaflow.json``: read, validated, and written with defaults if absent.

Keys and defaults follow OllamaFlow 1.2 so an existing file keeps working; frontends and
backends live in the database, not here.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Any

import attrs

from ollamaflow.cors import MAX_ORIGIN, ORIGIN_ENTRY
from ollamaflow.fielderrors import FieldError
from ollamaflow.fieldkinds import Bool, Choice, Int, Str, StrList
from ollamaflow.jsonfields import Nested, ObjectList, field, from_wire, to_wire
from ollamaflow.ratelimits.redisclient import RedisAddress

DEFAULT_ADMIN_TOKEN = "ollamaflowadmin"

_HOST = Str(allowed="a host name, an address, or '*' for all interfaces", pattern=r"\S+")
_PATH = Str(allowed="a file or folder path", pattern=r"(?s).+")
_TOKEN = Str(allowed="a token without spaces", pattern=r"\S+")
_HEADER = Str(allowed="an HTTP header name", pattern=r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PG_URL = Str(
    allowed="a postgresql:// or postgres:// URL", pattern=r"postgres(ql)?://\S*", max_length=2048
)
_PG_HOST = Str(allowed="a host name or address", pattern=r"[^\s*]+", max_length=256)
_PG_NAME = Str(allowed="a name without spaces", pattern=r"\S+", max_length=256)
_PASSWORD = Str(allowed="a string", pattern=r"(?s).*")
_REDIS_URL = Str(
    allowed="a redis://[user:password@]host[:port][/db] URL",
    pattern=r"redis://\S+",
    max_length=2048,
)
_ENV_NAME = Str(allowed="an environment variable name", pattern=r"[A-Za-z_][A-Za-z0-9_]*")

#: Where the fields of ``Database`` point when ``Url`` does not say otherwise.
POSTGRESQL_DEFAULTS: dict[str, object] = {
    "host": "localhost",
    "port": 5432,
    "dbname": "ollamaflow",
    "user": "ollamaflow",
}


#: Client connections one process holds at once: twice the 2,000 streams the benchmark holds,
#: and the open files they need (two sockets each and a margin, ``tap.files_needed``: 8,704)
#: fit under every usual hard limit: systemd's 524,288, the unit's 65,536, Docker's, macOS's
#: 10,240. About 200 MB of memory at the cap, by the benchmark's 45 KB a stream.
DEFAULT_MAX_CONNECTIONS = 4096
#: Under half of the 1,048,576 open files a process is usually allowed at most.
MAX_MAX_CONNECTIONS = 500_000


@attrs.frozen
class Webserver:
    hostname: str = field(_HOST, default="*")
    port: int = field(Int(0, 65535), default=43411)
    #: Client connections open at once, per process; more are answered 503 and closed.
    max_connections: int = field(Int(1, MAX_MAX_CONNECTIONS), default=DEFAULT_MAX_CONNECTIONS)


@attrs.frozen
class SyslogServer:
    hostname: str = field(_HOST, default="127.0.0.1")
    port: int = field(Int(1, 65535), default=514)


class LogFormat(Enum):
    """How log lines are written: ``auto`` is text on a terminal, JSON lines otherwise."""

    AUTO = "auto"
    TEXT = "text"
    JSON = "json"


@attrs.frozen
class Logging:
    """Where log lines go and how many: severity 0 (debug) to 7, as in OllamaFlow 1.2."""

    servers: tuple[SyslogServer, ...] = field(ObjectList(SyslogServer), default=())
    log_directory: str = field(_PATH, default="./logs/")
    log_filename: str | None = field(_PATH, default=None)
    console_logging: bool = field(Bool(), default=True)
    enable_colors: bool = field(Bool(), default=False)
    minimum_severity: int = field(Int(0, 7), default=1)
    format: LogFormat = field(Choice(LogFormat), default=LogFormat.AUTO)


def _secret(kind: Str) -> Any:
    """An optional wire field left out of ``repr``, so logging the settings leaks no password."""
    return attrs.field(default=None, repr=False, metadata=field(kind, default=None).metadata)


@attrs.frozen
class Metrics:
    """``GET /metrics`` (Prometheus text format); open unless ``BearerToken`` is set."""

    enabled: bool = field(Bool(), default=True)
    # Kept out of repr: logging the settings must not show it.
    bearer_token: str | None = _secret(_TOKEN)


class DatabaseDriver(Enum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


@attrs.frozen
class Database:
    """Where frontends and backends live: the SQLite file ``DatabaseFilename`` (one host), or a
    PostgreSQL database that several instances share. Either ``Url`` or the separate fields;
    the password may instead come from the environment variable named by ``PasswordEnv``."""

    driver: DatabaseDriver = field(Choice(DatabaseDriver), default=DatabaseDriver.SQLITE)
    # Url and Password are kept out of repr: they may hold the password.
    url: str | None = _secret(_PG_URL)
    hostname: str | None = field(_PG_HOST, default=None)
    port: int | None = field(Int(1, 65535), default=None)
    name: str | None = field(_PG_NAME, default=None)
    user: str | None = field(_PG_NAME, default=None)
    password: str | None = _secret(_PASSWORD)
    password_env: str | None = field(_ENV_NAME, default=None)
    #: PostgreSQL connections (and threads) for this instance's reads and writes.
    pool_size: int = field(Int(1, 64), default=4)
    #: How often to compare the database's generation with ours: the safety net behind
    #: LISTEN/NOTIFY, and the only way to notice other processes' changes on SQLite.
    reload_interval_ms: int = field(Int(100, 3_600_000), default=5000)

    @property
    def fields_given(self) -> list[str]:
        """The connection fields set besides ``Url`` (they must not be mixed with it)."""
        values: dict[str, object] = {
            "Hostname": self.hostname,
            "Port": self.port,
            "Name": self.name,
            "User": self.user,
        }
        return [key for key, value in values.items() if value is not None]


_ORIGIN = Str(
    allowed="an origin (scheme://host or scheme://host:port, '*' matching any characters), "
    "'null', or '*' for any origin",
    pattern=ORIGIN_ENTRY,
    max_length=MAX_ORIGIN,
)
#: Entries in each origin list of ``Cors``.
MAX_ORIGINS = 256


@attrs.frozen
class Cors:
    """Which web pages' scripts may call OllamaFlow (browsers say so in ``Origin``): client
    traffic from Ollama's default origins (``OLLAMA_ORIGINS``: localhost, 127.0.0.1, 0.0.0.0,
    app://, file://, tauri://, vscode-webview://) plus ``AllowedOrigins``; the admin API from
    ``AdminAllowedOrigins``, any origin by default as in OllamaFlow 1.2."""

    allowed_origins: tuple[str, ...] = field(
        StrList(item=_ORIGIN, max_items=MAX_ORIGINS), default=()
    )
    admin_allowed_origins: tuple[str, ...] = field(
        StrList(item=_ORIGIN, max_items=MAX_ORIGINS), default=("*",)
    )


@attrs.frozen
class RateLimits:
    """Where API keys' limits are counted: with ``Redis`` (a ``redis://`` URL) by every
    instance together, so N instances enforce one limit; without it, by each instance alone.
    If Redis cannot be reached, requests keep flowing under each instance's own counts."""

    # Kept out of repr: the URL may hold a password.
    redis: str | None = _secret(_REDIS_URL)
    #: How often in-memory usage counts are written to the database.
    usage_flush_interval_ms: int = field(Int(1000, 3_600_000), default=10_000)


#: A Go duration as Ollama's ``keep_alive`` takes it (``30m``, ``1h30m``, ``-1`` forever).
_KEEP_ALIVE = Str(
    allowed="a duration such as '30m', '2h' or '-1' (forever)",
    pattern=r"-1|(\d+(\.\d+)?(ns|us|ms|s|m|h))+",
    max_length=32,
)


@attrs.frozen
class Placement:
    """How ``ModelAware`` frontends place models: preloads onto free VRAM while a model's
    copies are busy or its requests wait, another copy in place of an idle one of a model with
    less demand once the queue is long, models in demand kept loaded, and conversations kept
    where their prompt is cached."""

    #: Preloads (an empty generate request) running at once over the fleet, one per backend;
    #: 0: none (each model then keeps the copies its first requests loaded).
    max_concurrent_preloads: int = field(Int(0, 64), default=8)
    #: Requests waiting for a model that start a preload onto a backend with free VRAM.
    preload_queue_depth: int = field(Int(1, 1_000_000), default=1)
    #: Requests waiting for a model that let a preload replace an idle copy of another model.
    evict_queue_depth: int = field(Int(1, 1_000_000), default=2)
    #: The ``keep_alive`` a request for a model in demand is sent with, unless it has one.
    hot_keep_alive: str = field(_KEEP_ALIVE, default="30m")
    #: Conversations remembered (digests of their messages, not the text).
    conversations: int = field(Int(0, 10_000_000), default=100_000)


@attrs.frozen
class Settings:
    webserver: Webserver = field(Nested(Webserver), factory=Webserver)
    database_filename: str = field(_PATH, default="ollamaflow.db")
    database: Database = field(Nested(Database), factory=Database)
    admin_bearer_tokens: tuple[str, ...] = field(
        StrList(item=_TOKEN), default=(DEFAULT_ADMIN_TOKEN,)
    )
    sticky_headers: tuple[str, ...] = field(
        StrList(item=_HEADER), default=("x-conversation-id", "x-thread-id")
    )
    logging: Logging = field(Nested(Logging), factory=Logging)
    metrics: Metrics = field(Nested(Metrics), factory=Metrics)
    cors: Cors = field(Nested(Cors), factory=Cors)
    rate_limits: RateLimits = field(Nested(RateLimits), factory=RateLimits)
    placement: Placement = field(Nested(Placement), factory=Placement)
    health_check_interval_ms: int = field(Int(100, 86_400_000), default=5000)
    health_check_timeout_ms: int = field(Int(100, 600_000), default=3000)
    model_refresh_interval_ms: int = field(Int(1000, 86_400_000), default=30000)
    max_concurrent_pulls: int = field(Int(1, 64), default=3)
    pull_idle_timeout_ms: int = field(Int(1000, 86_400_000), default=600_000)
    #: Daemon processes sharing the port (SO_REUSEPORT), for more than one core.
    workers: int = field(Int(1, 64), default=1)
    #: On SIGTERM: how long requests in flight may take to finish before they are cut off.
    drain_timeout_ms: int = field(Int(0, 3_600_000), default=30000)


class SettingsError(Exception):
    """The settings file cannot be used; the message is one line for the operator."""


@attrs.frozen
class LoadedSettings:
    """Settings plus what the operator should hear about them, and paths made absolute."""

    settings: Settings
    path: Path
    created: bool
    warnings: tuple[str, ...]
    #: ``Database.Password``, or the value of the variable ``Database.PasswordEnv`` names.
    database_password: str | None = attrs.field(default=None, repr=False)

    def resolve(self, relative: str) -> Path:
        """A path from the settings, relative to the settings file's folder."""
        return (self.path.parent / os.path.expanduser(relative)).resolve()

    @property
    def database_path(self) -> Path:
        return self.resolve(self.settings.database_filename)

    @property
    def database_driver(self) -> DatabaseDriver:
        return self.settings.database.driver

    def postgresql_params(self) -> dict[str, object]:
        """libpq fields (``host``, ``port``, ``dbname``, ``user``, ``password``) to go with
        ``Database.Url`` in :func:`ollamaflow.store.postgresql_conninfo`; ``None`` = unset.

        Without a Url the fields default to :data:`POSTGRESQL_DEFAULTS`; with one, the Url says.
        """
        db = self.settings.database
        params: dict[str, object] = {}
        if db.url is None:
            params = {
                "host": db.hostname or POSTGRESQL_DEFAULTS["host"],
                "port": db.port or POSTGRESQL_DEFAULTS["port"],
                "dbname": db.name or POSTGRESQL_DEFAULTS["dbname"],
                "user": db.user or POSTGRESQL_DEFAULTS["user"],
            }
        params["password"] = self.database_password
        return params

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
    password = _database_password(path, settings.database)
    _check_redis(path, settings.rate_limits)
    warnings = tuple(_warnings(settings, unknown))
    return LoadedSettings(settings, path, created, warnings, password)


def _database_password(path: Path, db: Database) -> str | None:
    """Check what one key alone cannot, and read the password from the environment if asked."""
    if db.url is not None and db.fields_given:
        raise SettingsError(
            f"{path}: Database: set either Url or {'/'.join(db.fields_given)}, not both"
        )
    if db.password is not None and db.password_env is not None:
        raise SettingsError(f"{path}: Database: set either Password or PasswordEnv, not both")
    if db.password_env is None:
        return db.password
    value = os.environ.get(db.password_env)
    if value is None and db.driver is DatabaseDriver.POSTGRESQL:
        raise SettingsError(
            f"{path}: Database.PasswordEnv: the environment variable {db.password_env} is not set"
        )
    return value


def _check_redis(path: Path, limits: RateLimits) -> None:
    """What the URL's pattern cannot say: a port in range, a database number (without the
    password in the message)."""
    if limits.redis is None:
        return
    try:
        RedisAddress.from_url(limits.redis)
    except ValueError as e:
        raise SettingsError(f"{path}: RateLimits.Redis: {e}") from None


def _warnings(settings: Settings, unknown: list[str]) -> list[str]:
    out = [f"unknown setting {key} ignored" for key in unknown]
    if DEFAULT_ADMIN_TOKEN in settings.admin_bearer_tokens:
        out.append(
            f"AdminBearerTokens contains the default token {DEFAULT_ADMIN_TOKEN!r}: "
            "anyone who knows it can reconfigure this daemon; replace it"
        )
    if not settings.admin_bearer_tokens:
        out.append("AdminBearerTokens is empty: the admin API will refuse every request")
    db = settings.database
    if db.driver is DatabaseDriver.SQLITE:
        ignored = (["Url"] if db.url is not None else []) + db.fields_given
        secrets = (("Password", db.password), ("PasswordEnv", db.password_env))
        ignored += [key for key, value in secrets if value is not None]
        if ignored:
            out.append(
                f"Database.{', Database.'.join(ignored)} ignored: Database.Driver is sqlite "
                "(DatabaseFilename is used)"
            )
    return out
