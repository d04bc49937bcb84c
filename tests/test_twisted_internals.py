"""The start-up self-check of the private Twisted APIs we use: it passes on the installed
Twisted, and names the API and the Twisted version when one is gone or behaves differently."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.application import app
from twisted.copyright import version as twisted_version
from twisted.enterprise import adbapi
from twisted.internet import abstract, base, tcp
from twisted.internet.defer import fail
from twisted.internet.protocol import ClientFactory
from twisted.web import _newclient, http
from twisted.web import client as web_client
from twisted.web.client import HTTPConnectionPool, RequestTransmissionFailed

from ollamaflow import twisted_internals
from ollamaflow.twisted_internals import TwistedChanged, self_check


def test_the_installed_twisted_passes() -> None:
    self_check()


def _rename_in_init(cls: type[Any], old: str, new: str) -> Callable[[pytest.MonkeyPatch], None]:
    """A Twisted whose ``cls.__init__`` keeps ``old`` under another name."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        original = cls.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            setattr(self, new, self.__dict__.pop(old))

        monkeypatch.setattr(cls, "__init__", init)

    return patch


def _delete(owner: Any, name: str) -> Callable[[pytest.MonkeyPatch], None]:
    return lambda monkeypatch: monkeypatch.delattr(owner, name)


def _queued_writes_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Twisted that queues writes without counting them in ``_tempDataLen``."""

    def write(self: Any, data: bytes) -> None:
        self._tempDataBuffer.append(data)
        self.startWriting()

    monkeypatch.setattr(abstract.FileDescriptor, "write", write)


def _connect_without_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Twisted whose connectors build their transport some other way."""

    def connect(self: Any) -> None:
        self.state = "connecting"
        self.factory.doStart()
        self.transport = object()

    monkeypatch.setattr(base.BaseConnector, "connect", connect)


def _request_not_sent_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Twisted without ``RequestNotSent``, as this module would have found it at import."""
    monkeypatch.delattr(_newclient, "RequestNotSent")
    found = twisted_internals._lookup("twisted.web._newclient.RequestNotSent")
    monkeypatch.setattr(twisted_internals, "REQUEST_NOT_SENT", found or twisted_internals._Gone)


def _closed_connection_fails_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        _newclient.HTTP11ClientProtocol,
        "request",
        lambda self, request: fail(RequestTransmissionFailed([])),
    )


def _new_wrapper_subclass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Twisted with one more kind of wrapped client failure."""

    class Wrapper(Exception):
        pass

    class RequestAbandoned(Wrapper):
        pass

    monkeypatch.setattr(_newclient, "_WrapperException", Wrapper)
    monkeypatch.setattr(_newclient, "RequestAbandoned", RequestAbandoned, raising=False)


def _client_factory_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    # twisted.web.client is a deprecation proxy that cannot lose attributes: None means gone.
    monkeypatch.setattr(web_client, "_HTTP11ClientFactory", None)
    twisted_internals._quiet_client_factory.cache_clear()


def _pooled_connection_renamed(monkeypatch: pytest.MonkeyPatch) -> None:
    def init(self: Any, pool: Any) -> None:
        self._owner = pool
        self._dbapi = pool.connect()

    monkeypatch.setattr(adbapi.Connection, "__init__", init)


def _runner_reads_another_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    """A twistd whose runner takes the signal to re-raise from elsewhere on the reactor."""

    def startReactor(self: Any, reactor: Any, oldstdout: Any, oldstderr: Any) -> None:
        app.runReactorWithLogging(self.config, oldstdout, oldstderr, self.profiler, reactor)
        self._exitSignal = getattr(reactor, "_stoppedBySignal", None)

    monkeypatch.setattr(app.ApplicationRunner, "startReactor", startReactor)


def _sigterm_handler_keeps_it_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reactor whose SIGTERM handler remembers the signal under another name."""

    def sigTerm(self: Any, number: int, frame: Any = None) -> None:
        self.callFromThread(self.stop)
        self._stoppedBySignal = number

    monkeypatch.setattr(base.ReactorBase, "sigTerm", sigTerm)


FD = "twisted.internet.abstract.FileDescriptor"


#: How each private API goes missing (or changes meaning), and the name the failure must give.
class _HeadersStoredElsewhere:
    """A ``Headers`` as a future Twisted might write it: the same public API, the fields kept
    under another name."""

    __slots__ = ("_fields",)

    def __init__(self) -> None:
        self._fields: dict[bytes, list[bytes]] = {}

    def addRawHeader(self, name: bytes, value: bytes) -> None:
        self._fields.setdefault(name.title(), []).append(value)

    def getAllRawHeaders(self) -> Any:
        return iter(self._fields.items())

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        return self._fields.get(name.title(), default)

    def hasHeader(self, name: bytes) -> bool:
        return name.title() in self._fields


def _headers_stored_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(twisted_internals, "Headers", _HeadersStoredElsewhere)
    monkeypatch.setattr(twisted_internals, "_CANONICAL", {})


CHANGES: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "dataBuffer": (_delete(abstract.FileDescriptor, "dataBuffer"), f"{FD}.dataBuffer"),
    "offset": (_delete(abstract.FileDescriptor, "offset"), f"{FD}.offset"),
    "_tempDataLen": (
        _rename_in_init(abstract.FileDescriptor, "_tempDataLen", "_queuedLength"),
        f"{FD}._tempDataLen",
    ),
    "_tempDataLen meaning": (_queued_writes_not_counted, f"{FD}._tempDataLen"),
    "_writeDisconnected": (
        _delete(abstract.FileDescriptor, "_writeDisconnected"),
        f"{FD}._writeDisconnected",
    ),
    "Connection.socket": (
        _rename_in_init(tcp.Connection, "socket", "_socket"),
        "twisted.internet.tcp.Connection.socket",
    ),
    "connector state": (
        _rename_in_init(base.BaseConnector, "state", "_state"),
        "twisted.internet.base.BaseConnector.state",
    ),
    "_makeTransport": (
        _connect_without_the_hook,
        "twisted.internet.base.BaseConnector._makeTransport",
    ),
    "RequestNotSent": (_request_not_sent_gone, "twisted.web._newclient.RequestNotSent"),
    "RequestNotSent behaviour": (
        _closed_connection_fails_otherwise,
        "twisted.web._newclient.RequestNotSent",
    ),
    "_WrapperException": (
        _new_wrapper_subclass,
        "twisted.web._newclient._WrapperException (ollamaflow.services, telling network errors "
        f"from bugs): new subclasses not in CLIENT_FAILURES: {__name__}."
        "_new_wrapper_subclass.<locals>.RequestAbandoned",
    ),
    "pool _factory": (
        _delete(HTTPConnectionPool, "_factory"),
        "twisted.web.client.HTTPConnectionPool._factory",
    ),
    "_HTTP11ClientFactory": (_client_factory_gone, "twisted.web.client._HTTP11ClientFactory"),
    "Request._disconnected": (
        _delete(http.Request, "_disconnected"),
        "twisted.web.http.Request._disconnected",
    ),
    "bad request hook": (
        _delete(http.HTTPChannel, "_respondToBadRequestAndDisconnect"),
        "twisted.web.http.HTTPChannel._respondToBadRequestAndDisconnect",
    ),
    "Headers store": (
        _headers_stored_elsewhere,
        "twisted.web.http_headers.Headers._rawHeaders",
    ),
    "adbapi Connection": (
        _pooled_connection_renamed,
        "twisted.enterprise.adbapi.Connection._connection",
    ),
    "_exitSignal": (
        _delete(base.ReactorBase, "_exitSignal"),
        "twisted.internet.base.ReactorBase._exitSignal",
    ),
    "_exitSignal read elsewhere": (
        _runner_reads_another_attribute,
        "twisted.internet.base.ReactorBase._exitSignal",
    ),
    "_exitSignal set elsewhere": (
        _sigterm_handler_keeps_it_elsewhere,
        "twisted.internet.base.ReactorBase.sigTerm",
    ),
}


@pytest.fixture
def fresh_factory_cache() -> Any:
    twisted_internals._quiet_client_factory.cache_clear()
    yield
    twisted_internals._quiet_client_factory.cache_clear()


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_private_api_fails_the_check_naming_it_and_the_version(
    change: str, monkeypatch: pytest.MonkeyPatch, fresh_factory_cache: None
) -> None:
    patch, api = CHANGES[change]
    patch(monkeypatch)
    with pytest.raises(TwistedChanged) as raised:
        self_check()
    message = str(raised.value)
    assert message.startswith(f"Twisted {twisted_version} changed private APIs")
    assert api in message
    assert "\n" not in message
    # Only that API is reported: every other check still passes.
    assert sum(f"({check.what})" in message for check in twisted_internals.CHECKS) == 1, message


def test_every_check_is_exercised_by_a_change() -> None:
    """Each check in CHECKS is named by at least one change above."""
    for check in twisted_internals.CHECKS:
        owners = check.apis.split("/")[0].rsplit(".", 1)[0]
        assert any(api.startswith(owners) for _, api in CHANGES.values()), check.apis


def test_the_daemon_stops_before_anything_else_in_one_line(tmp_path: Path) -> None:
    """``twistd -n ollamaflow`` on a Twisted that changed one: one line, exit status 1,
    no settings file or database written, no port opened."""
    bootstrap = (
        "import sys\n"
        "from twisted.internet import abstract\n"
        "del abstract.FileDescriptor._writeDisconnected\n"
        "from twisted.scripts.twistd import run\n"
        "sys.argv = ['twistd', '-n', '--pidfile=', 'ollamaflow']\n"
        "run()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", bootstrap],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ollamaflow: Twisted {twisted_version} changed private APIs")
    assert f"{FD}._writeDisconnected (ollamaflow.tcp, sending at once): is gone" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_the_helpers_on_real_twisted_objects() -> None:
    """The helpers on objects Twisted built itself, not on the stand-ins of the checks."""
    pool = twisted_internals.quiet_connection_pool(HTTPConnectionPool(None))
    assert pool._factory.noisy is False
    assert issubclass(pool._factory, web_client._HTTP11ClientFactory)
    connector = tcp.Connector("127.0.0.1", 1, ClientFactory(), 1.0, None, None)
    assert twisted_internals.is_disconnected(connector)
    assert not twisted_internals.is_connecting(connector)


class _Core(base.ReactorBase):
    """A real reactor core that is never run (no waker: nothing to wake)."""

    def installWaker(self) -> None:
        pass


def test_only_the_signal_named_is_forgotten() -> None:
    """A clean drain forgets SIGTERM, never another signal (Ctrl-C still ends as SIGINT)."""
    core = _Core()
    assert twisted_internals.forget_exit_signal(core, signal.SIGTERM) is False
    core._exitSignal = signal.SIGINT
    assert twisted_internals.forget_exit_signal(core, signal.SIGTERM) is False
    assert core._exitSignal == signal.SIGINT
    core._exitSignal = signal.SIGTERM
    assert twisted_internals.forget_exit_signal(core, signal.SIGTERM) is True
    assert core._exitSignal is None
