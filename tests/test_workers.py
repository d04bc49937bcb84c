"""Workers: several daemon processes on one port, sharing the configuration through the database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from harness import until
from installed import free_port
from twisted.internet import reactor

TWISTD = str(Path(sys.executable).with_name("twistd"))
TOKEN: dict[bytes | str, bytes | str] = {"Authorization": "Bearer workers-token"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


@pytest_twisted.ensureDeferred
async def test_two_workers_share_the_port_and_the_configuration(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "ollamaflow.json").write_text(
        json.dumps(
            {
                "Webserver": {"Hostname": "127.0.0.1", "Port": port},
                "AdminBearerTokens": ["workers-token"],
                "Workers": 2,
                "Logging": {"MinimumSeverity": 2},
            }
        )
    )
    main = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "ollamaflow", "--config", "ollamaflow.json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        async def health() -> dict[str, Any]:
            response = await treq.get(base + "/v1.0/health", headers=TOKEN, persistent=False)
            body: dict[str, Any] = await response.json()
            return body

        seen: dict[int, int] = {}

        async def both_answered() -> bool:
            body = await health()
            seen[body["Worker"]] = body["Pid"]
            return len(seen) == 2

        await until(both_answered, 30, ignoring=(Exception,))
        assert seen[0] == main.pid and seen[1] != main.pid

        # A change made through whichever worker answers reaches the other within a second.
        reply = await treq.put(
            base + "/v1.0/backends",
            json={"Identifier": "shared", "Hostname": "127.0.0.1", "Port": 1},
            headers=TOKEN,
            persistent=False,
        )
        assert reply.code == 201
        changed_at = reactor.seconds()
        knows: set[int] = set()

        async def everyone_knows() -> bool:
            response = await treq.get(
                base + "/v1.0/backends/shared", headers=TOKEN, persistent=False
            )
            await response.content()
            if response.code == 200:
                knows.add((await health())["Worker"])
            return len(knows) == 2

        await until(everyone_knows, 30, ignoring=(Exception,))
        assert reactor.seconds() - changed_at < 5

        # A worker that dies is started again.
        os.kill(seen[1], signal.SIGKILL)

        async def replaced() -> bool:
            body = await health()
            return body["Worker"] == 1 and body["Pid"] != seen[1]

        await until(replaced, 30, ignoring=(Exception,))
        workers_now = {seen[0]}

        async def both_again() -> bool:
            body = await health()
            workers_now.add(body["Pid"])
            return len(workers_now) == 2

        await until(both_again, 30, ignoring=(Exception,))
    finally:
        main.send_signal(signal.SIGTERM)
        output, _ = main.communicate(timeout=30)
    assert main.returncode == 0, output  # a clean drain: exit 0, not killed by the signal
    others = [pid for pid in workers_now if pid != main.pid]
    for pid in others:
        assert not alive(pid), "a worker outlived the main process"
