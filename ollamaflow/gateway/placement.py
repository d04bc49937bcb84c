"""Where models live, for frontends balancing ``ModelAware``: which backends hold a model warm,
which could load it into free VRAM, which would have to evict an idle model first, and which
must not load it at all (the load would evict a model that requests are using or waiting for).

A cold load costs seconds and may push out a model another request needs, so a request goes
to a warm copy when one exists and waits in the queue for a warm slot rather than load a second
copy. More copies are chosen one at a time (:meth:`Placement.next_move`, carried out by the
preloader) from each model's demand (:class:`Demand`): for the model asked for most per copy,
into free VRAM while its copies are busy or its requests wait, and in place of an idle copy of
a model with less demand per copy once its queue is long and the shift has lasted. What a box
holds is the inventory's ``/api/ps`` reading corrected by what this gateway sent since (loads it
started, evictions they must have caused), until the next reading. Decisions only: no I/O here.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Any, Protocol

import attrs
import orjson

from ollamaflow import modelnames
from ollamaflow.records import Backend
from ollamaflow.runtime import Runtime

#: Seconds a load this gateway started counts as there without ``/api/ps`` showing it yet.
LOAD_HORIZON = 120.0
#: A model asked for at least this often (requests in the last minute) is kept loaded longer.
HOT_PER_MINUTE = 2.0
#: Earlier turns of a conversation looked for: the previous turn usually ended two messages ago.
TURNS_BACK = 4
#: Seconds over which a model's demand (requests in flight and waiting) is smoothed.
DEMAND_HORIZON = 30.0
#: A copy replaces another model's only when its model's demand per copy is this many times
#: the other's per remaining copy: moves that merely even out noise would thrash.
MOVE_MARGIN = 1.25
#: Requests in flight and waiting per copy at which a model gets another copy in free VRAM.
FILL_PER_COPY = 1.0
#: Smoothed demand below which a model counts as unused: its last copy may then be evicted.
UNUSED = 0.05
#: Models whose demand is remembered (names come from clients).
DEMAND_KEYS = 4096


class Fit(IntEnum):
    """What sending a model to a backend means, best first."""

    WARM = 0  #: loaded there (or being loaded): no load at all
    FREE = 1  #: fits in its free VRAM: a load that evicts nothing
    EVICT = 2  #: a load that evicts idle models only
    BLOCKED = 3  #: would evict a model with requests in flight or waiting: never


class Inventory(Protocol):
    """What placement reads of the model inventory (``/api/tags`` and ``/api/ps``)."""

    def entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]: ...

    def loaded_entries(self, backend_id: str) -> Mapping[str, dict[str, Any]]: ...


model_key = modelnames.comparable


def _bytes(entry: Mapping[str, Any]) -> int:
    for field in ("size_vram", "size"):
        value = entry.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


@attrs.define
class PlacementStats:
    """What placement did on one backend, for ``/metrics`` and the health records."""

    loads: int = 0
    evictions: int = 0
    preloads: int = 0
    affinity_hits: int = 0

    def to_wire(self) -> dict[str, int]:
        return {
            "Loads": self.loads,
            "Evictions": self.evictions,
            "Preloads": self.preloads,
            "AffinityHits": self.affinity_hits,
        }

    @classmethod
    def total(cls, stats: Iterable[PlacementStats]) -> PlacementStats:
        """The counts summed over ``stats`` (every backend's)."""
        total = cls()
        for one in stats:
            total.loads += one.loads
            total.evictions += one.evictions
            total.preloads += one.preloads
            total.affinity_hits += one.affinity_hits
        return total


@attrs.define
class _Box:
    """What this gateway knows of one backend's VRAM beyond the last ``/api/ps`` reading."""

    #: Loads it started: model key → when.
    loading: dict[str, float] = attrs.field(factory=dict)
    #: Models its loads must have evicted: model key → when.
    evicted: dict[str, float] = attrs.field(factory=dict)
    #: When each model was last sent a request here (least recently used goes first).
    used: dict[str, float] = attrs.field(factory=dict)
    #: The most bytes seen loaded at once: its capacity, when the backend does not say.
    seen_bytes: int = 0


@attrs.frozen
class Move:
    """A preload to start: ``key`` onto ``backend``, evicting ``victims`` (idle ones)."""

    backend: Backend
    key: str
    victims: tuple[str, ...] = ()


@attrs.define
class Demand:
    """Per model: requests in flight and waiting (the latest count, and its exponential
    average over :data:`DEMAND_HORIZON` seconds, so a burst is seen at once and fades), and
    requests asked per second, averaged the same way. The count says where requests wait
    (it grows with the wait); the rate says how demand divides between models (it does not)."""

    horizon: float = DEMAND_HORIZON
    _level: dict[str, float] = attrs.field(factory=dict)
    _current: dict[str, float] = attrs.field(factory=dict)
    _asked: dict[str, int] = attrs.field(factory=dict)
    _rate: dict[str, float] = attrs.field(factory=dict)
    _at: float | None = None

    def asked(self, key: str) -> None:
        """One more request for ``key``."""
        asked = self._asked
        if key in asked or len(asked) < DEMAND_KEYS:
            asked[key] = asked.get(key, 0) + 1

    def sample(self, now: float, current: Mapping[str, float]) -> None:
        """Fold in the counts at ``now`` (a model missing from ``current`` counts 0), and the
        requests asked since the last sample."""
        elapsed = None if self._at is None else now - self._at
        if elapsed is not None and elapsed <= 0:
            return
        self._at = now
        weight = 1.0 if elapsed is None else 1 - math.exp(-elapsed / self.horizon)
        _fold(self._level, current, weight)
        self._current = {k: n for k, n in current.items() if n}
        if elapsed is not None:
            per_second = {k: n / elapsed for k, n in self._asked.items()}
            _fold(self._rate, per_second, weight)
        self._asked = {}

    def of(self, key: str) -> float:
        """The larger of the latest count and the average: what the copies must serve."""
        return max(self._level.get(key, 0.0), self._current.get(key, 0.0))

    def smoothed(self, key: str) -> float:
        return self._level.get(key, 0.0)

    def rate(self, key: str) -> float:
        """Requests asked per second, averaged."""
        return self._rate.get(key, 0.0)


def _fold(average: dict[str, float], latest: Mapping[str, float], weight: float) -> None:
    """Move each ``average`` towards ``latest`` (0 where it has none) by ``weight``; values
    that faded to nearly nothing go, and at most :data:`DEMAND_KEYS` are kept."""
    for key in list(average):
        average[key] += weight * (latest.get(key, 0) - average[key])
        if average[key] < UNUSED / 10 and not latest.get(key):
            del average[key]
    for key, value in latest.items():
        if key not in average and value and len(average) < DEMAND_KEYS:
            average[key] = weight * value


@attrs.frozen
class Conversation:
    """A chat's messages as digests of its prefixes: ``prefixes[k]`` stands for the first
    ``k + 1`` messages. Never the text."""

    prefixes: tuple[bytes, ...]


def conversation_of(document: Mapping[str, Any]) -> Conversation | None:
    """The conversation a chat request continues (Ollama's and OpenAI's ``messages``)."""
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    prefixes = []
    digest = b""
    for message in messages:
        try:
            encoded = orjson.dumps(message, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            return None
        digest = hashlib.blake2b(digest + encoded, digest_size=16).digest()
        prefixes.append(digest)
    return Conversation(tuple(prefixes))


@attrs.define
class Conversations:
    """Which backend served the latest turn of recent conversations: at most ``limit``
    prefixes, the least recently used forgotten first (clients choose them)."""

    limit: int = 100_000
    _served: OrderedDict[bytes, str] = attrs.field(factory=OrderedDict)

    def previous(self, conversation: Conversation) -> str | None:
        """The backend that served an earlier turn of ``conversation``, the latest first."""
        prefixes = conversation.prefixes
        served = self._served
        for length in range(len(prefixes) - 1, max(0, len(prefixes) - 1 - TURNS_BACK), -1):
            found = served.get(prefixes[length - 1])
            if found is not None:
                return found
        return None

    def served(self, conversation: Conversation, backend: str) -> None:
        served = self._served
        key = conversation.prefixes[-1]
        served[key] = backend
        served.move_to_end(key)
        if len(served) > self.limit:
            served.popitem(last=False)

    def forget_backends(self, kept: Callable[[str], bool]) -> None:
        for key in [k for k, b in self._served.items() if not kept(b)]:
            del self._served[key]

    def __len__(self) -> int:
        return len(self._served)


@attrs.define
class Placement:
    """The placement decisions of ``ModelAware`` frontends, and what they remember."""

    inventory: Inventory
    runtime: Runtime
    seconds: Callable[[], float]
    #: Requests waiting in the queues for a model, by :func:`model_key`.
    waiting: Callable[[str], int] = lambda _: 0
    #: Requests waiting for a model that call for a preload onto free VRAM.
    preload_queue_depth: int = 1
    #: Requests waiting for a model that let a preload evict an idle copy of another model.
    evict_queue_depth: int = 2
    demand: Demand = attrs.field(factory=Demand)
    conversations: Conversations = attrs.field(factory=Conversations)
    stats: dict[str, PlacementStats] = attrs.field(factory=dict)
    _boxes: dict[str, _Box] = attrs.field(factory=dict)
    #: Requests per model key: (the minute counted, its count, the minute before's), the
    #: least recently asked for first (model names come from clients: 4096 are kept).
    _per_minute: OrderedDict[str, tuple[int, int, int]] = attrs.field(factory=OrderedDict)

    # -- what a backend holds -------------------------------------------------------------------

    def loaded(self, backend_id: str) -> dict[str, int]:
        """Model key → bytes in VRAM: the last reading, with the loads started since and
        without what they evicted."""
        box = self._boxes.get(backend_id)
        held = {k: _bytes(e) for k, e in self.inventory.loaded_entries(backend_id).items()}
        if box is None:
            return held
        for key in box.evicted:
            held.pop(key, None)
        for key in box.loading:
            held.setdefault(key, self.size(backend_id, key))
        return held

    def holds(self, backend_id: str, key: str) -> bool:
        """Whether ``key`` is in :meth:`loaded` of the backend, without building it."""
        box = self._boxes.get(backend_id)
        if box is not None:
            if key in box.loading:
                return True
            if key in box.evicted:
                return False
        return key in self.inventory.loaded_entries(backend_id)

    def size(self, backend_id: str, key: str) -> int:
        """A model's bytes on a backend (its ``/api/tags`` size), 0 when unknown."""
        entry = self.inventory.entries(backend_id).get(key)
        return _bytes(entry) if entry is not None else 0

    def capacity(self, backend: Backend, held: Mapping[str, int]) -> int:
        """``VramBytes`` if set, else the most seen loaded at once (a lower bound)."""
        if backend.vram_bytes:
            return backend.vram_bytes
        box = self._boxes.get(backend.identifier)
        seen = box.seen_bytes if box is not None else 0
        return max(seen, sum(held.values()))

    def fit(
        self, backend: Backend, key: str, copies: Mapping[str, int] | None = None
    ) -> tuple[Fit, list[str]]:
        """What loading model ``key`` on ``backend`` would mean, and the models it would
        evict (least recently used idle ones); ``copies``: :meth:`copy_counts`, if at hand."""
        held = self.loaded(backend.identifier)
        if key in held:
            return Fit.WARM, []
        capacity = self.capacity(backend, held)
        used = sum(held.values())
        need = self.size(backend.identifier, key)
        if not held or used + need <= capacity:
            return Fit.FREE, []
        box = self._boxes.get(backend.identifier)
        last_used = box.used if box is not None else {}
        active = self._active_keys(backend.identifier)
        idle = [k for k in held if not active.get(k) and not self.waiting(k)]
        if copies is None:
            copies = self.copy_counts()
        # A model loaded elsewhere too goes before the last copy of one (which the next
        # request for it would have to load again); then the least demand per copy left,
        # then the least recently used.
        idle.sort(key=lambda k: (*self._keep(k, copies), last_used.get(k, 0.0)))
        victims: list[str] = []
        for victim in idle:
            victims.append(victim)
            used -= held[victim]
            if used + need <= capacity:
                return Fit.EVICT, victims
        return Fit.BLOCKED, []

    def _keep(self, key: str, copies: Mapping[str, int]) -> tuple[bool, float]:
        """What a copy of ``key`` is worth keeping, least first: whether it is the last one,
        and its model's demand per copy that would be left."""
        count = copies.get(key, 0)
        return count <= 1, self.demand.smoothed(key) / max(count - 1, 1)

    def copy_counts(self) -> dict[str, int]:
        """Model key → the backends known to hold it (loaded or loading)."""
        counts: dict[str, int] = {}
        for backend_id in self._boxes:
            for key in self.loaded(backend_id):
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _active_keys(self, backend_id: str) -> dict[str, int]:
        state = self.runtime.states.get(backend_id)
        if state is None or not state.active_by_model:
            return {}
        return {model_key(m): n for m, n in state.active_by_model.items()}

    # -- the order of candidates ----------------------------------------------------------------

    def order(
        self,
        ordered: Sequence[Backend],
        model: str,
        conversation: Conversation | None = None,
        has_slot: Callable[[Backend], bool] = lambda _: True,
    ) -> list[Backend]:
        """The candidates to try for ``model``, balanced order ``ordered`` kept among equals:
        the backend that served the conversation's previous turn if warm and free, then the
        warm ones; cold ones only when no copy is warm (free VRAM first, then those evicting
        the idlest models). Empty: wait in the queue."""
        key = model_key(model)
        self._count_per_minute(key)
        self.demand.asked(key)
        warm: list[Backend] = []
        cold: list[Backend] = []
        for backend in ordered:
            (warm if self.holds(backend.identifier, key) else cold).append(backend)
        if warm and conversation is not None:
            previous = self.conversations.previous(conversation)
            for i, backend in enumerate(warm):
                if backend.identifier == previous and has_slot(backend):
                    warm.insert(0, warm.pop(i))
                    self._stats(backend.identifier).affinity_hits += 1
                    break
        if warm:
            return warm  # the common case: no load to plan
        return self._cold_order(cold, key)

    def _cold_order(self, cold: Sequence[Backend], key: str) -> list[Backend]:
        """Backends ``key`` would be loaded on: free VRAM first, then those whose evictions
        cost least; never one whose load would evict a model in use or waited for."""
        copies = self.copy_counts()
        free: list[Backend] = []
        evicting: list[tuple[tuple[int, float, float], Backend]] = []
        for backend in cold:
            fit, victims = self.fit(backend, key, copies)
            if fit is Fit.FREE:
                free.append(backend)
            elif fit is Fit.EVICT:
                cost = self._eviction_cost(backend.identifier, victims, copies)
                evicting.append((cost, backend))
        evicting.sort(key=lambda pair: pair[0])
        return [*free, *(b for _, b in evicting)]

    def admissible(self, candidates: Sequence[Backend], model: str) -> list[Backend]:
        """The candidates a request for ``model`` may be sent to now (one waiting in the
        queue, or retried): the warm ones; when none is, those a load the order would allow."""
        key = model_key(model)
        warm = [b for b in candidates if self.holds(b.identifier, key)]
        if warm or not candidates:
            return warm
        copies = self.copy_counts()
        return [b for b in candidates if self.fit(b, key, copies)[0] is not Fit.BLOCKED]

    def _eviction_cost(
        self, backend_id: str, victims: Sequence[str], copies: Mapping[str, int]
    ) -> tuple[int, float, float]:
        """What evicting ``victims`` costs, least first: last copies of a model evicted, the
        demand per copy left of their models, how lately the latest used of them was."""
        box = self._boxes.get(backend_id)
        keeps = [self._keep(v, copies) for v in victims]
        last_copies = sum(1 for last, _ in keeps if last)
        demand = sum(per_copy for _, per_copy in keeps)
        if box is None or not victims:
            return last_copies, demand, 0.0
        return last_copies, demand, max(box.used.get(v, 0.0) for v in victims)

    # -- more copies ----------------------------------------------------------------------------

    def next_move(
        self,
        candidates: Mapping[str, Sequence[Backend]],
        waiting: Mapping[str, int],
        busy: Collection[str] = (),
    ) -> Move | None:
        """The one preload to start now, if any: one more copy of the model asked for most
        per copy (then with the most requests per copy), onto one of its ``candidates`` (model
        key → backends, tried in the order given) not ``busy`` loading another:

        - into free VRAM while one more copy would still serve :data:`FILL_PER_COPY`
          requests or more, or its requests ``waiting`` reach :attr:`preload_queue_depth` (a
          copy loading takes requests at once, so these are the ones no copy will serve
          soon);
        - once they reach :attr:`evict_queue_depth` and no candidate has free VRAM for it,
          in place of idle copies of models with at most 1 / :data:`MOVE_MARGIN` of its
          smoothed demand per copy (a last copy only if unused).

        One at a time, so each copy goes where the demand is once the last one is counted:
        the greedy rule that deals copies in proportion to demand."""
        copies = self.copy_counts()
        demand = self.demand

        def need(key: str) -> tuple[float, float]:
            held = max(copies.get(key, 0), 1)
            return demand.rate(key) / held, demand.of(key) / held

        for key in sorted(candidates, key=need, reverse=True):
            queued = waiting.get(key, 0)
            held = copies.get(key, 0)
            fill = queued >= self.preload_queue_depth or (
                held > 0 and demand.of(key) / (held + 1) >= FILL_PER_COPY
            )
            if not fill:
                continue
            replace = queued >= self.evict_queue_depth
            move = self._move(key, candidates[key], copies, replace, busy)
            if move is not None:
                return move
        return None

    def _move(
        self,
        key: str,
        backends: Sequence[Backend],
        copies: Mapping[str, int],
        replace: bool,
        busy: Collection[str],
    ) -> Move | None:
        """Where one more copy of ``key`` goes, if anywhere: free VRAM first (none while the
        free VRAM is on a backend busy loading: it comes next), else (if ``replace``) the
        cheapest replacement the margin allows for its smoothed demand per copy (a burst is
        over before a replacement loads; free VRAM costs nothing to fill)."""
        sustained = self.demand.smoothed(key) / max(copies.get(key, 0), 1)
        replacing: list[tuple[tuple[int, float, float], Move]] = []
        free_but_busy = False
        for backend in backends:
            fit, victims = self.fit(backend, key, copies)
            if fit is Fit.FREE:
                if backend.identifier not in busy:
                    return Move(backend, key)
                free_but_busy = True
            if fit is not Fit.EVICT or not replace or backend.identifier in busy:
                continue
            if all(self._may_replace(v, copies, sustained) for v in victims):
                cost = self._eviction_cost(backend.identifier, victims, copies)
                replacing.append((cost, Move(backend, key, tuple(victims))))
        if free_but_busy or not replacing:
            return None
        return min(replacing, key=lambda pair: pair[0])[1]

    def _may_replace(self, victim: str, copies: Mapping[str, int], sustained: float) -> bool:
        last, per_copy_left = self._keep(victim, copies)
        if last:
            return self.demand.smoothed(victim) < UNUSED
        return sustained >= MOVE_MARGIN * per_copy_left

    # -- what happened --------------------------------------------------------------------------

    def sent(self, backend: Backend, model: str, *, preload: bool = False) -> None:
        """A request for ``model`` was given a slot of ``backend`` (or a preload sent): a load
        if it was not warm there, and the evictions that load makes."""
        key = model_key(model)
        now = self.seconds()
        fit, victims = self.fit(backend, key)
        box = self._box(backend.identifier)
        box.used[key] = now
        if fit is Fit.WARM:
            return
        stats = self._stats(backend.identifier)
        stats.loads += 1
        if preload:
            stats.preloads += 1
        box.loading[key] = now
        box.evicted.pop(key, None)
        for victim in victims:
            box.evicted[victim] = now
            stats.evictions += 1

    def served(self, conversation: Conversation, backend: Backend) -> None:
        """A turn of ``conversation`` went to ``backend``."""
        self.conversations.served(conversation, backend.identifier)

    def refreshed(self, backend_id: str) -> None:
        """An inventory listener: the backend's models were read; what the reading shows
        replaces what was assumed, except loads too recent to show yet."""
        box = self._box(backend_id)
        loaded = self.inventory.loaded_entries(backend_id)
        now = self.seconds()
        box.loading = {
            k: t for k, t in box.loading.items() if k not in loaded and now - t < LOAD_HORIZON
        }
        box.evicted = {}
        box.seen_bytes = max(box.seen_bytes, sum(_bytes(e) for e in loaded.values()))

    def forget_all_but(self, backends: Iterable[str]) -> None:
        """Deleted backends go."""
        kept = set(backends)
        for gone in [b for b in self._boxes if b not in kept]:
            del self._boxes[gone]
        for gone in [b for b in self.stats if b not in kept]:
            del self.stats[gone]
        self.conversations.forget_backends(kept.__contains__)

    def is_hot(self, model: str) -> bool:
        """Asked for often enough in the last minute to be kept loaded longer."""
        found = self._per_minute.get(model_key(model))
        if found is None:
            return False
        now = self.seconds()
        minute, current, previous = found
        into = now / 60 - minute  # how far into its minute the latest count is
        if into >= 2:
            return False
        if into >= 1:  # the current count is last minute's now
            previous, current, into = current, 0, into - 1
        return previous * (1 - into) + current >= HOT_PER_MINUTE

    def _count_per_minute(self, key: str) -> None:
        """One more request for ``key``, counted per minute (this one and the one before)."""
        minute = int(self.seconds() // 60)
        demand = self._per_minute
        found = demand.get(key)
        if found is None or found[0] < minute - 1:
            demand[key] = (minute, 1, 0)
        elif found[0] == minute - 1:
            demand[key] = (minute, 1, found[1])
        else:
            demand[key] = (minute, found[1] + 1, found[2])
        demand.move_to_end(key)
        if len(demand) > 4096:
            demand.popitem(last=False)

    def _box(self, backend_id: str) -> _Box:
        box = self._boxes.get(backend_id)
        if box is None:
            box = self._boxes[backend_id] = _Box()
        return box

    def _stats(self, backend_id: str) -> PlacementStats:
        stats = self.stats.get(backend_id)
        if stats is None:
            stats = self.stats[backend_id] = PlacementStats()
        return stats
