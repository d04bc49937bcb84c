"""nginx for the benchmark: the reference reverse proxy, and a static stand-in Ollama backend.

Each instance gets its own prefix folder (config, pid, error log, temp paths) and runs in the
foreground (``daemon off``) as a child of the run, so nothing touches the system's nginx.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

# Fixed answers of the static backend, shaped like the simulator's (and Ollama's).
_MODEL = {
    "name": "llama3:latest",
    "model": "llama3:latest",
    "modified_at": "2026-01-01T00:00:00Z",
    "size": 4661224676,
    "digest": "365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1",
    "details": {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "8.0B",
        "quantization_level": "Q4_0",
    },
}
STATIC_BODIES = {
    "/api/chat": {
        "model": "llama3",
        "created_at": "2026-01-01T00:00:00Z",
        "message": {
            "role": "assistant",
            "content": "The quick brown fox jumps over the lazy dog while a simulated llama "
            "thinks about load balancing across a fleet",
        },
        "done": True,
        "done_reason": "stop",
        "total_duration": 101804,
        "load_duration": 1,
        "prompt_eval_count": 1,
        "prompt_eval_duration": 715,
        "eval_count": 20,
        "eval_duration": 5960,
    },
    "/api/tags": {"models": [_MODEL]},
    "/api/ps": {"models": []},
    "/api/version": {"version": "0.32.15"},
}


_NOT_FOUND = '{"error":"not found"}'


def find_nginx() -> str | None:
    """Debian installs nginx in /usr/sbin, which is not on every PATH."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def _main_block(prefix: Path, http_body: str) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
worker_rlimit_nofile 20000;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log error;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{http_body}}}
"""


def proxy_config(prefix: Path, listen_port: int, upstream_ports: Sequence[int]) -> str:
    """nginx as the reference reverse proxy: one worker, keep-alive upstream, no buffering."""
    servers = "".join(f"        server 127.0.0.1:{port};\n" for port in upstream_ports)
    return _main_block(
        prefix,
        f"""    upstream backends {{
{servers}        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
""",
    )


def static_config(prefix: Path, ports: Sequence[int]) -> str:
    """A static stand-in Ollama on every port in ``ports``: fixed JSON for the routes we use."""
    listens = "".join(f"        listen 127.0.0.1:{port} backlog=4096;\n" for port in ports)
    locations = "".join(
        f"        location = {path} {{ default_type application/json; "
        f"return 200 '{_nginx_string(body)}'; }}\n"
        for path, body in STATIC_BODIES.items()
    )
    return _main_block(
        prefix,
        f"""    server {{
{listens}        location = / {{ default_type text/plain; return 200 'Ollama is running'; }}
{locations}        location / {{ default_type application/json; return 404 '{_NOT_FOUND}'; }}
    }}
""",
    )


def _nginx_string(body: object) -> str:
    text = json.dumps(body, separators=(",", ":"))
    if "'" in text or "\\" in text or "$" in text:
        raise ValueError("static body must not need escaping in nginx.conf")
    return text


def write_config(prefix: Path, text: str) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


def command(binary: str, prefix: Path, config: Path) -> list[str]:
    """The foreground command line for an instance whose files all live under ``prefix``."""
    return [binary, "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log"),
            "-g", "daemon off;"]  # fmt: skip
