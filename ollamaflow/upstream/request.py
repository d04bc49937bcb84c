"""A request to a backend on the wire: serialized once as a :class:`Message`, its body written.

The head carries the framing this client chooses from the body (the caller's own
``Content-Length`` and ``Transfer-Encoding`` are dropped); a body in memory goes out in the
same write as the head, a producer's body is written by a :class:`BodyWriter` as it comes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IConsumer, IProducer
from twisted.python.failure import Failure
from twisted.web.client import RequestGenerationFailed
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from ollamaflow.http1.rules import TOKEN
from ollamaflow.upstream.contracts import Body, Fields

#: Request fields this client writes itself from the body it is given.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
#: Methods whose request without a body still says ``Content-Length: 0``, as clients do.
_EMPTY_BODY_SAID = frozenset({b"POST", b"PUT"})


class Message:
    """A request ready to write: ``head`` (request line and fields, framing included), and
    the body as ``payload`` (in memory) or ``producer`` (streamed), or neither. Raises
    ValueError for a method that is not a token or a target that is not visible ASCII (they
    would break the request line). Never changed once made."""

    __slots__ = ("head", "is_head", "keep", "payload", "producer")

    def __init__(self, method: bytes, target: bytes, fields: Fields, body: Body) -> None:
        if not TOKEN.match(method):
            raise ValueError(f"invalid method {method!r}")
        if not _TARGET.match(target):
            raise ValueError(f"invalid request target {target!r}")
        payload: bytes | None = None
        producer: IBodyProducer | None = None
        if body is None:
            framing = b"Content-Length: 0\r\n" if method in _EMPTY_BODY_SAID else b""
        elif isinstance(body, bytes):
            payload = body
            framing = b"Content-Length: %d\r\n" % len(body)
        else:
            producer = body
            length = body.length
            if length is UNKNOWN_LENGTH:
                framing = b"Transfer-Encoding: chunked\r\n"
            else:
                framing = b"Content-Length: %d\r\n" % length
        keep = True
        lines = [method, b" ", target, b" HTTP/1.1\r\n", framing]
        for name, value in fields:
            lower = name.lower()
            if lower in _FRAMING:
                continue
            if lower == b"connection" and b"close" in value.lower():
                keep = False
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        self.head = b"".join(lines)
        self.payload = payload
        self.producer = producer
        #: An answer to HEAD has no body whatever its framing says.
        self.is_head = method == b"HEAD"
        #: False when the caller asked for ``Connection: close``: never pooled afterwards.
        self.keep = keep

    @property
    def replayable(self) -> bool:
        """Whether it can be sent again as it was (its body is in memory)."""
        return self.producer is None


@implementer(IConsumer)
class BodyWriter:
    """Writes a producer's body to a transport: ``Content-Length`` checked, or chunked.

    ``written`` is called once the whole body is out; ``broken`` with a
    ``RequestGenerationFailed`` if the producer failed or wrote more or less than its length.
    After :meth:`stop` neither is called and later writes are ignored."""

    __slots__ = ("_broken", "_written", "active", "chunked", "left", "producer", "transport")

    def __init__(
        self,
        producer: IBodyProducer,
        transport: Any,
        written: Callable[[], None],
        broken: Callable[[Exception], None],
    ) -> None:
        self.producer = producer
        self.transport = transport
        self._written = written
        self._broken = broken
        self.active = True
        self.chunked = producer.length is UNKNOWN_LENGTH
        self.left = 0 if self.chunked else producer.length

    def start(self) -> None:
        self.transport.registerProducer(self.producer, True)
        producing = self.producer.startProducing(self)
        producing.addCallbacks(self._produced, self._failed)

    def write(self, data: bytes) -> None:
        if not self.active or not data:
            return
        if self.chunked:
            self.transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
            return
        self.left -= len(data)
        if self.left < 0:
            self._break(ValueError("the body producer wrote more than its length"))
            return
        self.transport.write(data)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass  # registered on the transport in start()

    def unregisterProducer(self) -> None:
        pass

    def stop(self) -> None:
        """The body will not be written to the end: stop the producer."""
        self.active = False
        self.transport.unregisterProducer()
        self.producer.stopProducing()

    def _produced(self, _: object) -> None:
        if not self.active:
            return
        if not self.chunked and self.left:
            self._break(ValueError("the body producer wrote less than its length"))
            return
        self.active = False
        self.transport.unregisterProducer()
        if self.chunked:
            self.transport.write(b"0\r\n\r\n")
        self._written()

    def _failed(self, failure: Failure) -> None:
        if self.active:
            self._break(failure)

    def _break(self, error: Failure | Exception) -> None:
        self.stop()
        self._broken(RequestGenerationFailed([Failure(error)]))
