"""Deterministic fake model output: tokens, token counts and embedding vectors."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable

_WORDS = (
    "The",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "a",
    "simulated",
    "llama",
    "thinks",
    "about",
    "load",
    "balancing",
    "across",
    "a",
    "fleet",
    "of",
    "servers",
    "and",
    "answers",
    "every",
    "prompt",
    "with",
    "calm",
    "confidence",
)
TOKENS: tuple[str, ...] = tuple((word if i == 0 else " " + word) for i, word in enumerate(_WORDS))


def tokens(count: int) -> list[str]:
    """`count` text pieces that read as words; the same for every request."""
    n = len(TOKENS)
    return [TOKENS[i] if i < n else " " + _WORDS[i % n] for i in range(count)]


def count_tokens(text: str) -> int:
    """A plausible prompt token count (about four characters a token, at least one)."""
    return max(1, (len(text) + 3) // 4)


def count_message_tokens(messages: Iterable[object]) -> int:
    """Prompt tokens of a chat `messages` list, ignoring anything that is not text."""
    total = 0
    for message in messages:
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, str):
                total += count_tokens(content)
    return max(1, total)


def vector(model_key: str, text: str, dimensions: int) -> list[float]:
    """A unit-length embedding seeded by model and text: same input, same vector."""
    seed = int.from_bytes(hashlib.sha256(f"{model_key}\0{text}".encode()).digest()[:8], "big")
    rng = random.Random(seed)
    values = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 7) for v in values]
