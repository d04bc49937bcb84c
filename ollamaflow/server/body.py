"""A client request's body, spooled until whole, then the request handed over."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from io import BytesIO
from typing import IO

from twisted.python.failure import Failure

from ollamaflow.server.request import ConnectionRequest

#: Bodies up to this size are kept in memory; larger ones go to a temporary file.
IN_MEMORY_BODY = 1 << 20


class SpooledRequest:
    """Collects the body of ``request`` (in memory, or a temporary file past
    :data:`IN_MEMORY_BODY`), then hands the request to ``serve`` with its ``content`` set."""

    __slots__ = ("_file", "_parts", "request", "serve", "size")

    def __init__(
        self, request: ConnectionRequest, serve: Callable[[ConnectionRequest], None]
    ) -> None:
        self.request = request
        self.serve = serve
        self._parts: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0

    def body(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
        elif self.size > IN_MEMORY_BODY:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - the request owns it
            self._file.write(b"".join(self._parts))
            self._file.write(data)
            self._parts = []
        else:
            self._parts.append(data)

    def complete(self) -> None:
        request = self.request
        if self._file is not None:
            self._file.seek(0)
            request.content = self._file
        elif self.size:
            parts = self._parts
            request.content = BytesIO(parts[0] if len(parts) == 1 else b"".join(parts))
        self.serve(request)

    def connection_lost(self, reason: Failure) -> None:
        self.request.connection_lost(reason)
        if self._file is not None:
            self._file.close()
