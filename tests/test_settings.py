"""The settings file: defaults written on first run, OllamaFlow 1.2 keys, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ollamaflow.settings import (
    DEFAULT_ADMIN_TOKEN,
    DEFAULT_MAX_CONNECTIONS,
    DatabaseDriver,
    SettingsError,
    load_settings,
)


def test_missing_file_is_written_with_1_2_defaults(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "ollamaflow.json"
    loaded = load_settings(path)
    assert loaded.created
    written = json.loads(path.read_text())
    assert written["Webserver"] == {"Hostname": "*", "Port": 43411, "MaxConnections": 4096}
    assert written["DatabaseFilename"] == "ollamaflow.db"
    assert written["Database"] == {"Driver": "sqlite", "PoolSize": 4, "ReloadIntervalMs": 5000}
    assert written["AdminBearerTokens"] == ["ollamaflowadmin"]
    assert written["StickyHeaders"] == ["x-conversation-id", "x-thread-id"]
    assert written["Logging"]["ConsoleLogging"] is True
    assert written["Logging"]["MinimumSeverity"] == 1
    assert written["Logging"]["Format"] == "auto"
    assert written["Metrics"] == {"Enabled": True}  # BearerToken null: /metrics is open
    assert written["HealthCheckIntervalMs"] == 5000
    assert written["ModelRefreshIntervalMs"] == 30000
    assert written["MaxConcurrentPulls"] == 3
    again = load_settings(path)
    assert not again.created
    assert again.settings == loaded.settings


def test_relative_database_path_is_relative_to_the_settings_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    path = tmp_path / "etc" / "ollamaflow.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"DatabaseFilename": "./data/flow.db"}))
    loaded = load_settings(path)
    assert loaded.database_path == tmp_path / "etc" / "data" / "flow.db"


def test_keys_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "webserver": {"port": 8080, "MAXCONNECTIONS": 10},
                "ADMINBEARERTOKENS": ["secret-1"],
            }
        )
    )
    loaded = load_settings(path)
    assert loaded.settings.webserver.port == 8080
    assert loaded.settings.webserver.max_connections == 10
    assert loaded.settings.admin_bearer_tokens == ("secret-1",)
    assert loaded.warnings == ()


def test_unknown_keys_are_ignored_with_a_warning_naming_them(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps({"AdminBearerTokens": ["t0ken"], "Colour": "blue", "Webserver": {"Ssl": False}})
    )
    warnings = load_settings(path).warnings
    assert "unknown setting Colour ignored" in warnings
    assert "unknown setting Webserver.Ssl ignored" in warnings


def test_syslog_servers_are_used_not_warned_about(tmp_path: Path) -> None:
    """Logging.Servers is forwarded to (ollamaflow.syslog), so no longer 'not supported'."""
    path = tmp_path / "s.json"
    servers = [{"Hostname": "logs.example", "Port": 5514}, {"Hostname": "127.0.0.1"}]
    path.write_text(json.dumps({"AdminBearerTokens": ["t0ken"], "Logging": {"Servers": servers}}))
    loaded = load_settings(path)
    assert [(s.hostname, s.port) for s in loaded.settings.logging.servers] == [
        ("logs.example", 5514),
        ("127.0.0.1", 514),
    ]
    assert loaded.warnings == ()


def test_default_admin_token_warns_at_every_start(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    for _ in range(2):
        warnings = load_settings(path).warnings
        assert any(DEFAULT_ADMIN_TOKEN in w for w in warnings)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"Webserver": {"Port": 70000}},
            "Webserver.Port: 70000 is not allowed; expected an integer from 0 to 65535",
        ),
        ({"Webserver": {"Port": "80"}}, 'Webserver.Port: "80" is not allowed'),
        (
            {"Webserver": {"MaxConnections": 0}},
            "Webserver.MaxConnections: 0 is not allowed; expected an integer from 1 to 500000",
        ),
        (
            {"Webserver": {"MaxConnections": 500_001}},
            "Webserver.MaxConnections: 500001 is not allowed; expected an integer from 1 to 500000",
        ),
        (
            {"Webserver": {"MaxConnections": "4096"}},
            'Webserver.MaxConnections: "4096" is not allowed; expected an integer from 1 to 500000',
        ),
        ({"Webserver": {"MaxConnections": True}}, "Webserver.MaxConnections: true is not allowed"),
        ({"Webserver": {"MaxConnections": 10.5}}, "Webserver.MaxConnections: 10.5 is not allowed"),
        ({"Logging": {"MinimumSeverity": -1}}, "Logging.MinimumSeverity: -1 is not allowed"),
        (
            {"Logging": {"Format": "xml"}},
            'Logging.Format: "xml" is not allowed; expected one of auto, text, json',
        ),
        ({"Metrics": {"BearerToken": "has space"}}, "Metrics.BearerToken:"),
        ({"HealthCheckIntervalMs": -5000}, "HealthCheckIntervalMs: -5000 is not allowed"),
        ({"StickyHeaders": "x-id"}, 'StickyHeaders: "x-id" is not allowed; expected an array'),
        ({"AdminBearerTokens": ["has space"]}, "AdminBearerTokens[0]:"),
        ({"Webserver": []}, "Webserver: [] is not allowed; expected a JSON object"),
        (
            {"Database": {"Driver": "mysql"}},
            'Database.Driver: "mysql" is not allowed; expected one of sqlite, postgresql',
        ),
        ({"Database": {"Url": "mysql://x"}}, "Database.Url: "),
        ({"Database": {"Port": 0}}, "Database.Port: 0 is not allowed"),
        ({"Database": {"PoolSize": 0}}, "Database.PoolSize: 0 is not allowed"),
        ({"Database": {"PasswordEnv": "1 BAD"}}, "expected an environment variable name"),
        (
            {"Database": {"Url": "postgresql://db/flow", "Hostname": "db", "User": "u"}},
            "Database: set either Url or Hostname/User, not both",
        ),
        (
            {"Database": {"Password": "a", "PasswordEnv": "B"}},
            "Database: set either Password or PasswordEnv, not both",
        ),
        (
            {"Database": {"Driver": "postgresql", "PasswordEnv": "OLLAMAFLOW_UNSET_VARIABLE"}},
            "Database.PasswordEnv: the environment variable OLLAMAFLOW_UNSET_VARIABLE is not set",
        ),
        ({"Cors": []}, "Cors: [] is not allowed; expected a JSON object"),
        ({"Cors": {"AllowedOrigins": "*"}}, 'Cors.AllowedOrigins: "*" is not allowed'),
        (
            {"Cors": {"AllowedOrigins": ["https://app.example/"]}},
            'Cors.AllowedOrigins[0]: "https://app.example/" is not allowed; expected an origin',
        ),
        ({"Cors": {"AllowedOrigins": ["app.example"]}}, "Cors.AllowedOrigins[0]:"),
        ({"Cors": {"AllowedOrigins": ["https://a.example, https://b.example"]}}, "[0]:"),
        ({"Cors": {"AdminAllowedOrigins": ["https://ui example"]}}, "AdminAllowedOrigins[0]:"),
        ({"Cors": {"AdminAllowedOrigins": [""]}}, "Cors.AdminAllowedOrigins[0]:"),
        ({"Cors": {"AdminAllowedOrigins": [7]}}, "Cors.AdminAllowedOrigins[0]: 7"),
        ({"Cors": {"AllowedOrigins": ["*", "*"]}}, "distinct strings"),
        (
            {"Cors": {"AllowedOrigins": ["https://" + "a" * 600]}},
            "Cors.AllowedOrigins[0]: ",
        ),
        (
            {"Cors": {"AllowedOrigins": [f"https://h{i}.example" for i in range(257)]}},
            "Cors.AllowedOrigins: ",
        ),
        ({"RateLimits": {"Redis": "rediss://cache:6380"}}, "RateLimits.Redis: "),
        ({"RateLimits": {"Redis": "redis://cache:99999"}}, "RateLimits.Redis: Port out of range"),
        ({"RateLimits": {"Redis": "redis://cache/x"}}, "RateLimits.Redis: a Redis URL's path"),
        ({"RateLimits": {"UsageFlushIntervalMs": 0}}, "RateLimits.UsageFlushIntervalMs: 0"),
        ({"Placement": {"HotKeepAlive": "30 minutes"}}, 'Placement.HotKeepAlive: "30 minutes"'),
        ({"Placement": {"HotKeepAlive": "9" * 100}}, "Placement.HotKeepAlive: "),
        ({"Placement": {"MaxConcurrentPreloads": 65}}, "Placement.MaxConcurrentPreloads: 65"),
        ({"Placement": {"EvictQueueDepth": 0}}, "Placement.EvictQueueDepth: 0"),
        ({"Placement": {"Conversations": -1}}, "Placement.Conversations: -1"),
    ],
)
def test_bad_values_stop_with_one_line_naming_key_value_and_allowed(
    tmp_path: Path, data: dict[str, object], expected: str
) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message
    assert len(message) < 1000, "a long value is cut short in the message"


def test_placement_settings_take_ollamas_durations(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    assert load_settings(path).settings.placement.hot_keep_alive == "30m"
    for value in ("1h30m", "90s", "-1", "2.5h"):
        path.write_text(json.dumps({"Placement": {"HotKeepAlive": value}}))
        assert load_settings(path).settings.placement.hot_keep_alive == value


def test_max_connections_bounds_are_accepted(tmp_path: Path) -> None:
    """One connection up to 500,000 (a million open files, the most a process is given)."""
    path = tmp_path / "s.json"
    assert load_settings(path).settings.webserver.max_connections == DEFAULT_MAX_CONNECTIONS
    for value in (1, 500_000, 2000.0):
        path.write_text(json.dumps({"Webserver": {"MaxConnections": value}}))
        assert load_settings(path).settings.webserver.max_connections == value


def test_a_file_that_is_not_json_stops_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("{ Webserver: ")
    with pytest.raises(SettingsError, match="not valid JSON") as caught:
        load_settings(path)
    assert "\n" not in str(caught.value)


def test_the_top_level_must_be_an_object(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("[1]")
    with pytest.raises(SettingsError, match="expected a JSON object"):
        load_settings(path)


def test_postgresql_from_fields_with_the_password_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.json"
    database = {"Driver": "PostgreSQL", "Hostname": "db.lan", "PasswordEnv": "FLOW_DB_PW"}
    path.write_text(json.dumps({"AdminBearerTokens": ["t0ken"], "Database": database}))
    monkeypatch.setenv("FLOW_DB_PW", "pa ss")
    loaded = load_settings(path)
    assert loaded.database_driver is DatabaseDriver.POSTGRESQL
    assert loaded.postgresql_params() == {
        "host": "db.lan",
        "port": 5432,
        "dbname": "ollamaflow",
        "user": "ollamaflow",
        "password": "pa ss",
    }
    assert "pa ss" not in repr(loaded) and loaded.warnings == ()


def test_postgresql_from_a_url_keeps_the_password_out_of_repr(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    url = "postgresql://flow:hunter2@db.lan:6432/config"
    path.write_text(json.dumps({"Database": {"Driver": "postgresql", "Url": url}}))
    loaded = load_settings(path)
    assert loaded.postgresql_params() == {"password": None}
    assert loaded.settings.database.url == url
    assert "hunter2" not in repr(loaded.settings)


def test_postgresql_keys_with_the_sqlite_driver_are_named_in_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"Database": {"Url": "postgresql://db/x", "Password": "p"}}))
    warnings = load_settings(path).warnings
    assert (
        "Database.Url, Database.Password ignored: Database.Driver is sqlite"
        " (DatabaseFilename is used)"
    ) in warnings


# -- Cors ----------------------------------------------------------------------------------------


def test_cors_defaults_keep_old_files_working_and_are_written(tmp_path: Path) -> None:
    """No ``Cors`` section: the clients get Ollama's origins only, the admin API any (1.2)."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"AdminBearerTokens": ["t0ken"]}))
    cors = load_settings(path).settings.cors
    assert cors.allowed_origins == () and cors.admin_allowed_origins == ("*",)
    written = json.loads(load_settings(tmp_path / "new.json").path.read_text())
    assert written["Cors"] == {"AllowedOrigins": [], "AdminAllowedOrigins": ["*"]}


def test_cors_origins_are_read_in_any_case_with_stars_null_and_ports(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    origins = ["https://app.example", "https://*.corp.example", "http://[::1]:8080", "null"]
    data = {"cors": {"allowedorigins": origins, "AdminAllowedOrigins": []}}
    path.write_text(json.dumps(data))
    cors = load_settings(path).settings.cors
    assert cors.allowed_origins == tuple(origins)
    assert cors.admin_allowed_origins == ()
