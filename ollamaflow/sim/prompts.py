"""Prompts as a slot's KV cache sees them: one hash and one token estimate per message.

Only hashes are kept, never text. Ollama reuses the longest cached token prefix; the simulator
reuses whole messages that are equal and in the same order, which is what a multi-turn chat shares
with its previous turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate

import attrs

from ollamaflow.sim.content import count_tokens

MESSAGE_OVERHEAD = 4
"""Template tokens around each message (role header, end of turn), as llama3's template adds."""


@attrs.frozen
class Prompt:
    """A request's prompt: a key per message and the prompt tokens up to the end of each."""

    keys: tuple[int, ...]
    ends: tuple[int, ...]
    """Cumulative token counts: `ends[i]` tokens cover messages 0..i."""

    @property
    def total(self) -> int:
        """Every prompt token (at least one, as Ollama always evaluates one)."""
        return max(1, self.ends[-1]) if self.ends else 1

    def cached_tokens(self, shared: int) -> int:
        """Tokens a cache sharing the first `shared` messages saves; when the whole prompt is
        cached one token is still evaluated (Ollama leaves one input to sample)."""
        if shared <= 0:
            return 0
        return min(self.ends[shared - 1], self.total - 1)


def message_key(role: object, content: object) -> int:
    """The hash of one message (role and content)."""
    if isinstance(role, str | None) and isinstance(content, str | None):
        return hash((role, content))
    return hash(repr((role, content)))


def reply_key(text: str) -> int:
    """The key of the assistant message a client sends back after a reply of `text`."""
    return hash(("assistant", text))


def _prompt(items: Iterable[tuple[int, int]]) -> Prompt:
    pairs = list(items)
    keys = tuple(key for key, _ in pairs)
    ends = tuple(accumulate(tokens for _, tokens in pairs))
    return Prompt(keys=keys, ends=ends)


def _message_tokens(content: object) -> int:
    text = count_tokens(content) if isinstance(content, str) else 0
    return text + MESSAGE_OVERHEAD


def of_messages(messages: Sequence[object]) -> Prompt:
    """A chat's prompt: each message (a non-object counts as an empty one)."""
    items = []
    for message in messages:
        if isinstance(message, dict):
            role, content = message.get("role"), message.get("content")
            items.append((message_key(role, content), _message_tokens(content)))
        else:
            items.append((message_key(None, repr(message)), MESSAGE_OVERHEAD))
    return _prompt(items)


def of_text(prompt: str, system: str = "") -> Prompt:
    """A generate's (or completion's) prompt: the system prompt, if any, then the prompt."""
    items = []
    if system:
        items.append((message_key("system", system), _message_tokens(system)))
    items.append((message_key("user", prompt), _message_tokens(prompt)))
    return _prompt(items)


def shared_messages(cached: tuple[int, ...], keys: tuple[int, ...]) -> int:
    """How many leading messages two key sequences have in common."""
    shared = 0
    for mine, theirs in zip(cached, keys, strict=False):
        if mine != theirs:
            break
        shared += 1
    return shared
