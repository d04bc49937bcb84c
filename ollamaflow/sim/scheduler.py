"""Ollama's scheduler in miniature: model loads, VRAM and eviction, per-model parallel slots with
prompt caches, and keep_alive expiry.

Requests for a model that is not loaded wait for its load and count against `max_queue` (beyond it:
`ServerBusy`, a 503); requests for a loaded model wait silently, without limit, for a free slot.
With `vram_bytes`, a load that does not fit evicts the least recently used idle models; when even
that is not enough it waits for busy models to go idle, and every request that comes meanwhile
waits behind it (counted against `max_queue`), as in Ollama's scheduler queue.
"""

from __future__ import annotations

import math
import re
from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ollamaflow.sim.catalog import InstalledModel
from ollamaflow.sim.config import SimConfig
from ollamaflow.sim.counters import Counters
from ollamaflow.sim.events import Events
from ollamaflow.sim.prompts import Prompt, shared_messages
from ollamaflow.sim.timefmt import FOREVER_SECONDS, rfc3339

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class ServerBusy(Exception):
    """Too many requests are waiting for model loads."""


def parse_keep_alive(value: Any, default: float, *, units_required: bool = False) -> float:
    """Seconds from a `keep_alive`: a number of seconds or a Go duration like `5m`.

    Raises `ValueError` for anything else. Negative means "forever", 0 "unload when idle"; a
    duration past Go's longest (about 292 years) is forever too. `units_required`: a string
    must be a Go duration, as in a request (Ollama's `time.ParseDuration` refuses "30").
    """
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"invalid keep_alive {value!r}")
    seconds = _duration(value, units_required) if isinstance(value, str) else float(value)
    if math.isnan(seconds):
        raise ValueError(f"invalid keep_alive {value!r}")
    return -1.0 if seconds > FOREVER_SECONDS else seconds


def _duration(value: str, units_required: bool) -> float:
    """Go's `time.ParseDuration` in seconds (or, unless `units_required`, a bare number)."""
    text = value if units_required else value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return 0.0
    if not units_required:
        try:
            return float(text)
        except ValueError:
            pass
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if body and position == 0 and _NUMBER.fullmatch(body):
        raise ValueError(f'time: missing unit in duration "{value}"')
    if not body or position != len(body) or total > FOREVER_SECONDS:
        raise ValueError(f'time: invalid duration "{value}"')
    return sign * total


class ModelTooLarge(Exception):
    """The model is larger than the whole VRAM, so it can never be loaded (a 500)."""


def human_bytes(count: int) -> str:
    """A byte count as Ollama's `format.HumanBytes2` writes it: binary units, one decimal."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def too_large_message(size: int, vram: int) -> str:
    """Ollama's answer for a model that cannot fit in the memory it has."""
    return (
        f"model requires more system memory ({human_bytes(size)})"
        f" than is available ({human_bytes(vram)})"
    )


@attrs.define(eq=False)
class _Slot:
    """One parallel slot of a loaded model and the prompt its KV cache holds (as hashes)."""

    keys: tuple[int, ...] = ()
    busy: bool = False
    used: int = 0
    """The scheduler's tick when it was last taken or given back (least recently used first)."""


@attrs.define(eq=False)
class _Waiter:
    """A request waiting for a load, a slot, or behind a load that needs room."""

    model: InstalledModel
    keep_alive: float
    arrived: float
    prompt: Prompt | None = None
    needs_slot: bool = True
    """False for a load-only request (an empty prompt): it waits for the load, not a slot."""
    deferred: Deferred[Lease] | None = None
    runner: _Runner | None = None
    """The runner it waits on; None while it waits behind a load that needs room."""
    load_duration: float = 0.0


@attrs.define(eq=False)
class _Runner:
    """One model's state: loading or loaded, its slots, its waiters and its expiry."""

    model: InstalledModel
    key: str
    keep_alive: float
    loaded: bool = False
    busy: int = 0
    load_waiters: deque[_Waiter] = attrs.Factory(deque)
    slot_waiters: deque[_Waiter] = attrs.Factory(deque)
    expires_at: float | None = None
    """Set when the model goes idle and kept while it serves, as Ollama's `expiresAt`."""
    timer: IDelayedCall | None = None
    """The pending load completion or keep_alive expiry."""
    unload_reason: str = "keep_alive"
    """Why it unloads when it goes idle with keep_alive 0 (an `Events.unloaded` reason)."""
    used: int = 0
    """The scheduler's tick when a request last started or ended here (for LRU eviction)."""
    slots: list[_Slot] = attrs.Factory(list)
    """Slots with prompt caches; only requests with a prompt to cache use them."""

    def idle(self) -> bool:
        return self.loaded and self.busy == 0 and not self.slot_waiters

    def free_slot(self, keys: tuple[int, ...], parallel: int) -> tuple[_Slot, int]:
        """The free slot whose cache shares the most leading messages with `keys` (the least
        recently used among equals), and how many it shares: Ollama's runner picks so."""
        while len(self.slots) < parallel:
            self.slots.append(_Slot())
        best: _Slot | None = None
        best_shared = -1
        for slot in self.slots:
            if slot.busy:
                continue
            shared = shared_messages(slot.keys, keys)
            if shared > best_shared or (
                shared == best_shared and best is not None and slot.used < best.used
            ):
                best, best_shared = slot, shared
        if best is None:  # num_parallel was lowered while its slots served
            best, best_shared = _Slot(), 0
            self.slots.append(best)
        return best, best_shared


@attrs.define(eq=False)
class Lease:
    """A parallel slot on a loaded model, held while a request generates; release it once."""

    _scheduler: Scheduler
    _runner: _Runner | None
    """None for a load-only request, which holds no slot."""
    load_duration: float
    """Seconds the request waited for the model to load."""
    evaluated_tokens: int | None = None
    """Prompt tokens to evaluate, those the slot's cache lacks; None: prompts are not cached."""
    _slot: _Slot | None = None
    _released: bool = False

    @property
    def caches_prompt(self) -> bool:
        """Whether the request's prompt went into a slot's cache."""
        return self._slot is not None

    def remember_reply(self, key: int) -> None:
        """Add the generated reply to the slot's cache, as Ollama keeps generated tokens."""
        if self._slot is not None and not self._released:
            self._slot.keys += (key,)

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        if not self._released:
            self._released = True
            if self._runner is not None:
                self._scheduler.release_runner(self._runner, self._slot)


@attrs.define
class Scheduler:
    """Hands out `Lease`s per model, loading, evicting and unloading models with the reactor's
    time."""

    clock: IReactorTime
    config: SimConfig
    counters: Counters
    events: Events = attrs.Factory(Events)
    _runners: dict[str, _Runner] = attrs.Factory(dict)
    """Models loading or loaded: what occupies VRAM."""
    _pending_loads: int = 0
    """Requests waiting for a load or behind one (bounded by `max_queue`)."""
    _grants: deque[tuple[Deferred[Lease], Lease]] = attrs.Factory(deque)
    _granting: bool = False
    _tick: int = 0
    _used_bytes: int = 0
    _room: _Runner | None = None
    """A load waiting for busy models to go idle so that it fits in VRAM."""
    _held: deque[_Waiter] = attrs.Factory(deque)
    """Requests that came while `_room` waits: like Ollama's queue, every request waits behind
    that load, so the busy models drain and the wait ends."""
    _making_room: bool = False

    @property
    def vram_used(self) -> int:
        """Bytes of the models loading or loaded."""
        return self._used_bytes

    def acquire(
        self,
        model: InstalledModel,
        keep_alive: float,
        prompt: Prompt | None = None,
        *,
        needs_slot: bool = True,
    ) -> Deferred[Lease]:
        """A Deferred firing with a lease (at once when a slot is free); raises `ServerBusy`, or
        `ModelTooLarge` for a model larger than the VRAM. A `prompt` takes the slot with the
        best cache; `needs_slot=False` waits only for the model to be loaded."""
        key = model.name.lower()
        runner = self._runners.get(key)
        if runner is not None and runner.loaded and self._room is None:
            return self._use_loaded(runner, keep_alive, prompt, needs_slot)
        if runner is None:
            self._check_fits(model)
        if self._pending_loads >= self.config.max_queue:
            self.counters.busy_rejections += 1
            raise ServerBusy(BUSY_MESSAGE)
        waiter = _Waiter(model, keep_alive, self.clock.seconds(), prompt, needs_slot)
        waiter.deferred = Deferred(lambda _d: self._cancel(waiter))
        if self._room is not None:
            self._held.append(waiter)
            self._pending_loads += 1
        else:
            self._admit(waiter)
            self._fire()
        return waiter.deferred

    def loaded(self) -> list[dict[str, Any]]:
        """The `/api/ps` entries: every loaded model and when it will expire, the longest to
        live first (Ollama's order). A model that has not yet gone idle expires its keep_alive
        from now, as Ollama estimates it."""
        now = self.clock.seconds()
        expiring = []
        for runner in self._runners.values():
            if not runner.loaded:
                continue
            expires = runner.expires_at
            if expires is None and not runner.idle() and runner.keep_alive >= 0:
                expires = now + runner.keep_alive
            if expires is None:
                expires = now + FOREVER_SECONDS
            expiring.append((runner, expires))
        expiring.sort(key=lambda pair: -int(pair[1]))
        entries = []
        for runner, expires in expiring:
            model = runner.model
            entry = model.tag_entry()
            del entry["modified_at"]
            entry["expires_at"] = rfc3339(expires)
            entry["size_vram"] = model.spec.size
            entry["context_length"] = min(4096, model.spec.context_length)
            entries.append(entry)
        return entries

    def is_loaded(self, model_name: str) -> bool:
        """Whether the model with this display name is loaded."""
        runner = self._runners.get(model_name.lower())
        return runner is not None and runner.loaded

    def unload(self, model_name: str, reason: str = "keep_alive") -> None:
        """Unload a model now, or as soon as its requests finish (Ollama's expireRunner)."""
        key = model_name.lower()
        runner = self._runners.get(key)
        if runner is None and self._room is not None and self._room.key == key:
            runner = self._room
        if runner is None:
            return
        runner.keep_alive = 0.0
        runner.unload_reason = reason
        if runner.loaded:  # a loading model's timer is its load: it unloads once idle
            runner.expires_at = self.clock.seconds()
            self._cancel_timer(runner)
        if runner.idle():
            self._unload(runner, reason)
            self._retry_room()

    def unload_all(self) -> None:
        """Unload every model (busy ones when they go idle)."""
        runners = list(self._runners.values())
        if self._room is not None:
            runners.append(self._room)
        for runner in runners:
            self.unload(runner.model.name, "control")

    def close(self) -> None:
        """Cancel every timer; used when the simulator stops."""
        for runner in self._runners.values():
            self._cancel_timer(runner)

    def release_runner(self, runner: _Runner, slot: _Slot | None = None) -> None:
        """A lease ended: free its slot and hand it on."""
        runner.busy -= 1
        self._tick += 1
        runner.used = self._tick
        if slot is not None:
            slot.busy = False
            slot.used = self._tick
        self._dispatch(runner)

    # -- requests ------------------------------------------------------------------------------

    def _use_loaded(
        self, runner: _Runner, keep_alive: float, prompt: Prompt | None, needs_slot: bool
    ) -> Deferred[Lease]:
        """A request for a loaded model: a slot now, or a place in its queue."""
        self._refresh(runner, keep_alive)
        self._cancel_timer(runner)
        if not needs_slot:
            if runner.idle():
                self._start_expiry(runner)
            return succeed(Lease(self, None, 0.0))
        if runner.busy < self.config.num_parallel and not runner.slot_waiters:
            return succeed(self._grant(runner, prompt, 0.0))
        waiter = _Waiter(runner.model, keep_alive, self.clock.seconds(), prompt, runner=runner)
        waiter.deferred = Deferred(lambda _d: self._cancel(waiter))
        runner.slot_waiters.append(waiter)
        return waiter.deferred

    def _admit(self, waiter: _Waiter) -> None:
        """Put a request on its model's runner, starting the load (or the wait for room)."""
        model = waiter.model
        key = model.name.lower()
        runner = self._runners.get(key)
        if runner is None:
            runner = _Runner(model=model, key=key, keep_alive=waiter.keep_alive)
            if self._make_room(model.spec.size):
                self._begin_load(runner)
            else:
                self._room = runner
        self._refresh(runner, waiter.keep_alive)
        if runner.loaded:
            self._serve(runner, waiter)
        else:
            waiter.runner = runner
            runner.load_waiters.append(waiter)
            self._pending_loads += 1

    def _serve(self, runner: _Runner, waiter: _Waiter) -> None:
        """A waiting request's model is loaded: grant it, or queue it for a slot."""
        self._cancel_timer(runner)
        if waiter.needs_slot:
            waiter.runner = runner
            runner.slot_waiters.append(waiter)
            self._dispatch(runner)
            return
        assert waiter.deferred is not None
        self._grants.append((waiter.deferred, Lease(self, None, waiter.load_duration)))
        if runner.idle():
            self._start_expiry(runner)

    def _refresh(self, runner: _Runner, keep_alive: float) -> None:
        """A request uses its model: it sets how long the model stays loaded after it."""
        runner.keep_alive = keep_alive
        runner.unload_reason = "keep_alive"
        self._tick += 1
        runner.used = self._tick

    def _grant(self, runner: _Runner, prompt: Prompt | None, load_duration: float) -> Lease:
        """Take a slot of `runner`: with a prompt, the one whose cache serves it best."""
        runner.busy += 1
        self._tick += 1
        runner.used = self._tick
        if prompt is None:
            return Lease(self, runner, load_duration)
        slot, shared = runner.free_slot(prompt.keys, self.config.num_parallel)
        slot.busy = True
        slot.keys = prompt.keys
        slot.used = self._tick
        cached = prompt.cached_tokens(shared)
        evaluated = prompt.total - cached
        counters = self.counters
        if cached:
            counters.cache_hits += 1
            counters.cached_prompt_tokens += cached
        counters.evaluated_prompt_tokens += evaluated
        return Lease(self, runner, load_duration, evaluated, slot)

    def _dispatch(self, runner: _Runner) -> None:
        """Give free slots to waiters in order; an idle model starts its keep_alive countdown."""
        while runner.slot_waiters and runner.busy < self.config.num_parallel:
            waiter = runner.slot_waiters.popleft()
            assert waiter.deferred is not None
            lease = self._grant(runner, waiter.prompt, waiter.load_duration)
            self._grants.append((waiter.deferred, lease))
        if runner.idle() and self._runners.get(runner.key) is runner:
            self._start_expiry(runner)
        self._fire()

    def _fire(self) -> None:
        """Fire grants in a loop rather than recursively: a granted request may finish (and
        release) synchronously, which dispatches again."""
        if self._granting:
            return
        self._granting = True
        try:
            while self._grants:
                deferred, lease = self._grants.popleft()
                if deferred.called:
                    lease.release()
                else:
                    deferred.callback(lease)
        finally:
            self._granting = False

    def _cancel(self, waiter: _Waiter) -> None:
        """A waiting client went away: forget its request."""
        runner = waiter.runner
        if runner is None:
            if waiter in self._held:
                self._held.remove(waiter)
                self._pending_loads -= 1
        elif waiter in runner.load_waiters:
            runner.load_waiters.remove(waiter)
            self._pending_loads -= 1
            if runner is self._room and not runner.load_waiters:
                self._room = None  # nobody wants that load any more
                self._replay()
        elif waiter in runner.slot_waiters:
            runner.slot_waiters.remove(waiter)
            if runner.idle():
                self._start_expiry(runner)

    # -- loads and VRAM ------------------------------------------------------------------------

    def _check_fits(self, model: InstalledModel) -> None:
        vram = self.config.vram_bytes
        if 0 < vram < model.spec.size:
            raise ModelTooLarge(too_large_message(model.spec.size, vram))

    def _make_room(self, size: int) -> bool:
        """Evict the least recently used idle models until `size` bytes fit; False (evicting
        nothing) when even all idle ones would not make enough room."""
        vram = self.config.vram_bytes
        if vram <= 0:
            return True
        missing = min(size, vram) - (vram - self._used_bytes)
        if missing <= 0:
            return True
        idle = sorted((r for r in self._runners.values() if r.idle()), key=lambda r: r.used)
        if sum(r.model.spec.size for r in idle) < missing:
            return False
        for runner in idle:
            if missing <= 0:
                break
            missing -= runner.model.spec.size
            self.counters.evictions += 1
            self._unload(runner, "evicted")
        return True

    def _retry_room(self) -> None:
        """After a model went idle or unloaded: start the load waiting for room if it now fits,
        then let the requests held behind it in."""
        if self._room is None or self._making_room:
            return
        self._making_room = True
        try:
            while self._room is not None and self._make_room(self._room.model.spec.size):
                runner, self._room = self._room, None
                self._begin_load(runner)
                self._replay()
        finally:
            self._making_room = False

    def _replay(self) -> None:
        """Admit held requests in order, until one needs a load that must wait for room."""
        while self._room is None and self._held:
            waiter = self._held.popleft()
            self._pending_loads -= 1
            self._admit(waiter)
        self._fire()

    def _load_seconds(self, model: InstalledModel) -> float:
        config = self.config
        return config.load_time + model.spec.size / 1e9 * config.load_seconds_per_gb

    def _begin_load(self, runner: _Runner) -> None:
        self._runners[runner.key] = runner
        self._used_bytes += runner.model.spec.size
        self.counters.loads += 1
        seconds = self._load_seconds(runner.model)
        if seconds > 0:
            runner.timer = self.clock.callLater(seconds, self._finish_load, runner)
        elif runner.load_waiters:
            self._finish_load(runner)
        else:
            runner.loaded = True  # the request that started it is served at once

    def _finish_load(self, runner: _Runner) -> None:
        runner.timer = None
        runner.loaded = True
        now = self.clock.seconds()
        while runner.load_waiters:
            waiter = runner.load_waiters.popleft()
            self._pending_loads -= 1
            waiter.load_duration = now - waiter.arrived
            if waiter.needs_slot:
                runner.slot_waiters.append(waiter)
            else:
                assert waiter.deferred is not None
                self._grants.append((waiter.deferred, Lease(self, None, waiter.load_duration)))
        self._dispatch(runner)

    # -- expiry --------------------------------------------------------------------------------

    def _start_expiry(self, runner: _Runner) -> None:
        self._cancel_timer(runner)
        keep_alive = runner.keep_alive
        if keep_alive == 0:
            self._unload(runner, runner.unload_reason)
        elif keep_alive < 0:
            runner.expires_at = None
        else:
            runner.expires_at = self.clock.seconds() + keep_alive
            runner.timer = self.clock.callLater(keep_alive, self._expire, runner)
        self._retry_room()

    def _expire(self, runner: _Runner) -> None:
        runner.timer = None
        self._unload(runner, "expired")
        self._retry_room()

    def _unload(self, runner: _Runner, reason: str) -> None:
        self._cancel_timer(runner)
        if self._runners.get(runner.key) is runner:
            del self._runners[runner.key]
            self._used_bytes -= runner.model.spec.size
            self.counters.unloads += 1
            self.events.unloaded.append({"model": runner.model.name, "reason": reason})

    @staticmethod
    def _cancel_timer(runner: _Runner) -> None:
        if runner.timer is not None:
            if runner.timer.active():
                runner.timer.cancel()
            runner.timer = None
