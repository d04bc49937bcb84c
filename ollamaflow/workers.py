"""Several daemon processes on one port, for more than one core.

Every process binds the listening port with ``SO_REUSEPORT`` and the kernel spreads new
connections over them. The first process (the one ``twistd`` started) spawns the others,
restarts any that dies, and stops them when it stops; they share the configuration through the
database and follow each other's changes like separate instances do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ollamaflow import tcp

log = Logger()

#: How soon a worker that died is started again, doubling up to a minute while it keeps dying.
_RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)


def listen_shared(
    reactor: Any, port: int, factory: Any, *, backlog: int, interface: str
) -> IListeningPort:
    """Listen on ``interface:port`` with SO_REUSEPORT, so sibling processes can too (a
    ``ListenFunction``, as :func:`ollamaflow.tcp.listen` is)."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
        listening: IListeningPort = tcp.adopt(reactor, sock, factory)
    finally:
        # The reactor holds its own duplicate: adoptStreamPort leaves ours to us to close.
        sock.close()
    return listening


def worker_command(config: str, number: int) -> list[str]:
    """The command line of worker ``number``: this Python running twistd in the foreground."""
    bootstrap = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    return [
        sys.executable,
        "-c",
        bootstrap,
        "-n",
        "--pidfile=",
        "ollamaflow",
        "--config",
        config,
        "--worker",
        str(number),
    ]


@attrs.define(eq=False)
class _Worker(ProcessProtocol):
    pool: WorkerPool
    number: int
    exited: Deferred[None] = attrs.field(factory=Deferred)
    pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self.exited.callback(None)
        self.pool.ended(self, reason)


@attrs.define
class WorkerPool(Service):
    """Starts ``count`` worker processes, keeps them running, and stops them with us."""

    reactor: Any
    config: str
    count: int
    command: Any = worker_command
    env: dict[str, str] | None = None
    workers: dict[int, _Worker] = attrs.field(factory=dict)
    _deaths: dict[int, int] = attrs.field(factory=dict)
    _stopping: bool = False

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for number in range(1, self.count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        if self._stopping:
            return
        worker = _Worker(self, number)
        argv: Sequence[str] = self.command(self.config, number)
        # Workers log where we log (our stdout and stderr).
        self.reactor.spawnProcess(
            worker,
            argv[0],
            list(argv),
            env=self.env if self.env is not None else dict(os.environ),
            childFDs={1: 1, 2: 2},
        )
        self.workers[number] = worker
        log.info("worker {number} started (pid {pid})", number=number, pid=worker.pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self._stopping:
            return
        deaths = self._deaths.get(worker.number, 0)
        self._deaths[worker.number] = deaths + 1
        delay = _RESTART_DELAYS[min(deaths, len(_RESTART_DELAYS) - 1)]
        log.warn(
            "worker {number} exited ({reason}); starting it again in {delay}s",
            number=worker.number,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self.reactor.callLater(delay, self._spawn, worker.number)

    def stopService(self) -> Deferred[Any]:
        """SIGTERM every worker (each drains like the main process) and wait for them."""
        self._stopping = True
        super().stopService()
        waiting = []
        for worker in list(self.workers.values()):
            waiting.append(worker.exited)
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        return DeferredList(waiting)


def exit_with_parent(reactor: Any, interval: float = 1.0) -> LoopingCall:
    """Stop this worker's reactor when its parent process is gone (even killed with SIGKILL):
    it then has a new parent."""
    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent and reactor.running:
            log.warn("the main OllamaFlow process is gone; this worker stops too")
            reactor.stop()

    watch = LoopingCall(check)
    watch.clock = reactor
    reactor.callWhenRunning(watch.start, interval, now=False)
    return watch
