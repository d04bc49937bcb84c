"""Pull, create and push as Ollama 0.32 runs them: request checks and the progress they report.

Each operation is a generator of progress steps (see `progress`), which changes the simulator's
catalog and records its event when it succeeds; the routes only render the steps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator, Mapping
from typing import Any

import attrs

from ollamaflow import modelnames
from ollamaflow.sim.blobs import (
    INVALID_DIGEST,
    MODELS_DIR,
    blob_key,
    blob_path,
    missing_file,
    valid_digest,
)
from ollamaflow.sim.catalog import InstalledModel, Layer, ModelSpec, can_pull, spec_for
from ollamaflow.sim.progress import Failed, Step, paced
from ollamaflow.sim.responses import HTTPError
from ollamaflow.sim.state import SimState

PULL_NOT_FOUND = "pull model manifest: file does not exist"
INVALID_NAME = "invalid model name"
NEITHER = "neither 'from' or 'files' was specified"
NOT_GGUF = "supplied file was not in GGUF format"
UNKNOWN_TYPE = "unknown type"
FILE_PATH = "file path must be relative"
ONE_ADAPTER = "only one adapter is currently supported"
QUANTIZE_SOURCES = ("F16", "BF16", "F32")
QUANTIZE_ONLY = "quantization is only supported for F16, BF16 and F32 models"
CONVERSION_DIGEST = "0000000000000000000"
"""The digest Ollama puts on quantize and validation progress lines."""
# Ollama's quantize targets (its spelling → the file type it makes) and bits per weight.
QUANTIZE_TYPES = {
    "F32": "F32",
    "F16": "F16",
    "BF16": "BF16",
    "Q8_0": "Q8_0",
    "Q4_K_S": "Q4_K_S",
    "Q4_K_M": "Q4_K_M",
    "Q4_K": "Q4_K_M",
}
_BITS = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q4_K_S": 4.6, "Q4_K_M": 4.9}
UNSUPPORTED_QUANTIZE = (
    "unsupported quantization type {} - supported types are F32, F16, Q4_K_S, Q4_K_M, Q8_0"
)
MAX_TEXT = 1 << 20
"""Characters in one string field of a create request (template, system, …)."""
MAX_FILES = 1024
"""Entries in `files` or `adapters`, keys in `parameters`, items in `messages`."""

Steps = Generator[Step, None, None]


def go_quote(text: str) -> str:
    """`text` as Go's `%q` writes it (the quoting in Ollama's error messages)."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    out.append('"')
    return "".join(out)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_GO_ESCAPES["\v"] = "\\v"


def _json_kind(value: Any) -> str:
    """The JSON type name Go's decoder reports."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def bind_error(struct: str, field: str, value: Any, go_type: str) -> HTTPError:
    """The 400 Ollama answers when a field has the wrong JSON type."""
    kind = _json_kind(value)
    where = f"Go struct field {struct}.{field}"
    return HTTPError(400, f"json: cannot unmarshal {kind} into {where} of type {go_type}")


def go_json(value: Any) -> bytes:
    """What Go's `json.Encoder.Encode` writes: sorted keys, HTML characters escaped, a
    newline (the bytes Ollama hashes into a params or messages layer)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (text + "\n").encode()


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def valid_path(name: str) -> bool:
    """Go's `fs.ValidPath`: relative, slash-separated, no empty, `.` or `..` element."""
    if name == ".":
        return True
    return all(part not in ("", ".", "..") for part in name.split("/"))


def text_field(body: Mapping[str, Any], field: str, struct: str) -> str:
    """A string field (absent or null: empty), bounded."""
    value = body.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bind_error(struct, field, value, "string")
    if len(value) > MAX_TEXT:
        raise HTTPError(400, f"{field} is longer than {MAX_TEXT} characters")
    return value


def stream_field(body: Mapping[str, Any], struct: str) -> bool:
    """`stream`: true unless an explicit false."""
    value = body.get("stream")
    if value is not None and not isinstance(value, bool):
        raise bind_error(struct, "stream", value, "bool")
    return value is not False


# -- pull --------------------------------------------------------------------------------------


def pull_steps(state: SimState, name: str) -> Generator[Step, None, InstalledModel | None]:
    """Pull progress as Ollama reports it; the pulled model is the generator's value."""
    yield {"status": "pulling manifest"}
    config = state.config
    if not can_pull(name, config.pullable):
        state.counters.pull_failures += 1
        yield Failed(PULL_NOT_FOUND)
        return None
    spec = spec_for(name)
    total = sum(layer.size for layer in spec.layers) or 1
    for layer in spec.layers:
        seconds = config.pull_time * layer.size / total
        status = f"pulling {layer.digest[7:19]}"
        yield from paced(seconds, config.pull_tick, status, layer.digest, layer.size)
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    model = state.catalog.add(name, state.clock.seconds(), spec=spec)
    state.counters.pulls += 1
    state.events.pulled.append({"model": model.name})
    yield {"status": "success"}
    return model


# -- create ------------------------------------------------------------------------------------


@attrs.frozen
class CreateRequest:
    """A checked `/api/create` body (Ollama ≥ 0.5: `from` or `files`, never a Modelfile)."""

    name: str
    source: str
    files: dict[str, str]
    adapters: dict[str, str]
    template: str
    system: str
    license: Any
    parameters: dict[str, Any]
    messages: list[Any]
    quantize: str
    streaming: bool


def _string_map(body: Mapping[str, Any], field: str) -> dict[str, str]:
    value = body.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bind_error("CreateRequest", field, value, "map[string]string")
    if len(value) > MAX_FILES:
        raise HTTPError(400, f"{field} has more than {MAX_FILES} entries")
    for item in value.values():
        if not isinstance(item, str):
            raise bind_error("CreateRequest", field, item, "string")
    return dict(value)


def parse_create(body: Mapping[str, Any]) -> CreateRequest:  # noqa: C901 - Ollama's checks, in order
    """Check a create request in Ollama's order; the first problem is a 400 as Ollama words it."""
    struct = "CreateRequest"
    texts = {
        field: text_field(body, field, struct)
        for field in (
            "model",
            "name",
            "from",
            "quantize",
            "quantization",
            "template",
            "system",
            "renderer",
            "parser",
            "requires",
            "remote_host",
            "draft_quantize",
        )
    }
    streaming = stream_field(body, struct)
    files = _string_map(body, "files")
    adapters = _string_map(body, "adapters")
    draft_files = _string_map(body, "draft_files")
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise bind_error(struct, "parameters", parameters, "map[string]interface {}")
    elif len(parameters) > MAX_FILES:
        raise HTTPError(400, f"parameters has more than {MAX_FILES} entries")
    messages = body.get("messages")
    if messages is None:
        messages = []
    elif not isinstance(messages, list):
        raise bind_error(struct, "messages", messages, "[]api.Message")
    elif len(messages) > MAX_FILES:
        raise HTTPError(400, f"messages has more than {MAX_FILES} entries")
    for message in messages:
        if not isinstance(message, dict):
            raise bind_error(struct, "messages", message, "api.Message")
    info = body.get("info")
    if info is not None and not isinstance(info, dict):
        raise bind_error(struct, "info", info, "map[string]interface {}")
    for files_of in (files, draft_files):
        for path, digest in sorted(files_of.items()):
            if not valid_path(path):
                raise HTTPError(400, FILE_PATH)
            if not digest:
                raise HTTPError(400, INVALID_DIGEST)
    if texts["draft_quantize"] and not draft_files:
        raise HTTPError(400, "--draft-quantize requires a DRAFT model")
    if any(not digest for digest in adapters.values()):
        raise HTTPError(400, INVALID_DIGEST)
    name = texts["model"] or texts["name"]
    try:
        modelnames.parse(name)
    except modelnames.InvalidModelName:
        raise HTTPError(400, INVALID_NAME) from None
    return CreateRequest(
        name=name,
        source=texts["from"],
        files=files,
        adapters=adapters,
        template=texts["template"],
        system=texts["system"],
        license=body.get("license"),
        parameters=parameters,
        messages=messages,
        quantize=(texts["quantize"] or texts["quantization"]).upper(),
        streaming=streaming,
    )


@attrs.define
class _Draft:
    """A layer of the model being created, with what its progress line will say."""

    layer: Layer
    status: str
    file_type: str = ""
    """For model layers: the weights' file type (F16, Q4_0, …)."""
    rewrite: bool = False
    """Ollama re-writes (validates) a GGUF layer made from an uploaded file."""
    parent: str = ""


def create_steps(state: SimState, request: CreateRequest) -> Steps:
    """Create progress as Ollama reports it; counts the failures (the renderer stops at one)."""
    for step in _create(state, request):
        if isinstance(step, Failed):
            state.counters.create_failures += 1
        yield step


def _create(state: SimState, request: CreateRequest) -> Generator[Step, None, bool]:
    """Ollama's create, step by step: the layers it starts from, the model layers re-written
    (validated or quantized), the layers the request adds, then the manifest."""
    started = yield from _starting_layers(state, request)
    if started is None:
        return False
    base, drafts = started
    layers = _NewLayers(state)
    quantized = yield from _rewrite_models(state, request, drafts, layers)
    if quantized is None:
        return False
    parameters = yield from _added_layers(request, base, drafts, layers)
    if parameters is _FAILED:
        return False
    for draft in drafts:
        yield {"status": draft.status}
    yield {"status": "writing manifest"}
    _install(state, request, base, drafts, quantized, parameters)
    yield {"status": "success"}
    return True


#: An added-layers step that failed (its error was yielded).
_FAILED: Any = object()


@attrs.define
class _NewLayers:
    """Layers made by this create: "creating new" unless stored already (or made twice)."""

    state: SimState
    created: set[str] = attrs.field(factory=set)

    def make(self, content: bytes | str, kind: str, size: int | None = None) -> _Draft:
        digest = f"sha256:{_sha(content)}"
        existing = digest in self.created or self.state.has_blob(digest)
        self.created.add(digest)
        if size is None:
            size = len(content.encode() if isinstance(content, str) else content)
        verb = "using existing" if existing else "creating new"
        return _Draft(Layer(digest, size, kind), f"{verb} layer {digest}")


def _starting_layers(
    state: SimState, request: CreateRequest
) -> Generator[Step, None, tuple[ModelSpec, list[_Draft]] | None]:
    """The model created from (``from``, pulled first if absent) or its uploaded files, and
    adapters: the layers to start with; None after an error."""
    drafts: list[_Draft] = []
    base: ModelSpec
    if request.source:
        if not modelnames.is_valid(request.source):
            yield Failed(INVALID_NAME, 400)
            return None
        source = state.catalog.get(request.source)
        if source is None:
            source = yield from pull_steps(state, request.source)
            if source is None:
                return None
        base = source.spec
        for layer in base.layers:
            model = layer.kind == "model"
            drafts.append(
                _Draft(
                    layer,
                    f"using existing layer {layer.digest}",
                    file_type=base.quantization_level if model else "",
                    parent=source.name if model else "",
                )
            )
    elif request.files:
        base = spec_for(request.name)
        made = yield from _from_files(state, request.files, "model")
        if made is None:
            return None
        drafts += made
    else:
        yield Failed(NEITHER, 400)
        return None
    if request.adapters:
        made = yield from _from_files(state, request.adapters, "adapter")
        if made is None:
            return None
        drafts += made
    return base, drafts


def _rewrite_models(
    state: SimState, request: CreateRequest, drafts: list[_Draft], layers: _NewLayers
) -> Generator[Step, None, str | None]:
    """Quantize the model layers when asked (from F16/BF16/F32 only), else validate those made
    from files; the type quantized to ("" for none), or None after an error."""
    quantized = ""
    for i, draft in enumerate(drafts):
        if draft.layer.kind != "model":
            continue
        source_type = draft.file_type
        if request.quantize:
            want = QUANTIZE_TYPES.get(request.quantize)
            if want is None:
                yield Failed(UNSUPPORTED_QUANTIZE.format(request.quantize))
                return None
            if source_type not in QUANTIZE_SOURCES:
                yield Failed(QUANTIZE_ONLY)
                return None
            if source_type != want:
                status = f"quantizing {source_type} model to {request.quantize}"
                size = int(draft.layer.size * _BITS[want] / _BITS[source_type])
                yield from _convert(state, status, draft.layer.size)
                drafts[i] = layers.make(f"{draft.layer.digest}/{want}", "model", size)
                drafts[i].file_type = quantized = want
                continue
        if draft.rewrite:
            yield from _convert(state, "validating GGUF model", draft.layer.size)
            drafts[i] = layers.make(f"{draft.layer.digest}/validated", "model", draft.layer.size)
            drafts[i].file_type = source_type
    return quantized


def _added_layers(
    request: CreateRequest, base: ModelSpec, drafts: list[_Draft], layers: _NewLayers
) -> Generator[Step, None, Any]:
    """The layers the request adds or replaces (template, system, licenses, parameters,
    messages); the model's parameters, or :data:`_FAILED` after an error."""

    def replace(kind: str, draft: _Draft) -> None:
        drafts[:] = [d for d in drafts if d.layer.kind != kind]
        drafts.append(draft)

    if request.template:
        replace("template", layers.make(request.template, "template"))
    if request.system:
        replace("system", layers.make(request.system, "system"))
    licenses = request.license
    if isinstance(licenses, str):
        licenses = [licenses] if licenses else []
    elif licenses is None:
        licenses = []
    if not isinstance(licenses, list) or not all(isinstance(x, str) for x in licenses):
        kind = _json_kind(licenses if not isinstance(licenses, list) else licenses[0])
        yield Failed(f"json: cannot unmarshal {kind} into Go value of type []string")
        return _FAILED
    for text in licenses:
        drafts.append(layers.make(text, "license"))
    parameters = base.parameters
    if request.parameters:
        parameters = dict(base.parameters or {}) | request.parameters
        replace("params", layers.make(go_json(parameters), "params"))
    if request.messages:
        replace("messages", layers.make(go_json(request.messages), "messages"))
    return parameters


def _install(
    state: SimState,
    request: CreateRequest,
    base: ModelSpec,
    drafts: list[_Draft],
    quantized: str,
    parameters: Any,
) -> None:
    """The manifest written: the model is installed (replacing one of its name)."""
    model_types = [d.file_type for d in drafts if d.layer.kind == "model" and d.file_type]
    layers = tuple(d.layer for d in drafts)
    spec = attrs.evolve(
        base,
        quantization_level=quantized or (model_types[0] if model_types else "F16"),
        size=sum(layer.size for layer in layers),
        digest=_sha("\n".join(layer.digest for layer in layers)),
        layers=layers,
        template=request.template or base.template,
        system=request.system or base.system,
        parameters=parameters,
        parent_model=next((d.parent for d in drafts if d.layer.kind == "model"), ""),
    )
    old = state.catalog.get(request.name)
    model = state.catalog.add(request.name, state.clock.seconds(), spec=spec)
    if old is not None:
        state.forget_layers(old)
    state.events.created.append(
        {
            "model": model.name,
            "from": request.source or None,
            "files": request.files,
            "adapters": request.adapters,
            "quantize": request.quantize or None,
        }
    )
    state.counters.creates += 1


def _convert(state: SimState, status: str, total: int) -> Generator[Step, None, None]:
    """A layer re-written (validated or quantized): paced progress, then the verification."""
    config = state.config
    yield from paced(config.create_time, config.pull_tick, status, CONVERSION_DIGEST, total)
    yield {"status": "verifying conversion"}


def _file_type(state: SimState, files: Mapping[str, str]) -> str:
    """Ollama's guess at what the files are: the first name ending `.safetensors` or `.gguf`,
    or a blob that starts as GGUF; "" (unknown) at the first blob it cannot open. Ollama walks
    a Go map, in no order; the simulator walks the names sorted."""
    for name in sorted(files):
        if name.endswith(".safetensors"):
            return "safetensors"
        if name.endswith(".gguf"):
            return "gguf"
        digest = files[name]
        if not valid_digest(digest):
            return ""
        key = blob_key(digest)
        blob = state.blobs.get(key)
        if blob is None:
            if key not in state.catalog.layer_digests():
                return ""
        elif blob.gguf:
            return "gguf"
    return ""


def _from_files(
    state: SimState, files: Mapping[str, str], kind: str
) -> Generator[Step, None, list[_Draft] | None]:
    """The layers uploaded files make (`kind` model or adapter), or None after a `Failed`."""
    file_type = _file_type(state, files)
    if not file_type:
        yield Failed(UNKNOWN_TYPE, 400)
        return None
    if file_type == "safetensors":
        size = 0
        for path in sorted(files):
            found = _blob_size(state, files[path])
            if isinstance(found, Failed):
                yield found
                return None
            size += found
        yield {"status": "converting model" if kind == "model" else "converting adapter"}
        digests = "\n".join(files[path] for path in sorted(files))
        digest = f"sha256:{_sha(digests + '/converted')}"
        verb = "using existing" if state.has_blob(digest) else "creating new"
        layer = Layer(digest, size, kind)
        return [_Draft(layer, f"{verb} layer {digest}", file_type="F16")]
    if kind == "adapter" and len(files) > 1:
        yield Failed(ONE_ADAPTER, 400)
        return None
    drafts = []
    for path in sorted(files):
        yield {"status": "parsing GGUF"}
        digest = files[path]
        found = _blob_size(state, digest)
        if isinstance(found, Failed):
            yield found
            return None
        blob = state.blobs.get(blob_key(digest))
        if blob is not None and not blob.gguf:
            yield Failed(NOT_GGUF, 400)
            return None
        layer = Layer(digest, found, kind)
        drafts.append(
            _Draft(
                layer, f"using existing layer {digest}", file_type="F16", rewrite=kind == "model"
            )
        )
    return drafts


def _blob_size(state: SimState, digest: str) -> int | Failed:
    """The size of a blob a create names, or the error Ollama meets opening it."""
    if not valid_digest(digest):
        return Failed(INVALID_DIGEST)
    key = blob_key(digest)
    blob = state.blobs.get(key)
    if blob is not None:
        return blob.size
    for model in state.catalog:
        for layer in model.spec.layers:
            if layer.digest == key:
                return layer.size
    return Failed(missing_file(blob_path(digest)))


# -- push --------------------------------------------------------------------------------------


def push_steps(state: SimState, name: str) -> Steps:
    """Push progress as Ollama reports it (every push reaches the simulated registry)."""
    yield {"status": "retrieving manifest"}
    try:
        parsed = modelnames.parse(name)
    except modelnames.InvalidModelName:
        state.counters.push_failures += 1
        yield {"status": "couldn't retrieve manifest"}
        yield Failed(f"unqualified name: {name}")
        return
    model = state.catalog.get(name)
    if model is None:
        state.counters.push_failures += 1
        yield {"status": "couldn't retrieve manifest"}
        parts = (parsed.host, parsed.namespace, parsed.model, parsed.tag)
        yield Failed(missing_file(f"{MODELS_DIR}/manifests/{'/'.join(parts)}"))
        return
    config = state.config
    layers = model.spec.layers
    total = sum(layer.size for layer in layers) or 1
    for layer in layers:
        seconds = config.push_time * layer.size / total
        status = f"pushing {layer.digest[7:19]}"
        yield from paced(seconds, config.pull_tick, status, layer.digest, layer.size)
    yield {"status": "pushing manifest"}
    state.counters.pushes += 1
    state.events.pushed.append({"model": model.name, "digests": [layer.digest for layer in layers]})
    yield {"status": "success"}
