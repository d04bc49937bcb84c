"""What the differential tests against h11 share, both directions: the deliberate differences,
how a pair of verdicts is judged, and the bytes generated messages are made of."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import attrs
from hypothesis import strategies as st

#: A parser's verdict on some bytes: ("refused" | "failed" | "complete", what it saw...).
Verdict = tuple[Any, ...]

_RANK = {"refused": 0, "failed": 1, "complete": 2}


@attrs.frozen
class Difference:
    """A deliberate difference from h11: the refusing side's reason contains one of
    ``reasons``, and the input ``shows`` what is refused."""

    why: str
    reasons: tuple[str, ...]
    shows: Any = None  # (wire: bytes) -> bool; None: the reason says enough

    def explains(self, reason: str, wire: bytes) -> bool:
        return any(r in reason for r in self.reasons) and (
            self.shows is None or bool(self.shows(wire))
        )


def search(pattern: bytes) -> Any:
    """A ``shows`` that finds ``pattern`` (a regular expression) in the input."""
    return re.compile(pattern).search


def explained(
    wire: bytes,
    ours: tuple[Verdict, str],
    theirs: tuple[Verdict, str],
    we_refuse: Sequence[Difference],
    h11_refuses: Sequence[Difference],
) -> bool:
    """Whether two verdicts differ in one of the deliberate ways: the side that got less far
    (refused the head, or the body) did so for a listed reason."""
    (our, our_why), (their, their_why) = ours, theirs
    if _RANK[our[0]] < _RANK[their[0]]:
        return any(d.explains(our_why, wire) for d in we_refuse)
    if _RANK[their[0]] < _RANK[our[0]]:
        return any(d.explains(their_why, wire) for d in h11_refuses)
    return False


#: The characters of a token (RFC 9110 5.6.2), for generated field names.
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_value_bytes = [bytes([b]) for b in range(0x21, 0x7F)] + [b" ", b"\t", b"\x80", b"\xff"]
#: Field values: visible ASCII, spaces, tabs and obs-text, up to 12 bytes.
values = st.lists(st.sampled_from(_value_bytes), max_size=12).map(b"".join)
