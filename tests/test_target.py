"""Request-target normalisation: the path every layer after the parser sees, decoded and
normalised the way Ollama (Go, gin) routes it, then re-encoded as a valid origin-form path."""

from __future__ import annotations

import re
from urllib.parse import quote_from_bytes, unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ollamaflow.server.target import PLAIN_TARGET, PathError, normalize_target

#: Input path → normalised path.
NORMAL = [
    # encoded unreserved letters: the bypass of issue #14
    ("encoded letter", b"/api/%63hat", b"/api/chat"),
    ("encoded letter, openai", b"/v1/chat/%63ompletions", b"/v1/chat/completions"),
    ("encoded letter, lower-case hex", b"/api/%65mbed", b"/api/embed"),
    ("encoded digit and dot", b"/%761%2E0/backends", b"/v1.0/backends"),
    ("encoded tilde", b"/a/%7Eb", b"/a/~b"),
    # encoded slash: gin routes on the fully decoded path
    ("encoded slash", b"/api%2Fchat", b"/api/chat"),
    ("encoded slash, lower-case hex", b"/api%2fchat", b"/api/chat"),
    ("encoded slashes merge", b"/api%2F%2Fchat", b"/api/chat"),
    # repeated slashes
    ("double slash", b"//v1.0/backends", b"/v1.0/backends"),
    ("slashes everywhere", b"///api//chat", b"/api/chat"),
    ("double slash at the end", b"/api/tags//", b"/api/tags/"),
    ("only slashes", b"//", b"/"),
    # dot segments (RFC 3986 5.2.4)
    ("dot segment", b"/api/./chat", b"/api/chat"),
    ("dot-dot segment", b"/a/../b", b"/b"),
    ("dot-dot to the root", b"/a/..", b"/"),
    ("trailing dot", b"/a/.", b"/a/"),
    ("trailing dot-dot", b"/a/b/..", b"/a/"),
    ("encoded dot-dot", b"/x/%2e%2E/api/chat", b"/api/chat"),
    ("dot-dot through an encoded slash", b"/a%2F..%2Fb", b"/b"),
    ("dots that are not dot segments", b"/.well-known/a..b/...", b"/.well-known/a..b/..."),
    # re-encoding: what a path segment cannot hold literally is escaped again
    ("encoded percent", b"/a%25b", b"/a%25b"),
    ("encoded percent of an escape", b"/a%252F", b"/a%252F"),
    ("encoded space", b"/a%20b", b"/a%20b"),
    ("encoded question mark", b"/a%3Fb", b"/a%3Fb"),
    ("encoded hash", b"/a%23b", b"/a%23b"),
    ("escapes come out upper-case", b"/a%3fb/%2e", b"/a%3Fb/"),
    ("valid UTF-8 (e acute)", b"/caf%C3%A9", b"/caf%C3%A9"),
    ("valid UTF-8, lower-case hex", b"/caf%c3%a9", b"/caf%C3%A9"),
    ("a 4-byte character", b"/%F0%9F%A6%99", b"/%F0%9F%A6%99"),
    # everything RFC 3986 allows in a path segment stays literal
    (": and @ literally", b"/a:b@c", b"/a:b@c"),
    (": and @ decoded", b"/a%3Ab%40c", b"/a:b@c"),
    ("sub-delims decoded", b"/%21%24%26%27%28%29%2A%2B%2C%3B%3D", b"/!$&'()*+,;="),
    ("sub-delims kept", b"/x/./!$&'()*+,;=", b"/x/!$&'()*+,;="),
    # what a segment may not hold, sent raw, is escaped once the path is rewritten
    (
        "raw characters not allowed in a path",
        b'/a/./{"b"}|^`[]\\',
        b"/a/%7B%22b%22%7D%7C%5E%60%5B%5D%5C",
    ),
]

#: Paths that cannot be served: 400.
BAD = [
    ("malformed escape", b"/api/%zz"),
    ("half-hex escape", b"/api/%4g"),
    ("truncated escape", b"/api/%4"),
    ("percent at the end", b"/api/chat%"),
    ("NUL", b"/api/%00"),
    ("line feed", b"/api/chat%0A"),
    ("unit separator", b"/a%1Fb"),
    ("DEL", b"/a%7f"),
    ("not UTF-8", b"/api/%ff"),
    ("truncated UTF-8", b"/caf%C3"),
    ("UTF-8 surrogate", b"/%ED%A0%80"),
    ("overlong UTF-8", b"/%C0%AF"),
    ("dot-dot above the root", b"/.."),
    ("dot-dot above the root, later", b"/a/../../b"),
    ("encoded dot-dot above the root", b"/%2e%2e/v1.0/backends"),
    ("dot-dot above the root through an encoded slash", b"/a%2F..%2F..%2Fb"),
]


@pytest.mark.parametrize(("given", "expected"), [c[1:] for c in NORMAL], ids=[c[0] for c in NORMAL])
def test_a_path_is_decoded_normalised_and_re_encoded(given: bytes, expected: bytes) -> None:
    assert normalize_target(given)[1] == expected
    assert normalize_target(expected)[1] == expected


@pytest.mark.parametrize("path", [c[1] for c in BAD], ids=[c[0] for c in BAD])
def test_a_path_that_cannot_be_decoded_or_climbs_above_the_root_is_refused(path: bytes) -> None:
    with pytest.raises(PathError):
        normalize_target(path)[1]


@pytest.mark.parametrize(
    "path",
    [b"/", b"/api/chat", b"/v1/chat/completions", b"/v1.0/backends/gpu1", b"/api/blobs/sha256:ab"],
)
def test_the_common_path_is_returned_as_it_is(path: bytes) -> None:
    """No ``%``, ``//`` or ``/.``: nothing to do, and nothing is done (the hot path)."""
    assert normalize_target(path) == (path, path)
    assert normalize_target(path)[0] is path
    uri, normal = normalize_target(path + b"?x=1")
    assert (uri, normal) == (path + b"?x=1", path)


@pytest.mark.parametrize(
    ("target", "uri", "path"),
    [
        (b"/api/%63hat?x=%2F&y=a//b/../c", b"/api/chat?x=%2F&y=a//b/../c", b"/api/chat"),
        (b"//v1.0/backends?force=true", b"/v1.0/backends?force=true", b"/v1.0/backends"),
        (b"/a/..?", b"/?", b"/"),
        (b"/a?b?%zz", b"/a?b?%zz", b"/a"),
        (b"/a/./b", b"/a/b", b"/a/b"),
    ],
)
def test_a_target_keeps_its_query_exactly_as_received(
    target: bytes, uri: bytes, path: bytes
) -> None:
    assert normalize_target(target) == (uri, path)


def test_an_error_names_what_is_wrong() -> None:
    with pytest.raises(PathError, match="percent"):
        normalize_target(b"/%zz")[1]
    with pytest.raises(PathError, match="UTF-8"):
        normalize_target(b"/%ff")[1]
    with pytest.raises(PathError, match="control"):
        normalize_target(b"/%00")[1]
    with pytest.raises(PathError, match="root"):
        normalize_target(b"/..")[1]


# -- properties ------------------------------------------------------------------------------------

#: Pieces a hostile path is made of: separators, dots raw and encoded, escapes good and bad.
PIECES = [
    b"/", b"//", b".", b"..", b"%2e", b"%2E", b"%2f", b"%2F", b"%25", b"%252F", b"%41", b"%7e",
    b"%C3%A9", b"%c3", b"%ff", b"%00", b"%7F", b"%zz", b"%4", b"%", b"%20", b"%3F", b"%23",
    b"a", b"api", b"chat", b"v1.0", b":", b"@", b"~", b"!", b"+", b"{", b"\\",
]  # fmt: skip

#: Pieces joined after a leading slash.
pieced = st.lists(st.sampled_from(PIECES), max_size=12).map(lambda parts: b"/" + b"".join(parts))
#: Any bytes at all, percent-encoded into a path (with some characters left raw).
encoded = st.tuples(st.binary(max_size=24), st.sampled_from(["/", "/.", "/.%:@", ""])).map(
    lambda pair: b"/" + quote_from_bytes(pair[0], safe=pair[1]).encode()
)

#: What a normalised path is made of: "/" and path-segment characters, escapes upper-case.
_VALID = re.compile(rb"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-F]{2})*\Z")


@settings(max_examples=500)
@given(st.one_of(pieced, encoded))
@example(b"/%2e%2e%2f")
@example(b"/a/%2e/")
@example(b"/%25%32%46")
def test_normalising_is_idempotent_and_leaves_no_empty_or_dot_segment(path: bytes) -> None:
    try:
        normal = normalize_target(path)[1]
    except PathError:
        return
    assert normalize_target(normal)[1] == normal
    assert normal.startswith(b"/")
    if b"%" in path or b"//" in path or b"/." in path:
        assert _VALID.match(normal), normal
    assert b"//" not in normal, normal
    for bad in (b"/./", b"/../"):
        assert bad not in normal + b"/", normal  # the "+" catches a dot segment at the end
    decoded = unquote_to_bytes(normal)
    assert not re.search(rb"[\x00-\x1f\x7f]", decoded), normal
    decoded.decode("utf-8")


#: Targets made of the characters that matter to :data:`PLAIN_TARGET`, and a few it refuses.
targets = st.lists(
    st.sampled_from([b"/", b".", b"%", b"?", b"a", b"~", b"#", b" ", b"\x7f", b"\xc3", b""]),
    max_size=10,
).map(b"".join)


@given(st.one_of(targets, targets.map(lambda t: b"/" + t)))
@example(b"/")
@example(b"/?")
@example(b"/a/?/./")
def test_plain_target_matches_exactly_the_targets_normalising_leaves_alone(target: bytes) -> None:
    path = target.partition(b"?")[0]
    visible = all(0x21 <= c <= 0x7E for c in target)
    untouched = b"%" not in path and b"//" not in path and b"/." not in path
    expected = visible and target.startswith(b"/") and untouched
    assert bool(PLAIN_TARGET.match(target)) == expected
    if expected:
        assert normalize_target(target) == (target, path)
