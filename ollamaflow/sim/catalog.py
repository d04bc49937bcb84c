"""The fake models a simulator has installed, and what any model name would look like."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from ollamaflow import modelnames
from ollamaflow.sim.timefmt import rfc3339


@attrs.frozen
class Layer:
    """One blob of a model, as pull reports it."""

    digest: str
    """`sha256:` + 64 hex."""
    size: int
    kind: str = "model"
    """What it holds, the last word of Ollama's media type: model, adapter, template, system,
    license, params or messages."""


@attrs.frozen
class ModelSpec:
    """What a model is: stable per name, so every simulator describes a model identically."""

    family: str
    parameter_size: str
    parameter_count: int
    quantization_level: str
    size: int
    embedding_length: int
    context_length: int
    embedding_only: bool
    digest: str
    """64 hex, no prefix, as `/api/tags` shows it."""
    layers: tuple[Layer, ...]
    template: str | None = None
    """The template `/api/create` gave it; None: the simulator's default."""
    system: str = ""
    parameters: dict[str, Any] | None = None
    """Parameters `/api/create` gave it; None: the simulator's default."""
    parent_model: str = ""
    """What `/api/show` reports as `details.parent_model` (the model it was created from)."""

    @property
    def capabilities(self) -> list[str]:
        """Ollama's `capabilities` for `/api/show`."""
        return ["embedding"] if self.embedding_only else ["completion"]

    def details(self) -> dict[str, Any]:
        """The `details` object of tags, ps and show."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


# family, parameter size and count, quantization, bytes, embedding length, context, embed-only
_KNOWN: dict[str, tuple[str, str, int, str, int, int, int, bool]] = {
    "llama3": ("llama", "8.0B", 8_030_261_248, "Q4_0", 4_661_224_676, 4096, 8192, False),
    "llama3.1": ("llama", "8.0B", 8_030_261_248, "Q4_K_M", 4_920_753_328, 4096, 131072, False),
    "llama3.2": ("llama", "3.2B", 3_212_749_888, "Q4_K_M", 2_019_393_189, 3072, 131072, False),
    "mistral": ("llama", "7.2B", 7_248_023_552, "Q4_0", 4_113_301_824, 4096, 32768, False),
    "qwen2.5": ("qwen2", "7.6B", 7_615_616_512, "Q4_K_M", 4_683_087_332, 3584, 32768, False),
    "phi3": ("phi3", "3.8B", 3_821_079_552, "Q4_0", 2_176_178_913, 3072, 131072, False),
    "gemma2": ("gemma2", "9.2B", 9_241_705_984, "Q4_0", 5_443_152_417, 3584, 8192, False),
    "all-minilm": ("bert", "23M", 22_565_376, "F16", 45_960_996, 384, 512, True),
    "nomic-embed-text": ("nomic-bert", "137M", 136_727_040, "F16", 274_302_450, 768, 2048, True),
    "mxbai-embed-large": ("bert", "334M", 334_092_288, "F16", 669_615_493, 1024, 512, True),
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def spec_for(name: str) -> ModelSpec:
    """Describe any valid model name; known base names get realistic figures."""
    parsed = modelnames.parse(name)
    key = parsed.key()
    digest = _sha(key)
    base = parsed.model.lower()
    known = _KNOWN.get(base)
    if known is None:
        embedding = "embed" in base or "minilm" in base
        seed = int(digest[:8], 16)
        if embedding:
            known = (
                "bert",
                "110M",
                110_000_000,
                "F16",
                220_000_000 + seed % 10_000_000,
                768,
                512,
                True,
            )
        else:
            billions = 1 + seed % 13
            count = billions * 1_000_000_000 + seed % 1_000_000
            size = count * 9 // 16
            known = ("llama", f"{billions}.0B", count, "Q4_K_M", size, 4096, 8192, False)
    family, psize, pcount, quant, size, emb_len, ctx, embed_only = known
    small = (("template", 1_429), ("license", 12_403), ("params", 110))
    layers = [Layer(digest=f"sha256:{_sha(key + '/model')}", size=size - sum(s for _, s in small))]
    layers += [Layer(f"sha256:{_sha(key + '/' + part)}", s, part) for part, s in small]
    return ModelSpec(
        family=family,
        parameter_size=psize,
        parameter_count=pcount,
        quantization_level=quant,
        size=size,
        embedding_length=emb_len,
        context_length=ctx,
        embedding_only=embed_only,
        digest=digest,
        layers=tuple(layers),
    )


@attrs.define
class InstalledModel:
    """A model present on the simulated server under a display name."""

    name: str
    spec: ModelSpec
    modified_at: float

    def tag_entry(self) -> dict[str, Any]:
        """The `/api/tags` entry."""
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": rfc3339(self.modified_at),
            "size": self.spec.size,
            "digest": self.spec.digest,
            "details": self.spec.details(),
        }

    def show(self) -> dict[str, Any]:
        """The `/api/show` body, including the `model_info` the Python client requires."""
        spec = self.spec
        arch = spec.family.replace("-", "_")
        if spec.embedding_only:
            template = ""
            parameters = ""
        else:
            template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
            parameters = 'stop                           "<|eot_id|>"'
        if spec.template is not None:
            template = spec.template
        if spec.parameters is not None:
            parameters = format_parameters(spec.parameters)
        details = spec.details()
        details["parent_model"] = spec.parent_model
        shown: dict[str, Any] = {
            "license": "Simulated model; no weights.",
            "modelfile": f"# Modelfile generated by ollamaflow-sim\nFROM {self.name}\n",
            "parameters": parameters,
            "template": template,
        }
        if spec.system:
            shown["system"] = spec.system
        return shown | {
            "details": details,
            "model_info": {
                "general.architecture": arch,
                "general.file_type": 2,
                "general.parameter_count": spec.parameter_count,
                "general.quantization_version": 2,
                f"{arch}.context_length": spec.context_length,
                f"{arch}.embedding_length": spec.embedding_length,
            },
            "capabilities": spec.capabilities,
            "modified_at": rfc3339(self.modified_at),
        }


@attrs.define
class Catalog:
    """Installed models keyed by normalized name, with the `/api/tags` body cached."""

    _models: dict[str, InstalledModel] = attrs.Factory(dict)
    _tags_body: bytes | None = None

    @classmethod
    def with_models(cls, names: Iterable[str], now: float) -> Catalog:
        """A catalog holding `names`, all modified at `now`."""
        catalog = cls()
        for name in names:
            catalog.add(name, now)
        return catalog

    def __iter__(self) -> Iterator[InstalledModel]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str) -> InstalledModel | None:
        """The installed model `name` refers to; raises `InvalidModelName` for a bad name."""
        return self._models.get(modelnames.normalize(name))

    def add(self, name: str, now: float, spec: ModelSpec | None = None) -> InstalledModel:
        """Install (or refresh) a model under its display name."""
        parsed = modelnames.parse(name)
        model = InstalledModel(name=parsed.display(), spec=spec or spec_for(name), modified_at=now)
        self._models.pop(parsed.key(), None)
        self._models[parsed.key()] = model
        self._tags_body = None
        return model

    def remove(self, name: str) -> InstalledModel | None:
        """Uninstall a model; None if it was not installed."""
        model = self._models.pop(modelnames.normalize(name), None)
        if model is not None:
            self._tags_body = None
        return model

    def copy(self, source: str, destination: str, now: float) -> InstalledModel | None:
        """Install `destination` as a copy of `source`; None if `source` is not installed."""
        original = self.get(source)
        if original is None:
            return None
        return self.add(destination, now, spec=original.spec)

    def layer_digests(self, *, but: InstalledModel | None = None) -> set[str]:
        """Every layer digest an installed model uses (leaving out `but`)."""
        return {
            layer.digest for m in self._models.values() if m is not but for layer in m.spec.layers
        }

    def tags_body(self) -> bytes:
        """The `/api/tags` body, newest first, rebuilt only after a change."""
        if self._tags_body is None:
            entries = [m.tag_entry() for m in reversed(self._models.values())]
            self._tags_body = json.dumps({"models": entries}, separators=(",", ":")).encode()
        return self._tags_body


def format_parameters(parameters: dict[str, Any]) -> str:
    """`/api/show`'s `parameters` text: a line per value, the name padded to 30 columns."""
    lines = []
    for key in sorted(parameters):
        value = parameters[key]
        for item in value if isinstance(value, list) else [value]:
            text = json.dumps(item, ensure_ascii=False)
            lines.append(f"{key:<30} {text}")
    return "\n".join(lines)


def can_pull(name: str, pullable: Iterable[str]) -> bool:
    """Whether the simulated registry has `name` (`*` in `pullable` means everything)."""
    key = modelnames.normalize(name)
    for allowed in pullable:
        if allowed == "*":
            return True
        try:
            if modelnames.normalize(allowed) == key:
                return True
        except modelnames.InvalidModelName:
            continue
    return False
