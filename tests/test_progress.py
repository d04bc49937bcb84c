"""Several backends' progress merged into one stream in Ollama's shapes, and which requests
only unload a model (no reactor)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ollamaflow.gateway.modelops import unloads
from ollamaflow.gateway.progress import MAX_LAYERS, ProgressMerger

LAYER = "sha256:" + "8e" * 32


def layer(completed: int | None, total: int = 100) -> dict[str, Any]:
    message: dict[str, Any] = {"status": "pulling 8e8e8e8e8e8e", "digest": LAYER, "total": total}
    if completed is not None:
        message["completed"] = completed
    return message


def test_the_slowest_backend_sets_the_pace_and_lines_keep_ollamas_order() -> None:
    merger = ProgressMerger(["fast", "slow"])
    out = merger.message("fast", {"status": "pulling manifest"})
    out += merger.message("fast", layer(None))
    out += merger.message("fast", layer(100))
    out += merger.message("fast", {"status": "verifying sha256 digest"})
    assert out == [], "nothing until the slow one has begun too"
    out = merger.message("slow", {"status": "pulling manifest"})
    assert out == [
        {"status": "pulling manifest"},
        {"status": "pulling 8e8e8e8e8e8e", "digest": LAYER, "total": 100},
    ]
    assert merger.message("slow", layer(40)) == [
        {"status": "pulling 8e8e8e8e8e8e", "digest": LAYER, "total": 100, "completed": 40}
    ]
    assert merger.message("slow", layer(40)) == [], "no line when nothing moved"
    assert merger.message("slow", layer(100)) == [
        {"status": "pulling 8e8e8e8e8e8e", "digest": LAYER, "total": 100, "completed": 100}
    ]
    assert merger.message("slow", {"status": "verifying sha256 digest"}) == [
        {"status": "verifying sha256 digest"}
    ]
    assert merger.message("fast", {"status": "writing manifest"}) == []
    assert merger.message("fast", {"status": "success"}) == [], "the caller says success once"
    assert merger.ended("fast") == []
    assert merger.message("slow", {"status": "writing manifest"}) == [
        {"status": "writing manifest"}
    ]


def test_a_backend_that_ends_no_longer_holds_the_others_back() -> None:
    merger = ProgressMerger(["a", "b"])
    assert merger.message("a", {"status": "parsing GGUF"}) == []
    assert merger.ended("b") == [{"status": "parsing GGUF"}]
    assert merger.message("b", {"status": "late"}) == [], "an ended backend is not heard"


def test_what_a_backend_sends_is_bounded() -> None:
    merger = ProgressMerger(["a"])
    for n in range(MAX_LAYERS + 50):
        merger.message("a", {"status": "s", "digest": f"sha256:{n}", "total": 1})
    assert merger.message("a", {"status": "x" * 10_000}) == [{"status": "x" * 200}]
    # A layer line without a valid total is a plain status line.
    assert merger.message("a", {"status": "s", "digest": "d", "total": -1}) == [{"status": "s"}]
    assert merger.message("a", {"status": "s", "digest": "d", "total": True}) == []
    assert merger.message("a", {"status": 7}) == []
    assert merger.message("nobody", {"status": "hi"}) == []


messages = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.one_of(
            st.builds(
                lambda s: {"status": s},
                st.sampled_from(["pulling manifest", "verifying", "writing manifest", "success"]),
            ),
            st.builds(
                lambda d, c: {"status": "pulling", "digest": d, "total": 100, "completed": c},
                st.sampled_from(["d1", "d2"]),
                st.integers(0, 150),
            ),
            st.just(None),  # the backend ends
        ),
    ),
    max_size=60,
)


@given(messages)
def test_each_status_goes_out_once_and_layers_never_go_back(
    events: list[tuple[str, dict[str, Any] | None]],
) -> None:
    merger = ProgressMerger(["a", "b", "c"])
    out: list[dict[str, Any]] = []
    for backend, message in events:
        out += merger.ended(backend) if message is None else merger.message(backend, message)
    for backend in "abc":
        out += merger.ended(backend)
    statuses = [m["status"] for m in out if "digest" not in m]
    assert len(statuses) == len(set(statuses))
    assert "success" not in statuses
    seen: dict[str, int] = {}
    for m in out:
        if "digest" in m:
            completed = m.get("completed", 0)
            assert 0 <= completed <= m["total"]
            assert completed > seen.get(m["digest"], -1)
            seen[m["digest"]] = completed
    for digest in seen:
        assert seen[digest] == 100, "every layer ends whole once every backend ended"


def test_a_status_the_caller_sent_itself_is_not_repeated() -> None:
    merger = ProgressMerger(["a", "b"])
    merger.already_sent("pulling manifest")
    assert merger.message("a", {"status": "pulling manifest"}) == []
    assert merger.message("a", layer(10)) == [
        {"status": "pulling 8e8e8e8e8e8e", "digest": LAYER, "total": 100}
    ], "b has not begun the layer: the bar shows what both have"


# -- which requests only unload ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "path", "expected"),
    [
        ({"model": "m", "keep_alive": 0}, b"/api/generate", True),
        ({"model": "m", "keep_alive": 0.0}, b"/api/generate", True),
        ({"model": "m", "keep_alive": "0"}, b"/api/generate", True),
        ({"model": "m", "keep_alive": "0s"}, b"/api/generate", True),
        ({"model": "m", "keep_alive": "0m0s"}, b"/api/generate", True),
        ({"model": "m", "keep_alive": 0, "prompt": ""}, b"/api/generate", True),
        ({"model": "m", "keep_alive": 0, "messages": []}, b"/api/chat", True),
        ({"model": "m", "keep_alive": 0, "prompt": "hi"}, b"/api/generate", False),
        ({"model": "m", "keep_alive": 0, "messages": [{"role": "user"}]}, b"/api/chat", False),
        ({"model": "m", "keep_alive": "5m"}, b"/api/generate", False),
        ({"model": "m", "keep_alive": "10s"}, b"/api/generate", False),
        ({"model": "m", "keep_alive": -1}, b"/api/generate", False),
        ({"model": "m", "keep_alive": False}, b"/api/generate", False),
        ({"model": "m", "keep_alive": None}, b"/api/generate", False),
        ({"model": "m"}, b"/api/generate", False),
        ({"model": "m", "keep_alive": "0" * 100}, b"/api/generate", False),
        ({"model": "m", "keep_alive": [0]}, b"/api/generate", False),
    ],
)
def test_what_ollama_stop_sends_is_an_unload(
    document: dict[str, Any], path: bytes, expected: bool
) -> None:
    assert unloads(document, path) is expected


@given(st.text(max_size=80))
def test_any_keep_alive_string_is_judged_without_error(value: str) -> None:
    assert isinstance(unloads({"keep_alive": value}, b"/api/generate"), bool)
