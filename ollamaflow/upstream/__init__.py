"""The upstream layer: an HTTP/1.1 client for the backends, below the gateway.

It knows backends only by host, port and TLS, and nothing of frontends, routing or clients.
``contracts`` says what the gateway may rely on (the client, a sent request, a response);
``client`` is the client itself, built from the connection ``pool``, the dialler in ``dial``
(the only module that opens sockets, injected so tests hand out in-memory transports), the
request ``Message`` and its body writer in ``request``, the ``response`` handed to the
gateway, and the ``connection`` state machine that carries one request and its response at a
time on a socket.
"""

from ollamaflow.upstream.client import BackendClient
from ollamaflow.upstream.contracts import Attempt, BackendResponse, UpstreamClient

__all__ = ["Attempt", "BackendClient", "BackendResponse", "UpstreamClient"]
