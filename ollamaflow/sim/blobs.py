"""Blobs a simulator holds: what `POST /api/blobs/:digest` stored, kept as digest, size and magic.

The bytes themselves are never kept: an upload is hashed as it is read and only its digest, its
size and its first four bytes (to tell a GGUF file as Ollama does) are remembered.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Generator, Iterator
from typing import IO

import attrs

INVALID_DIGEST = "invalid digest format"
"""Ollama's answer for a digest that is not `sha256:` (or `sha256-`) and 64 hex digits."""
MODELS_DIR = "/root/.ollama/models"
"""Where Ollama keeps models when run as root; its file errors name paths under it."""
GGUF_MAGIC = b"GGUF"
HASH_CHUNK = 4 << 20
"""Bytes hashed per reactor turn: a few milliseconds of work."""
MAX_BLOBS = 65_536
"""Uploads remembered; the oldest are forgotten beyond this."""

_DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}\Z")


def valid_digest(digest: str) -> bool:
    """Whether `digest` names a blob: Ollama accepts `sha256:` or `sha256-` and 64 hex digits."""
    return _DIGEST.match(digest) is not None


def blob_key(digest: str) -> str:
    """The one spelling of a valid digest: `sha256-…` and `sha256:…` are the same file in
    Ollama's blob directory (whose names keep the hex digits' case)."""
    return "sha256:" + digest[7:]


def blob_path(digest: str) -> str:
    """The file Ollama would open for a digest, as its error messages name it."""
    return f"{MODELS_DIR}/blobs/{digest.replace(':', '-')}"


def missing_file(path: str) -> str:
    """Go's error for opening a file that is not there."""
    return f"open {path}: no such file or directory"


@attrs.frozen
class Blob:
    """An uploaded blob: its digest (`sha256:` + lower-case hex), size and first bytes."""

    digest: str
    size: int
    magic: bytes = b""

    @property
    def gguf(self) -> bool:
        """Whether the bytes start as a GGUF file does (Ollama's content-type check)."""
        return self.magic == GGUF_MAGIC


@attrs.define
class BlobStore:
    """Uploaded blobs by digest, oldest first, at most `limit` of them."""

    limit: int = MAX_BLOBS
    _blobs: OrderedDict[str, Blob] = attrs.Factory(OrderedDict)

    def __contains__(self, digest: str) -> bool:
        return digest in self._blobs

    def __iter__(self) -> Iterator[Blob]:
        return iter(list(self._blobs.values()))

    def __len__(self) -> int:
        return len(self._blobs)

    def get(self, digest: str) -> Blob | None:
        """The blob stored under this (valid, `blob_key`) digest."""
        return self._blobs.get(digest)

    def add(self, blob: Blob) -> None:
        """Remember a blob, forgetting the oldest beyond the limit."""
        self._blobs[blob.digest] = blob
        while len(self._blobs) > self.limit:
            self._blobs.popitem(last=False)

    def discard(self, digest: str) -> None:
        """Forget a blob (a deleted model's layer nothing else uses)."""
        self._blobs.pop(digest, None)


def hash_stream(body: IO[bytes]) -> Generator[None, None, Blob]:
    """Hash `body` from its start, one `HASH_CHUNK` per step; the generator's value is the blob.

    Each `yield` is a point where the caller may let the reactor run before the next chunk.
    """
    body.seek(0)
    sha = hashlib.sha256()
    size = 0
    magic = b""
    chunk = body.read(HASH_CHUNK)
    while chunk:
        if len(magic) < 4:
            magic = (magic + chunk[: 4 - len(magic)])[:4]
        sha.update(chunk)
        size += len(chunk)
        chunk = body.read(HASH_CHUNK)
        if chunk:
            yield None
    return Blob(digest=f"sha256:{sha.hexdigest()}", size=size, magic=magic)
