"""One client request sent to several backends at once, and their answers made one: the
mechanics under the fleet-wide model operations (:mod:`ollamaflow.gateway.modelops`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, PotentialDataLoss, ResponseDone

from ollamaflow import modelnames
from ollamaflow.catalog import Registry
from ollamaflow.credentials import Tokens
from ollamaflow.gateway import headers as hdrs
from ollamaflow.gateway.clienterrors import finish_json
from ollamaflow.gateway.progress import ProgressMerger
from ollamaflow.gateway.requestdoc import body_size
from ollamaflow.records import Backend, Frontend
from ollamaflow.server.interfaces import ClientRequest

#: What is kept of each backend's answer to a fan-out (errors, an unload's JSON).
KEPT_BODY = 65536
#: A progress line longer than this ends that backend's stream (Ollama's are ~200 bytes).
MAX_LINE = 65536


async def with_required(registry: Registry, frontend: Frontend, model: str, keep: bool) -> None:
    """Add ``model`` to (or drop it from) the frontend's RequiredModels, persisted."""
    current = registry.catalog.frontends.get(frontend.identifier, frontend)
    listed = [m for m in current.required_models if modelnames.same_model(m, model)]
    if keep and not listed:
        models = (*current.required_models, model)
    elif not keep and listed:
        models = tuple(m for m in current.required_models if m not in listed)
    else:
        return
    await registry.replace_frontend(attrs.evolve(current, required_models=models))


class Puller(Protocol):
    """Starts (or joins) a pull of a model on a backend; fires when the backend has it."""

    def ensure(
        self,
        backend_id: str,
        model: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Deferred[None]: ...


# -- one answer each -------------------------------------------------------------------------


@attrs.frozen
class Outcome:
    """One backend's answer: its status (None if it could not be asked) and body, cut short."""

    backend: Backend
    status: int | None
    error: str = ""
    body: bytes = b""
    content_type: bytes | None = None


class SharedFile:
    """A read-only view of a spooled request body with its own offset (``os.pread``), so
    several uploads can read one file at once."""

    def __init__(self, source: IO[bytes]) -> None:
        self._fd = source.fileno()
        source.seek(0, 2)
        self._size = source.tell()
        source.seek(0)
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._size - self._at
        data = os.pread(self._fd, min(size, self._size - self._at), self._at)
        self._at += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._at, self._size)[whence]
        self._at = max(0, base + offset)
        return self._at

    def tell(self) -> int:
        return self._at

    def close(self) -> None:
        """The request owns the file."""


#: A request body as each backend gets it: bytes, or a factory of a fresh producer each.
Body = bytes | Callable[[], FileBodyProducer] | None


def body_of(request: ClientRequest, in_memory: int) -> Body:
    """The client's body for a fan-out: bytes up to ``in_memory``, else a fresh reader of the
    spooled file per backend."""
    content = request.content
    if content is None:
        return None
    if body_size(content) <= in_memory:
        return content.read()
    return lambda: FileBodyProducer(SharedFile(content))


async def send_everywhere(
    http: HTTPClient,
    request: ClientRequest,
    backends: Sequence[Backend],
    method: str,
    path: str,
    body: Body,
    seconds: float | None,
    withheld: Tokens | None = None,
) -> list[Outcome]:
    """``method path`` on every backend at once (``seconds``: a timeout, None for none); one
    outcome each, in order, never raises. ``withheld``: tokens of ours never passed on."""

    async def one(backend: Backend) -> Outcome:
        try:
            response = await http.request(
                method,
                backend.base_url + path,
                headers=hdrs.as_headers(hdrs.forwarded(request, backend, withheld)),
                data=body() if callable(body) else body,
                timeout=seconds,
            )
            content = await response.content()
        except Exception as e:
            return Outcome(backend, None, _reason(e))
        kept = content[:KEPT_BODY]
        error = "" if 200 <= response.code < 300 else error_of(kept)
        kind = response.headers.getRawHeaders(b"content-type")
        return Outcome(backend, response.code, error, kept, kind[-1] if kind else None)

    return await gatherResults([Deferred.fromCoroutine(one(b)) for b in backends])


def error_of(body: bytes) -> str:
    """The ``error`` of an Ollama error body, else the start of the body."""
    try:
        document = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return str(document["error"])[:500]
    return body[:200].decode("utf-8", "replace")


def failures(outcomes: Sequence[Outcome], ok: Sequence[int]) -> str:
    """``backend: why; ...`` for the outcomes whose status is not in ``ok``."""
    return "; ".join(
        f"{o.backend.identifier}: {o.error or f'HTTP {o.status}'}"
        for o in outcomes
        if o.status not in ok
    )


# -- one progress stream ---------------------------------------------------------------------


@attrs.define
class MergedProgress:
    """One operation on several backends, told to the client as one Ollama progress stream
    (:class:`ProgressMerger`), then ``success`` only if every backend succeeded, else an
    ``error`` naming those that failed. ``stream=False``: only the last message."""

    request: ClientRequest
    what: str
    backends: Sequence[Backend]
    stream: bool
    merger: ProgressMerger = attrs.field(init=False)
    #: Set by the first line written: the status and headers are out.
    started: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.merger = ProgressMerger([b.identifier for b in self.backends])

    def progressed(self, backend_id: str, message: dict[str, Any]) -> None:
        self._send(self.merger.message(backend_id, message))

    def ended(self, backend_id: str) -> None:
        self._send(self.merger.ended(backend_id))

    def _send(self, lines: list[dict[str, Any]]) -> None:
        request = self.request
        if not self.stream or request.disconnected or request.finished:
            return
        for line in lines:
            self._line(line)

    def _line(self, message: dict[str, Any]) -> None:
        request = self.request
        if not self.started:
            self.started = True
            request.setHeader(b"Content-Type", b"application/x-ndjson")
        request.write(json.dumps(message).encode() + b"\n")

    def finish(self, failed: Sequence[str], status: int = 500) -> None:
        """Every backend is done: ``failed`` names those that failed, with why."""
        request = self.request
        if request.disconnected or request.finished:
            return
        if failed:
            message = {"error": f"{self.what} failed on {'; '.join(failed)}"}
        else:
            message = {"status": "success"}
        if self.stream and (self.started or not failed):
            self._line(message)
            request.finish()
        else:
            finish_json(request, 200 if not failed else status, message)

    async def pull(self, puller: Puller, model: str, settled: Deferred[Any] | None = None) -> None:
        """Run the pulls (joining any already running) and report them; the last line waits
        for ``settled`` too (what the pull changes besides the backends)."""
        pulls = [
            puller.ensure(
                b.identifier, model, on_progress=functools.partial(self.progressed, b.identifier)
            )
            for b in self.backends
        ]
        for backend, pending in zip(self.backends, pulls, strict=True):
            pending.addBoth(self._ended, backend.identifier)

        def client_left(_: Failure) -> None:
            for pending in pulls:
                pending.cancel()

        self.request.watch(lambda: None, client_left)
        if self.stream:
            self._line({"status": "pulling manifest"})
            self.merger.already_sent("pulling manifest")
        results = await DeferredList(pulls, consumeErrors=True)
        if settled is not None:
            await settled
        self.finish(
            [
                f"{backend.identifier}: {_reason(result)}"
                for backend, (ok, result) in zip(self.backends, results, strict=True)
                if not ok
            ]
        )

    def _ended(self, result: object, backend_id: str) -> object:
        self.ended(backend_id)
        return result

    async def streams(
        self,
        http: HTTPClient,
        path: str,
        body: bytes,
        seconds: float | None,
        withheld: Tokens | None,
    ) -> list[str]:
        """POST ``body`` to ``path`` on every backend, each answer a progress stream; the
        failures, ``backend: why`` (the caller finishes)."""

        async def one(backend: Backend) -> str | None:
            try:
                return await self._stream(http, backend, path, body, seconds, withheld)
            finally:
                self.ended(backend.identifier)

        results = await gatherResults([Deferred.fromCoroutine(one(b)) for b in self.backends])
        return [
            f"{backend.identifier}: {error}"
            for backend, error in zip(self.backends, results, strict=True)
            if error is not None
        ]

    async def _stream(
        self,
        http: HTTPClient,
        backend: Backend,
        path: str,
        body: bytes,
        seconds: float | None,
        withheld: Tokens | None,
    ) -> str | None:
        """One backend's stream; None if it ended in success, else why not."""
        request = self.request
        try:
            response = await http.request(
                "POST",
                backend.base_url + path,
                headers=hdrs.as_headers(hdrs.forwarded(request, backend, withheld)),
                data=body,
                timeout=seconds,
                unbuffered=True,
            )
        except Exception as e:
            return _reason(e)
        reader = _Lines(functools.partial(self.progressed, backend.identifier))
        cancel: Callable[[Failure], object] = lambda _: reader.stop()  # noqa: E731
        request.watch(lambda: None, cancel)
        response.deliverBody(reader)
        try:
            await reader.done
        except Exception as e:
            return _reason(e)
        if response.code != 200:
            return error_of(bytes(reader.raw)) or f"HTTP {response.code}"
        return reader.error if reader.error is not None or reader.succeeded else "no success"


class _Lines(TwistedProtocol):
    """A progress stream read line by line: each JSON object handed on; the first ``error``
    and whether ``success`` came are kept."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None]) -> None:
        self.on_message = on_message
        self.buffer = b""
        self.raw = bytearray()
        self.error: str | None = None
        self.succeeded = False
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if len(self.raw) < KEPT_BODY:
            self.raw += data[: KEPT_BODY - len(self.raw)]
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self._line(line)
        if len(self.buffer) > MAX_LINE:
            self.error = f"a progress line over {MAX_LINE} bytes"
            self.stop()

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if isinstance(message.get("error"), str):
            if self.error is None:
                self.error = str(message["error"])[:500]
            return
        if message.get("status") == "success":
            self.succeeded = True
        self.on_message(message)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.buffer.strip():
            self._line(self.buffer)
        if reason.check(ResponseDone, PotentialDataLoss) or self.error is not None:
            self.done.callback(None)
        else:
            self.done.errback(reason)


def _reason(failure: Any) -> str:
    value = getattr(failure, "value", failure)
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(_reason(r) for r in reasons)
    return (str(value) or type(value).__name__).splitlines()[0]
