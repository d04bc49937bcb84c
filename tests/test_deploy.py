"""Deployment files agree with the code: ports, paths, commands and volumes.

No Docker engine or systemd runs here, so these parse the files and check them against the
settings defaults and the twistd options they invoke.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.python import usage

from ollamaflow.settings import Settings, load_settings
from ollamaflow.sim.tap import Options as SimOptions
from ollamaflow.tap import Options

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = Settings().webserver.port


def dockerfile() -> dict[str, list[str]]:
    instructions: dict[str, list[str]] = {}
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.setdefault(keyword.upper(), []).append(rest.strip())
    return instructions


def twistd_args(argv: list[str], plugin: str) -> list[str]:
    """The arguments after the plugin name in a ``twistd ... <plugin> ...`` command line."""
    assert argv[0].endswith("twistd"), argv
    assert "-n" in argv, "runs in the foreground under a supervisor"
    assert "--pidfile=" in argv, "no pidfile needed in the foreground"
    return argv[argv.index(plugin) + 1 :]


def parse_plugin(options: usage.Options, args: list[str]) -> usage.Options:
    options.parseOptions(args)
    return options


def test_dockerfile_runs_the_daemon_on_the_data_volume() -> None:
    d = dockerfile()
    assert d["FROM"][0].startswith("python:3.11-slim")
    assert d["EXPOSE"] == [str(DEFAULT_PORT)]
    assert d["VOLUME"] == ['["/data"]']
    assert any(u.strip() == "ollamaflow" for u in d["USER"]), "runs as a non-root user"
    assert any("getPlugins" in r for r in d["RUN"]), "the plugin cache is regenerated"
    command = json.loads(d["CMD"][0])
    args = twistd_args(command, "ollamaflow")
    options = parse_plugin(Options(), args)
    assert options["config"] == "/data/ollamaflow.json"
    assert f"127.0.0.1:{DEFAULT_PORT}/" in d["HEALTHCHECK"][0]


@pytest.mark.parametrize("name", ["compose-ollama.yaml", "compose-sim.yaml"])
def test_compose_files_agree_with_the_image_and_the_settings(name: str) -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker" / name).read_text())
    services = compose["services"]
    flow = services["ollamaflow"]
    assert flow["ports"] == [f"{DEFAULT_PORT}:{DEFAULT_PORT}"]
    args = twistd_args(flow["command"], "ollamaflow")
    config = parse_plugin(Options(), args)["config"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in flow["volumes"]}
    assert mounts["/data"] in compose["volumes"], "state in a named volume"
    settings_file = ROOT / "docker" / mounts[config]
    loaded = load_settings(settings_file)
    assert loaded.settings.webserver.port == DEFAULT_PORT
    assert loaded.settings.webserver.hostname == "*", "listens on the container's interfaces"
    assert str(loaded.database_path).startswith("/data/"), "the database is on the volume"

    seed = services["seed"]
    env = seed["environment"]
    assert env["TOKEN"] in loaded.settings.admin_bearer_tokens
    assert env["OLLAMAFLOW"] == f"http://ollamaflow:{DEFAULT_PORT}"
    assert seed["depends_on"]["ollamaflow"]["condition"] == "service_healthy"
    json.loads(env["REQUIRED_MODELS"])
    for backend in env["BACKENDS"].split():
        assert backend in services, f"the seed names a service that exists: {backend}"
        backend_service = services[backend]
        command = backend_service.get("command")
        if command:
            sim = parse_plugin(SimOptions(), twistd_args(command, "ollamaflow-sim"))
            assert str(sim["port"]) == env["BACKEND_PORT"]
            assert sim["interface"] == "0.0.0.0"
        else:
            assert backend_service["environment"]["OLLAMA_HOST"].endswith(env["BACKEND_PORT"])
    seed_script = (ROOT / "docker" / "seed.sh").read_text()
    for route in re.findall(r'"\$OLLAMAFLOW(/v1\.0/[a-z]+)', seed_script):
        assert route in ("/v1.0/backends", "/v1.0/frontends")


def test_the_gpu_compose_file_reserves_gpus_and_keeps_models_in_volumes() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose-ollama.yaml").read_text())
    for name in ("ollama1", "ollama2", "ollama3"):
        service = compose["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        volume, _, path = service["volumes"][0].partition(":")
        assert path == "/root/.ollama" and volume in compose["volumes"]


def test_systemd_unit_is_hardened_and_runs_the_daemon_in_the_foreground() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "ollamaflow.service")
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["Restart"] == "on-failure"
    assert service["LimitNOFILE"] == "65536"
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    assert service["User"] == "ollamaflow"
    argv = shlex.split(service["ExecStart"])
    options = parse_plugin(Options(), twistd_args(argv, "ollamaflow"))
    assert options["config"] == "/etc/ollamaflow/ollamaflow.json"
    writable = service["ReadWritePaths"].split()
    loaded = load_settings(ROOT / "deploy" / "ollamaflow.json")
    assert any(str(loaded.database_path).startswith(p + "/") for p in writable), (
        "the database lives where the unit may write"
    )
    assert service["WorkingDirectory"] in writable
