"""The background services' agent: backends configured by address are dialled directly."""

from __future__ import annotations

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    _WrapperEndpoint,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI

from ollamaflow.pool import DirectEndpoints


def endpoint(url: str) -> object:
    return DirectEndpoints(MemoryReactorClock(), 5.0).endpointForURI(URI.fromBytes(url.encode()))


def test_an_address_needs_no_lookup() -> None:
    four = endpoint("http://127.0.0.1:11434/")
    assert isinstance(four, TCP4ClientEndpoint)
    assert (four._host, four._port, four._timeout) == ("127.0.0.1", 11434, 5.0)
    six = endpoint("http://[::1]:11434/")
    assert isinstance(six, TCP6ClientEndpoint) and six._host == "::1"


def test_a_name_is_resolved_and_https_is_tls() -> None:
    assert isinstance(endpoint("http://gpu1.example:11434/"), HostnameEndpoint)
    wrapped = endpoint("https://10.0.0.5:443/")
    assert isinstance(wrapped, _WrapperEndpoint)
    assert isinstance(wrapped._wrappedEndpoint, TCP4ClientEndpoint)
