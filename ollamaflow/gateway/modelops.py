"""Model operations a client asks of one frontend, done on every healthy backend behind it.

A fleet behind one endpoint must look like one Ollama: a model pulled, copied or created is
there whichever box the next request lands on; a delete or ``ollama stop`` reaches every box
that has or runs the model; ``ollama create``'s blobs go where create runs. Each operation
answers in Ollama's shapes, then refreshes the inventories of the backends it changed before
the client hears the end, so the next request routes by what is true.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET

from ollamaflow import jsonlimits, modelnames
from ollamaflow.catalog import Registry
from ollamaflow.credentials import Tokens
from ollamaflow.gateway import fanout
from ollamaflow.gateway.clienterrors import error_body, finish_json, quoted
from ollamaflow.gateway.requestdoc import json_object, model_of
from ollamaflow.records import ApiFormat, Backend, Frontend
from ollamaflow.server.failures import fail
from ollamaflow.server.interfaces import ClientRequest

log = Logger()

#: Uploads and creates may take minutes (gigabytes of weights, quantizing).
TRANSFER_SECONDS = 1800.0
#: How long an answer waits for the inventories it changed to be read again, at most.
REFRESH_WAIT = 5.0
#: Blob bodies up to this size are sent from memory; larger ones read from the spool per backend.
IN_MEMORY_BLOB = 1 << 20
_BLOBS = b"/api/blobs/"
#: ``keep_alive`` values that unload at once: 0, or a Go duration of zero ("0", "0s", "0m0s").
_ZERO_DURATION = re.compile(r"\s*(?:0+(?:\.0*)?(?:ns|us|µs|ms|s|m|h)?)+\s*")

Answer = bytes | int


class Answers(Protocol):
    """How the gateway answers and reports a request (its access log line, its id)."""

    def refuse(
        self,
        request: ClientRequest,
        frontend: Frontend | None,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        model: str | None = None,
    ) -> bytes: ...

    def answering(
        self,
        request: ClientRequest,
        frontend: Frontend,
        model: str | None,
        backends: Sequence[Backend],
        size: int = 0,
    ) -> str: ...


def unloads(document: dict[str, Any], path: bytes) -> bool:
    """Whether a generate or chat only unloads its model (``ollama stop``): ``keep_alive`` of
    zero and nothing to answer (no prompt, no messages)."""
    keep_alive = document.get("keep_alive")
    if isinstance(keep_alive, bool) or keep_alive is None:
        return False
    if isinstance(keep_alive, int | float):
        zero = keep_alive == 0
    elif isinstance(keep_alive, str) and len(keep_alive) <= 64:
        zero = _ZERO_DURATION.fullmatch(keep_alive) is not None
    else:
        return False
    if not zero:
        return False
    if path.rstrip(b"/") == b"/api/chat":
        return not document.get("messages")
    return not document.get("prompt")


def operation_for(method: bytes, path: bytes, *, pulls: bool) -> str | None:
    """The fleet-wide operation a request is, if it is one (``pulls``: whether pulls are;
    without model synchronization a pull is proxied to one backend)."""
    path = path.rstrip(b"/")
    if method == b"DELETE" and path == b"/api/delete":
        return "delete"
    if method == b"POST":
        if path == b"/api/pull":
            return "pull" if pulls else None
        if path == b"/api/copy":
            return "copy"
        if path == b"/api/create":
            return "create"
    if method in (b"HEAD", b"POST") and path.startswith(_BLOBS):
        return "blob"
    return None


@attrs.define(eq=False)
class ModelOperations:
    """Pull, delete, copy, create, blob uploads and unloading, across a frontend's backends."""

    registry: Registry
    http: HTTPClient
    answers: Answers
    clock: IReactorTime
    withheld: Tokens
    #: Starts (or joins) pulls; None when model synchronization is off (a pull is proxied).
    sync: fanout.Puller | None = None
    #: Reads a backend's models again; fires when done.
    refresh: Callable[[str], Deferred[None]] | None = None
    #: RequiredModels changes from clients' pulls and deletes, one at a time.
    _required_lock: DeferredLock = attrs.field(factory=DeferredLock)

    def operation(self, name: str) -> Callable[[ClientRequest, Frontend, list[Backend]], Answer]:
        """The operation :func:`operation_for` named."""
        operations = {
            "pull": self.pull,
            "delete": self.delete,
            "copy": self.copy,
            "create": self.create,
            "blob": self.blob,
        }
        return operations[name]

    # -- pull and delete ------------------------------------------------------------------------

    def pull(self, request: ClientRequest, frontend: Frontend, found: list[Backend]) -> Answer:
        """Every healthy Ollama backend pulls at once, reported as one pull; the model joins
        RequiredModels so backends that join later get it too."""
        assert self.sync is not None, "routed here only with model synchronization"
        sync = self.sync
        begun = self._begin(request, frontend, found, "pull on")
        if isinstance(begun, bytes):
            return begun
        document, model, targets = begun
        merged = fanout.MergedProgress(
            request, f"pull of {quoted(model)}", targets, stream=document.get("stream") is not False
        )
        # Watched apart from the client, who may leave: the first backend that has the model
        # makes it required (so boxes that join later get it too); none, and it is not. The
        # client hears the end only once that is written, so what it reads next is true.
        first = DeferredList(
            [sync.ensure(b.identifier, model) for b in targets],
            fireOnOneCallback=True,
            consumeErrors=True,
        )
        required = first.addCallback(self._pulled_somewhere, frontend, model)
        self._detached(request, merged.pull(sync, model, settled=required), "pull")
        return NOT_DONE_YET

    def _pulled_somewhere(
        self, result: object, frontend: Frontend, model: str
    ) -> Deferred[None] | None:
        """DeferredList's answer: a (value, index) pair when one pull succeeded, else a list."""
        if isinstance(result, tuple):
            return self._require(frontend, model, keep=True)
        return None

    def delete(self, request: ClientRequest, frontend: Frontend, found: list[Backend]) -> Answer:
        """Every healthy backend deletes the model; it leaves RequiredModels."""
        parsed = self._named(request, frontend)
        if isinstance(parsed, bytes):
            return parsed
        document, model = parsed
        body = jsonlimits.dumps(document)
        self.answers.answering(request, frontend, model, found)

        async def run() -> None:
            outcomes = await self._send(
                request, found, "DELETE", "/api/delete", body, frontend.timeout_ms / 1000 or None
            )
            failed = fanout.failures(outcomes, (200, 404))
            deleted = any(o.status == 200 for o in outcomes)
            if deleted and not failed:
                # Before the inventories are read again: model sync must not pull it back.
                await self._require(frontend, model, keep=False)
            await self._refreshed(outcomes, (200,))
            _finish_done_somewhere(request, "delete", model, outcomes)

        self._detached(request, run(), "delete")
        return NOT_DONE_YET

    # -- copy -----------------------------------------------------------------------------------

    def copy(self, request: ClientRequest, frontend: Frontend, found: list[Backend]) -> Answer:
        """Every healthy backend that may have the source copies it; the new name routes as
        soon as the client hears 200."""
        try:
            document = json_object(request.content)
        except ValueError as e:
            return self.answers.refuse(request, frontend, 400, str(e))
        source, destination = document.get("source"), document.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str):
            return self.answers.refuse(
                request, frontend, 400, "source and destination are required"
            )
        for name in (source, destination):
            if not modelnames.is_valid(name):
                return self.answers.refuse(
                    request, frontend, 400, f"invalid model name {quoted(name)}"
                )
        targets = [b for b in found if b.api_format is ApiFormat.OLLAMA]
        self.answers.answering(request, frontend, destination, targets)
        body = jsonlimits.dumps(document)

        async def run() -> None:
            outcomes = await self._send(
                request, targets, "POST", "/api/copy", body, frontend.timeout_ms / 1000 or None
            )
            await self._refreshed(outcomes, (200,))
            _finish_done_somewhere(request, "copy", source, outcomes)

        self._detached(request, run(), "copy")
        return NOT_DONE_YET

    # -- create and its blobs -------------------------------------------------------------------

    def blob(self, request: ClientRequest, frontend: Frontend, found: list[Backend]) -> Answer:
        """``HEAD``: 200 only if every healthy backend has the blob (else the client uploads
        it); ``POST``: the upload goes to every one of them."""
        targets = [b for b in found if b.api_format is ApiFormat.OLLAMA]
        if not targets:
            return self.answers.refuse(
                request, frontend, 503, "no healthy Ollama backend", retry_after=1
            )
        self.answers.answering(request, frontend, None, targets)
        head = request.method == b"HEAD"
        body = None if head else fanout.body_of(request, IN_MEMORY_BLOB)
        path = request.path.decode("latin-1")

        async def run() -> None:
            outcomes = await self._send(
                request,
                targets,
                request.method.decode(),
                path,
                body,
                None if head else TRANSFER_SECONDS,
            )
            _finish_blob(request, outcomes, head)

        self._detached(request, run(), "blob upload")
        return NOT_DONE_YET

    def create(self, request: ClientRequest, frontend: Frontend, found: list[Backend]) -> Answer:
        """Every healthy backend creates the model (its blobs went to each of them), reported as
        one progress stream."""
        begun = self._begin(request, frontend, found, "create on")
        if isinstance(begun, bytes):
            return begun
        document, model, targets = begun
        stream = document.get("stream") is not False
        # Each backend streams, whatever the client asked: its progress is what is merged.
        body = jsonlimits.dumps({k: v for k, v in document.items() if k != "stream"})
        merged = fanout.MergedProgress(request, f"create of {quoted(model)}", targets, stream)

        async def run() -> None:
            failed = await merged.streams(
                self.http, "/api/create", body, TRANSFER_SECONDS, self.withheld
            )
            failed_ids = {f.partition(":")[0] for f in failed}
            await self._refresh_each([b for b in targets if b.identifier not in failed_ids])
            merged.finish(failed, status=_status_of_all(failed, len(targets)))

        self._detached(request, run(), "create")
        return NOT_DONE_YET

    # -- unloading ------------------------------------------------------------------------------

    def unload(
        self,
        request: ClientRequest,
        frontend: Frontend,
        loaded: Sequence[Backend],
        document: dict[str, Any],
        model: str,
    ) -> Answer:
        """``keep_alive: 0`` with nothing to answer: every backend where the model is loaded
        unloads it; the client gets one backend's answer (Ollama's ``done_reason: unload``)."""
        self.answers.answering(request, frontend, model, loaded)
        body = jsonlimits.dumps(document)
        path = request.path.decode("latin-1")

        async def run() -> None:
            outcomes = await self._send(
                request, loaded, "POST", path, body, frontend.timeout_ms / 1000 or None
            )
            await self._refreshed(outcomes, (200,))
            answered = [o for o in outcomes if o.status == 200] or [
                o for o in outcomes if o.status is not None
            ]
            if not answered:
                failed = fanout.failures(outcomes, (200,))
                _finish(request, 502, {"error": f"unload of {quoted(model)} failed on {failed}"})
                return
            first = answered[0]
            assert first.status is not None
            request.setResponseCode(first.status)
            request.setHeader(b"Content-Type", first.content_type or b"application/json")
            request.setHeader(b"Content-Length", b"%d" % len(first.body))
            request.write(first.body)
            request.finish()

        self._detached(request, run(), "unload")
        return NOT_DONE_YET

    # -- shared ---------------------------------------------------------------------------------

    def _named(
        self, request: ClientRequest, frontend: Frontend
    ) -> tuple[dict[str, Any], str] | bytes:
        """The JSON body of an operation on one model and the model it names, or the 400."""
        try:
            document = json_object(request.content)
            model = model_of(document, request.path)
        except ValueError as e:
            return self.answers.refuse(request, frontend, 400, str(e))
        if model is None:
            named = document.get("model") or document.get("name")
            if isinstance(named, str) and named:
                return self.answers.refuse(
                    request, frontend, 400, f"invalid model name {quoted(named)}"
                )
            return self.answers.refuse(request, frontend, 400, "model is required")
        return document, model

    def _begin(
        self, request: ClientRequest, frontend: Frontend, found: list[Backend], doing: str
    ) -> tuple[dict[str, Any], str, list[Backend]] | bytes:
        """A streamed operation on one model (pull, create) on every healthy Ollama backend:
        its body, the model, and the backends it runs on, reported from now on; or the
        refusal."""
        parsed = self._named(request, frontend)
        if isinstance(parsed, bytes):
            return parsed
        document, model = parsed
        targets = [b for b in found if b.api_format is ApiFormat.OLLAMA]
        if not targets:
            return self.answers.refuse(
                request,
                frontend,
                503,
                f"frontend {frontend.identifier!r} has no healthy Ollama backend to {doing}",
                retry_after=1,
                model=model,
            )
        self.answers.answering(request, frontend, model, targets)
        return document, model, targets

    def _require(self, frontend: Frontend, model: str, *, keep: bool) -> Deferred[None]:
        """Add the model to (or drop it from) the frontend's RequiredModels, one change at a
        time; fires when done. A write the store refuses (a full list, say) is logged, and the
        client's answer stands."""

        def failed(failure: Failure) -> None:
            log.warn(
                "RequiredModels of {frontend} not updated for {model}: {error}",
                frontend=frontend.identifier,
                model=model,
                error=failure.getErrorMessage(),
            )

        changed = self._required_lock.run(
            lambda: Deferred.fromCoroutine(
                fanout.with_required(self.registry, frontend, model, keep=keep)
            )
        )
        return changed.addErrback(failed)

    def _send(
        self,
        request: ClientRequest,
        backends: Sequence[Backend],
        method: str,
        path: str,
        body: fanout.Body,
        seconds: float | None,
    ) -> Deferred[list[fanout.Outcome]]:
        return Deferred.fromCoroutine(
            fanout.send_everywhere(
                self.http, request, backends, method, path, body, seconds, self.withheld
            )
        )

    async def _refreshed(self, outcomes: Sequence[fanout.Outcome], ok: Sequence[int]) -> None:
        await self._refresh_each([o.backend for o in outcomes if o.status in ok])

    async def _refresh_each(self, backends: Sequence[Backend]) -> None:
        """Read the models of ``backends`` again, waiting :data:`REFRESH_WAIT` at most."""
        refresh = self.refresh
        if refresh is None or not backends:
            return
        done = DeferredList([refresh(b.identifier) for b in backends], consumeErrors=True)
        waited: Deferred[Any] = Deferred()
        timer = self.clock.callLater(REFRESH_WAIT, waited.callback, None)

        def refreshed(_: object) -> None:
            if timer.active():
                timer.cancel()
                waited.callback(None)

        done.addBoth(refreshed)
        await waited

    def _detached(self, request: ClientRequest, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run an operation; a bug becomes a logged 500 in the client's dialect, never a hang."""

        def failed(failure: Failure) -> None:
            log.failure("{what} across the fleet failed", failure, what=what)
            fail(request, error_body(request.path, 500, f"{what} failed; see the gateway's log"))

        Deferred.fromCoroutine(work).addErrback(failed)


def _status_of_all(failed: Sequence[str], count: int) -> int:
    """A create that failed everywhere is most likely the request's fault (a missing blob, a
    bad ``from``): 400 as Ollama answers it; some backends only: theirs, 502."""
    return 400 if len(failed) == count else 502


def _finish(request: ClientRequest, status: int, document: object) -> None:
    if not request.disconnected and not request.finished:
        finish_json(request, status, document)


def _finish_empty(request: ClientRequest, status: int) -> None:
    """Ollama's answer to delete and copy: a status and an empty body."""
    if not request.disconnected and not request.finished:
        request.setResponseCode(status)
        request.setHeader(b"Content-Length", b"0")
        request.finish()


def _finish_done_somewhere(
    request: ClientRequest, what: str, model: str, outcomes: Sequence[fanout.Outcome]
) -> None:
    """Ollama's answer to a delete or a copy done across the fleet: 200 and an empty body if
    some backend did it and none failed (a 404 is a backend without the model), 404 if none
    had the model, else 502 naming the backends that failed."""
    failed = fanout.failures(outcomes, (200, 404))
    if failed:
        _finish(request, 502, {"error": f"{what} of {quoted(model)} failed on {failed}"})
    elif not any(o.status == 200 for o in outcomes):
        _finish(request, 404, {"error": f"model {quoted(model)} not found"})
    else:
        _finish_empty(request, 200)


def _finish_blob(request: ClientRequest, outcomes: Sequence[fanout.Outcome], head: bool) -> None:
    """HEAD: 200 if every backend has it, 404 if one lacks it. POST: 201 if every upload was
    taken; the backends' own refusal if they all refused alike (a digest mismatch); else 502."""
    ok = (200,) if head else (200, 201)
    statuses = {o.status for o in outcomes}
    if statuses <= set(ok):
        _finish_empty(request, 200 if head else 201)
        return
    if head and statuses <= {200, 404}:
        _finish_empty(request, 404)
        return
    if not head and len(statuses) == 1 and 400 <= (outcomes[0].status or 0) < 500:
        _finish(request, outcomes[0].status or 400, {"error": outcomes[0].error})
        return
    failed = fanout.failures(outcomes, ok)
    if head:
        _finish_empty(request, 502)
    else:
        _finish(request, 502, {"error": f"blob upload failed on {failed}"})
