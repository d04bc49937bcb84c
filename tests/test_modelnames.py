"""Ollama model-name parsing, display and comparison."""

from __future__ import annotations

import pytest

from ollamaflow import modelnames
from ollamaflow.modelnames import InvalidModelName, ModelName

SAME_AS_LLAMA3 = [
    "llama3",
    "llama3:latest",
    "library/llama3",
    "library/llama3:latest",
    "registry.ollama.ai/library/llama3:latest",
    "registry.ollama.ai/library/llama3",
    "https://registry.ollama.ai/library/llama3:latest",
    "LLaMA3",
    "Library/Llama3:LATEST",
    " llama3 ",
]


@pytest.mark.parametrize("name", SAME_AS_LLAMA3)
def test_llama3_spellings_normalize_to_one_key(name: str) -> None:
    assert modelnames.normalize(name) == "llama3:latest"


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("llama3", "llama3:latest"),
        ("registry.ollama.ai/library/llama3:latest", "llama3:latest"),
        ("llama3:8b-instruct-q4_0", "llama3:8b-instruct-q4_0"),
        ("qwen2.5:0.5b", "qwen2.5:0.5b"),
        ("jmorgan/llama3", "jmorgan/llama3:latest"),
        ("registry.ollama.ai/jmorgan/llama3:v2", "jmorgan/llama3:v2"),
        (
            "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
            "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
        ),
        ("example.com/library/llama3", "example.com/library/llama3:latest"),
        ("localhost:5000/team/model", "localhost:5000/team/model:latest"),
        ("localhost:5000/team/model:v1", "localhost:5000/team/model:v1"),
        ("LLama3:Latest", "LLama3:Latest"),
    ],
)
def test_display(name: str, shown: str) -> None:
    assert modelnames.display(name) == shown


def test_parse_fills_defaults() -> None:
    assert modelnames.parse("llama3") == ModelName(
        "registry.ollama.ai", "library", "llama3", "latest"
    )
    assert modelnames.parse("a/b:c").full() == "registry.ollama.ai/a/b:c"


def test_port_colon_is_not_a_tag() -> None:
    parsed = modelnames.parse("myhost:8080/ns/model")
    assert (parsed.host, parsed.namespace, parsed.model, parsed.tag) == (
        "myhost:8080",
        "ns",
        "model",
        "latest",
    )


def test_tag_is_after_last_colon() -> None:
    assert modelnames.parse("model:a").tag == "a"
    assert modelnames.parse("model:").tag == "latest"


def test_digest_suffix_is_kept() -> None:
    digest = "sha256:" + "a" * 64
    assert modelnames.display(f"llama3@{digest}") == f"llama3:latest@{digest}"


def test_different_tags_namespaces_and_hosts_differ() -> None:
    assert modelnames.normalize("llama3:8b") != modelnames.normalize("llama3")
    assert modelnames.normalize("other/llama3") != modelnames.normalize("llama3")
    assert modelnames.normalize("example.com/library/llama3") != modelnames.normalize("llama3")


@pytest.mark.parametrize(
    "name",
    ["", "   ", "a/b/c/d", "/llama3", "llama3/", "lla ma3", "llama3:la/test", "-x", "m@sha256:zz"],
)
def test_invalid_names_raise(name: str) -> None:
    with pytest.raises(InvalidModelName):
        modelnames.parse(name)
    assert issubclass(InvalidModelName, ValueError)


def test_same_model() -> None:
    assert modelnames.same_model("Llama3", "registry.ollama.ai/library/llama3:latest")
    assert not modelnames.same_model("llama3", "llama3:70b")
    assert not modelnames.same_model("", "")
