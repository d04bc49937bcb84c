"""Choosing a backend: candidates, round robin or random order, and sticky sessions."""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import overload

import attrs

from ollamaflow.catalog import Catalog
from ollamaflow.gateway.classify import RequestClass
from ollamaflow.gateway.clienterrors import quoted
from ollamaflow.records import Backend, Frontend, LoadBalancing
from ollamaflow.runtime import Runtime


@attrs.frozen
class NoCandidate:
    """Why a frontend has nobody to send a request to; the message names the frontend."""

    message: str


def candidates(
    catalog: Catalog,
    runtime: Runtime,
    frontend: Frontend,
    request_class: RequestClass,
    label: str | None,
) -> list[Backend] | NoCandidate:
    """The frontend's backends that are active, healthy, allow the class and carry the label;
    those that just failed a request (suspect) only when no other is left."""
    found: list[Backend] = []
    suspects: list[Backend] = []
    configured = healthy = allowing = 0
    states = runtime.states
    for identifier in frontend.backends:
        backend = catalog.backends.get(identifier)
        if backend is None or not backend.active:  # a missing one: served once it is created
            continue
        configured += 1
        state = states.get(identifier)
        if state is None or not state.healthy:
            continue
        healthy += 1
        if (request_class is RequestClass.EMBEDDINGS and not backend.allow_embeddings) or (
            request_class is RequestClass.COMPLETIONS and not backend.allow_completions
        ):
            continue
        allowing += 1
        if label is not None and label not in backend.labels:
            continue
        (suspects if state.suspect else found).append(backend)
    if found or suspects:
        return found or suspects
    name = f"frontend {frontend.identifier!r}"
    if not configured:
        missing = catalog.missing_backends(frontend)
        if missing:
            names = ", ".join(quoted(b) for b in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            return NoCandidate(
                f"{name} has no active backends; these do not exist (yet): {names}{more}"
            )
        return NoCandidate(f"{name} has no active backends")
    if not healthy:
        return NoCandidate(f"{name}: none of its {configured} backends is healthy")
    if not allowing:
        return NoCandidate(f"{name}: no healthy backend allows {request_class.value} requests")
    return NoCandidate(f"{name}: no healthy backend has the label {quoted(label or '')}")


#: Sticky pins kept at most, over all frontends; beyond it the least recently used goes.
MAX_PINS = 100_000


def _client_key(client: bytes) -> bytes:
    """A client id as a fixed 16 bytes: a header value may be 60 KB, a pin's key is not."""
    return hashlib.blake2b(client, digest_size=16).digest()


@attrs.define
class StickyPins:
    """Client → backend pins per frontend, with a sliding expiry; at most ``limit`` of them,
    the least recently used evicted first (clients choose the ids: memory must be bounded)."""

    limit: int = MAX_PINS
    #: In least recently pinned order (a pin moves to the end when renewed). An OrderedDict:
    #: a plain dict slows down finding its first entry as deletions pile up at its front.
    _pins: OrderedDict[tuple[str, bytes], tuple[str, float]] = attrs.field(factory=OrderedDict)

    def lookup(self, frontend: str, client: bytes, now: float) -> str | None:
        key = (frontend, _client_key(client))
        found = self._pins.get(key)
        if found is None:
            return None
        if found[1] <= now:
            del self._pins[key]
            return None
        return found[0]

    def pin(self, frontend: str, client: bytes, backend: str, until: float) -> None:
        pins = self._pins
        key = (frontend, _client_key(client))
        pins[key] = (backend, until)
        pins.move_to_end(key)
        if len(pins) > self.limit:
            pins.popitem(last=False)

    def sweep(self, now: float) -> int:
        """Drop expired pins; returns how many went."""
        expired = [key for key, (_, until) in self._pins.items() if until <= now]
        for key in expired:
            del self._pins[key]
        return len(expired)

    def prune(self, catalog: Catalog) -> None:
        """Drop pins whose frontend or backend is gone, or no longer lists that backend."""
        for key, (backend, _) in list(self._pins.items()):
            frontend = catalog.frontends.get(key[0])
            if frontend is None or backend not in frontend.backends:
                del self._pins[key]

    def __len__(self) -> int:
        return len(self._pins)


#: Above this many candidates LeastOutstanding compares two random ones instead of sorting all.
_POWER_OF_TWO_ABOVE = 8


@attrs.define  # not frozen: one is made per request, and frozen classes start slower
class Rotation(Sequence[Backend]):
    """``backends`` read from ``start`` round to the one before it: one request's order, made
    without copying the list (a frontend may hold a hundred backends). Never mutated."""

    backends: Sequence[Backend]
    start: int

    def __len__(self) -> int:
        return len(self.backends)

    @overload
    def __getitem__(self, index: int) -> Backend: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Backend]: ...

    def __getitem__(self, index: int | slice) -> Backend | Sequence[Backend]:
        count = len(self.backends)
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(count))]
        if not -count <= index < count:
            raise IndexError(index)
        return self.backends[(self.start + index) % count]

    def __iter__(self) -> Iterator[Backend]:
        backends, start = self.backends, self.start
        for i in range(start, len(backends)):
            yield backends[i]
        for i in range(start):
            yield backends[i]


#: How many lately finished backends each frontend remembers.
_MEMORY = 256
#: Candidate lists the balancer keeps facts about (lists come and go with the configuration).
_REMEMBERED_LISTS = 256


@attrs.frozen
class _ListFacts:
    """What the balancer needs to know about one candidate list, worked out once."""

    backends: Sequence[Backend]
    weighted: bool = attrs.field(init=False)
    places: dict[str, int] = attrs.field(init=False)

    @weighted.default
    def _any_weight(self) -> bool:
        return any(b.weight != 1 for b in self.backends)

    @places.default
    def _places(self) -> dict[str, int]:
        return {b.identifier: i for i, b in enumerate(self.backends)}


@attrs.define
class Balancer:
    """Orders candidates for one request: the chosen backend first, the rest for retries."""

    rng: random.Random = attrs.field(factory=random.Random)
    _counters: dict[str, int] = attrs.field(factory=dict)
    #: Smooth weighted round robin state (nginx's algorithm), per frontend and backend.
    _current: dict[str, dict[str, int]] = attrs.field(factory=dict)
    #: Per frontend: the backends that finished a request lately, latest last (power of two
    #: choices' memory); each new request takes the latest.
    _finished: dict[str, deque[str]] = attrs.field(factory=dict)
    #: Per candidate list (the gateway keeps each until the configuration, health or
    #: inventories change): whether any weight is not 1, and each candidate's place.
    _lists: dict[int, _ListFacts] = attrs.field(factory=dict)

    def order(
        self, frontend: Frontend, found: Sequence[Backend], load: Callable[[str], int]
    ) -> Sequence[Backend]:
        """``load`` gives a backend's requests in flight (LeastOutstanding weighs them).
        The answer may be ``found`` itself or a view of it: never mutate it."""
        count = len(found)
        if count == 1:
            return found
        policy = frontend.load_balancing
        if policy is LoadBalancing.MODEL_AWARE:  # by load; placement reorders what it must
            policy = LoadBalancing.LEAST_OUTSTANDING
        if policy is LoadBalancing.LEAST_OUTSTANDING and count > _POWER_OF_TWO_ABOVE:
            return self._two_choices(frontend, found, load)
        if policy is LoadBalancing.RANDOM:
            start = self.rng.randrange(count)
        elif policy is LoadBalancing.ROUND_ROBIN and self._facts(found).weighted:
            start = self._weighted_turn(frontend.identifier, found)
        else:
            turn = self._counters.get(frontend.identifier, 0)
            self._counters[frontend.identifier] = turn + 1
            start = turn % count
        rotated = Rotation(found, start)
        if policy is not LoadBalancing.LEAST_OUTSTANDING:
            return rotated
        # A stable sort keeps the rotation among equals: ties are broken round-robin.
        return sorted(rotated, key=lambda x: load(x.identifier) / x.weight)

    def finished(self, frontend: str, backend: Backend) -> None:
        """A request of ``frontend`` on ``backend`` ended (its slot was given back)."""
        lately = self._finished.get(frontend)
        if lately is None:
            lately = self._finished[frontend] = deque(maxlen=_MEMORY)
        lately.append(backend.identifier)

    def _two_choices(
        self, frontend: Frontend, found: Sequence[Backend], load: Callable[[str], int]
    ) -> Sequence[Backend]:
        """The less loaded of two candidates, then the ones after it (for retries): constant
        work per request however large the frontend.

        Power of two choices with memory: one candidate is drawn at random, the other is the
        backend that finished a request most lately and was not taken since (a second random
        one if there is none among the candidates), and wins a tie. It balances at least as
        well as two random draws, and a request lands where a connection was just released
        instead of on a cold one."""
        count = len(found)
        draw = self.rng.random
        i = int(draw() * count)
        j = None
        lately = self._finished.get(frontend.identifier)
        if lately:
            places = self._facts(found).places
            while lately and j is None:
                j = places.get(lately.pop())
        if j is None or j == i:
            j = int(draw() * (count - 1))
            j += j >= i
        a, b = found[i], found[j]
        k = j if load(b.identifier) / b.weight <= load(a.identifier) / a.weight else i
        return Rotation(found, k)

    def _facts(self, found: Sequence[Backend]) -> _ListFacts:
        facts = self._lists.get(id(found))
        if facts is None or facts.backends is not found:
            if len(self._lists) >= _REMEMBERED_LISTS:
                self._lists.clear()
            facts = self._lists[id(found)] = _ListFacts(found)
        return facts

    def _weighted_turn(self, frontend: str, found: Sequence[Backend]) -> int:
        current = self._current.setdefault(frontend, {})
        total = 0
        best = 0
        for i, backend in enumerate(found):
            weight = current.get(backend.identifier, 0) + backend.weight
            current[backend.identifier] = weight
            total += backend.weight
            if weight > current[found[best].identifier]:
                best = i
        current[found[best].identifier] -= total
        return best

    def forget(self, catalog: Catalog) -> None:
        for gone in [f for f in self._counters if f not in catalog.frontends]:
            del self._counters[gone]
        for gone in [f for f in self._current if f not in catalog.frontends]:
            del self._current[gone]
        for gone in [f for f in self._finished if f not in catalog.frontends]:
            del self._finished[gone]
        self._lists.clear()


def stick(ordered: Sequence[Backend], pinned: str | None) -> Sequence[Backend]:
    """Move the pinned backend to the front when it is still a candidate."""
    if pinned is None or ordered[0].identifier == pinned:
        return ordered
    for i, backend in enumerate(ordered):
        if backend.identifier == pinned:
            return [backend, *ordered[:i], *ordered[i + 1 :]]
    return ordered
