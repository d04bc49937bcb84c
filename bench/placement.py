"""The placement workload of ``bench/scheduling.py`` (issue 21): more models than VRAM.

Every simulated box has the same six chat models installed but VRAM for two of them; loading a
third evicts the least recently used idle one and takes seconds (proportional to its size).
Model popularity is Zipf-distributed; 40% of the conversations are multi-turn chats whose
later turns skip most of their prompt evaluation when they land on the slot that served the
previous turn (the simulator's prompt cache). This module holds the workload, the streaming
client that replays it, the ideal replay with perfect knowledge, and the table and goals.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from httpwire import ProtocolError, ResponseParser, build_request, percentile

from ollamaflow.sim import content, prompts
from ollamaflow.sim.catalog import spec_for

#: The six chat models, most popular first (Zipf rank 1..6): any two fit in a box, no three.
MODELS = ("llama3", "mistral", "qwen2.5", "gemma2", "llama3.1", "phi3")
GB = 1e9


@dataclass(frozen=True)
class Setup:
    """The simulated fleet and the workload: everything a replay (real or ideal) depends on."""

    backends: int = 8
    models: tuple[str, ...] = MODELS
    #: Models a box's VRAM holds; the VRAM is set between the largest pair and smallest trio.
    per_box: int = 2
    num_parallel: int = 2
    #: Generated tokens per second of one request, and prompt tokens evaluated per second.
    tps: float = 50.0
    pps: float = 400.0
    ttft: float = 0.05
    load_seconds_per_gb: float = 0.8
    #: Seconds of conversation starts, and the share of the generation slots busy on average.
    seconds: float = 60.0
    load: float = 0.5
    multi_turn: float = 0.4
    turns: tuple[int, int] = (2, 6)
    think: tuple[float, float] = (1.0, 3.0)
    #: Tokens: the reply, the first prompt (a system context) and each new user message.
    reply: tuple[int, int] = (30, 150)
    context: tuple[int, int] = (100, 800)
    question: tuple[int, int] = (20, 100)
    zipf: float = 1.0
    seed: int = 21

    def size(self, model: str) -> int:
        """Bytes of a model, as the simulator's catalog has it (what it takes in VRAM)."""
        return spec_for(model).size

    def vram_bytes(self) -> int:
        """A box's VRAM: room for any ``per_box`` models, never for one more."""
        sizes = sorted(self.size(m) for m in self.models)
        fits = sum(sizes[-self.per_box :])
        never = sum(sizes[: self.per_box + 1])
        if fits >= never:
            raise ValueError(f"no VRAM fits any {self.per_box} of {self.models} and no more")
        return (fits + never) // 2

    def load_seconds(self, model: str) -> float:
        return self.size(model) / GB * self.load_seconds_per_gb

    def popularity(self) -> dict[str, float]:
        """Zipf shares: the model of rank r is asked for in proportion to 1 / r**s."""
        weights = [1 / (rank + 1) ** self.zipf for rank in range(len(self.models))]
        total = sum(weights)
        return {m: w / total for m, w in zip(self.models, weights, strict=True)}

    def slots(self) -> int:
        """Generation slots of a full fleet: every box holding ``per_box`` models."""
        return self.backends * self.per_box * self.num_parallel

    def sim_knobs(self) -> dict[str, object]:
        """What every simulator is set to with ``POST /_sim/config``."""
        return {
            "vram_bytes": self.vram_bytes(),
            "load_seconds_per_gb": self.load_seconds_per_gb,
            "prompt_tokens_per_second": self.pps,
            "tokens_per_second": self.tps,
            "ttft": self.ttft,
            "load_time": 0.0,
            "num_parallel": self.num_parallel,
            "tokens": self.reply[1],
            "keep_alive": -1.0,
        }


def smoke_setup(seed: int) -> Setup:
    """Seconds instead of minutes: four boxes, fast tokens, short loads and thinking."""
    return Setup(
        backends=4,
        tps=400.0,
        pps=8000.0,
        ttft=0.01,
        load_seconds_per_gb=0.05,
        seconds=4.0,
        think=(0.05, 0.2),
        seed=seed,
    )


# -- the workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One request of a conversation: the new user message, the reply's length, and how long
    the user thinks after the previous reply before sending it (0 for the first)."""

    question: str
    tokens: int
    think: float


@dataclass(frozen=True)
class Conversation:
    """A chat with one model: a system context, then one or more turns."""

    ident: int
    start: float
    model: str
    context: str
    turns: tuple[Turn, ...]

    def messages(self, replies: Sequence[str]) -> list[dict[str, str]]:
        """The messages of turn ``len(replies)``: everything so far plus the next question,
        as a real client resends its history."""
        out = [{"role": "system", "content": self.context}]
        for turn, reply in zip(self.turns, replies, strict=False):
            out += [{"role": "user", "content": turn.question}]
            out += [{"role": "assistant", "content": reply}]
        out.append({"role": "user", "content": self.turns[len(replies)].question})
        return out

    def body(self, replies: Sequence[str]) -> bytes:
        """The streaming ``/api/chat`` body of turn ``len(replies)``."""
        turn = self.turns[len(replies)]
        return json.dumps(
            {
                "model": self.model,
                "messages": self.messages(replies),
                "stream": True,
                "options": {"num_predict": turn.tokens},
            }
        ).encode()


_FILLER = "the quick brown fox jumps over the lazy dog while the fleet balances its load "


def text(tag: str, tokens: int) -> str:
    """About ``tokens`` prompt tokens (four bytes each), unique to ``tag``."""
    head = f"[{tag}] "
    size = max(len(head), 4 * tokens)
    return (head + _FILLER * (size // len(_FILLER) + 1))[:size]


def _conversation(setup: Setup, rng: random.Random, ident: int, start: float) -> Conversation:
    shares = setup.popularity()
    model = rng.choices(list(shares), weights=list(shares.values()))[0]
    count = rng.randint(*setup.turns) if rng.random() < setup.multi_turn else 1
    turns = tuple(
        Turn(
            question=text(f"c{ident} q{k}", rng.randint(*setup.question)),
            tokens=rng.randint(*setup.reply),
            think=rng.uniform(*setup.think) if k else 0.0,
        )
        for k in range(count)
    )
    context = text(f"c{ident} context", rng.randint(*setup.context))
    return Conversation(ident, start, model, context, turns)


def busy_seconds(setup: Setup, conversation: Conversation) -> float:
    """Seconds of slot time a conversation takes when every later turn hits its cache."""
    total, replies = 0.0, []
    for turn in conversation.turns:
        prompt = prompts.of_messages(conversation.messages(replies))
        cached = prompt.keys[:-1] if replies else ()  # all but the new question
        total += service(setup, evaluated(prompt, cached), turn.tokens)[1]
        replies.append(reply_text(turn.tokens))
    return total


def service(setup: Setup, prompt_tokens: int, tokens: int) -> tuple[float, float]:
    """As the simulator serves a request once it has a slot: seconds to its first token
    (``ttft`` + the uncached prompt), and to its last (one token per ``1 / tps`` after)."""
    first = setup.ttft + prompt_tokens / setup.pps
    return first, first + (tokens - 1) / setup.tps


def evaluated(prompt: prompts.Prompt, cache: tuple[int, ...]) -> int:
    """Prompt tokens the simulator evaluates on a slot whose cache holds ``cache`` (message
    keys): everything after the messages both share."""
    return prompt.total - prompt.cached_tokens(prompts.shared_messages(cache, prompt.keys))


def conversation_rate(setup: Setup) -> float:
    """Conversations per second that keep ``setup.load`` of the fleet's slots busy."""
    rng = random.Random(0x5EED)  # the same sample whatever the seed: a rate per setup
    sample = [_conversation(setup, rng, i, 0.0) for i in range(2000)]
    mean = sum(busy_seconds(setup, c) for c in sample) / len(sample)
    return setup.load * setup.slots() / mean


def workload(setup: Setup) -> list[Conversation]:
    """Conversations starting at Poisson times over ``setup.seconds``, seeded."""
    rate = conversation_rate(setup)
    rng = random.Random(setup.seed)
    out: list[Conversation] = []
    now = rng.expovariate(rate)
    while now < setup.seconds:
        out.append(_conversation(setup, rng, len(out), now))
        now += rng.expovariate(rate)
    return out


def reply_text(tokens: int) -> str:
    """What the simulator answers with ``tokens`` tokens (the same for every request)."""
    return "".join(content.tokens(tokens))


# -- the client -------------------------------------------------------------------------------


@dataclass
class Answer:
    """What came back for one streaming chat request."""

    status: int = 0
    ttft: float | None = None
    reply: str = ""
    tokens: int = 0
    done: bool = False
    backend: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error


class _ChatStream:
    """Parses one streamed ``/api/chat`` response: NDJSON lines, timed as they arrive."""

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.answer = Answer()
        self.partial = b""
        self.finished = False
        self.parser = ResponseParser(self._head, self._body, self._done)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.answer.status = status
        self.answer.backend = headers.get("x-ollamaflow-backend", "")

    def _body(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self.answer.error = f"not JSON: {line[:80]!r}"
            return
        if "error" in message:
            self.answer.error = str(message["error"])[:200]
        piece = (message.get("message") or {}).get("content") or ""
        if piece and self.answer.ttft is None:
            self.answer.ttft = time.monotonic() - self.sent
        self.answer.reply += piece
        if message.get("done") is True:
            self.answer.done = True
            self.answer.tokens = int(message.get("eval_count") or 0)

    def _done(self) -> None:
        self.finished = True


async def chat(port: int, body: bytes, limit: float) -> Answer:
    """One streaming ``POST /api/chat`` on its own connection, within ``limit`` seconds."""
    stream = _ChatStream(time.monotonic())
    writer = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(build_request("POST", "bench", "/api/chat", body))
            while not stream.finished:
                data = await reader.read(65536)
                if not data:
                    if not stream.parser.connection_closed():
                        stream.answer.error = stream.answer.error or "connection closed"
                    break
                stream.parser.feed(data)
    except (TimeoutError, OSError, ProtocolError, ValueError) as e:
        stream.answer.error = stream.answer.error or f"{type(e).__name__}: {e}"[:200]
    finally:
        if writer is not None:
            writer.close()
    return stream.answer


@dataclass(frozen=True)
class TurnResult:
    """One request of the replay (real or ideal); times in seconds from the replay's start."""

    conversation: int
    turn: int
    model: str
    ok: bool = False
    ttft: float | None = None
    tokens: int = 0
    backend: str = ""
    sent: float = 0.0
    ended: float = 0.0
    #: Ideal only: whether its prompt reused cached tokens (the simulators count their own).
    cache_hit: bool = False
    error: str = ""


async def converse(
    port: int, conversation: Conversation, started: float, limit: float
) -> list[TurnResult]:
    """Play one conversation: each turn sent once the previous reply has arrived, plus the
    user's think time, with that reply in its history. A failed turn ends the conversation;
    the turns never sent count as failed too."""
    await asyncio.sleep(max(0.0, conversation.start - (time.monotonic() - started)))
    replies: list[str] = []
    out: list[TurnResult] = []
    for k, turn in enumerate(conversation.turns):
        await asyncio.sleep(turn.think)
        sent = time.monotonic() - started
        answer = await chat(port, conversation.body(replies), limit)
        ended = time.monotonic() - started
        result = TurnResult(conversation.ident, k, conversation.model, sent=sent, ended=ended)
        out.append(_answered(result, answer))
        if not answer.ok:
            break
        replies.append(answer.reply)
    for k in range(len(out), len(conversation.turns)):
        unsent = "not sent: an earlier turn failed"
        out.append(TurnResult(conversation.ident, k, conversation.model, error=unsent))
    return out


def _answered(result: TurnResult, answer: Answer) -> TurnResult:
    """``result`` completed with what the answer says (and why it failed, if it did)."""
    why = ""
    if not answer.ok:
        status = f"status {answer.status}" if answer.status != 200 else "no final line"
        why = answer.error or status
    return replace(
        result,
        ok=answer.ok,
        ttft=answer.ttft,
        tokens=answer.tokens,
        backend=answer.backend,
        error=why,
    )


async def replay(port: int, conversations: list[Conversation], limit: float) -> list[TurnResult]:
    """Every conversation at its start time, concurrently; the results of every turn."""
    started = time.monotonic()
    played = await asyncio.gather(*(converse(port, c, started, limit) for c in conversations))
    return [result for turns in played for result in turns]


# -- the ideal --------------------------------------------------------------------------------


def demand(setup: Setup, conversations: list[Conversation]) -> dict[str, float]:
    """Slot-seconds each model is asked for in this workload (perfect knowledge)."""
    out = dict.fromkeys(setup.models, 0.0)
    for c in conversations:
        out[c.model] += busy_seconds(setup, c)
    return out


def copies(setup: Setup, conversations: list[Conversation]) -> dict[str, int]:
    """Copies of each model in proportion to its demand: one each, then every further copy to
    the model with the most demand per copy (at most one copy per box)."""
    shares = demand(setup, conversations)
    if setup.backends * setup.per_box < len(setup.models):
        raise ValueError(f"{setup.backends} boxes of {setup.per_box} cannot hold every model")
    count = dict.fromkeys(setup.models, 1)
    for _ in range(setup.backends * setup.per_box - len(setup.models)):
        open_ = [m for m in setup.models if count[m] < setup.backends]
        best = max(open_, key=lambda m: shares[m] / count[m])
        count[best] += 1
    return count


def placement(setup: Setup, conversations: list[Conversation]) -> list[list[str]]:
    """The models of each box: copies dealt round the boxes, most copies first (so no box
    gets the same model twice)."""
    counts = sorted(copies(setup, conversations).items(), key=lambda pair: -pair[1])
    dealt = [model for model, n in counts for _ in range(n)]
    boxes: list[list[str]] = [[] for _ in range(setup.backends)]
    for i, model in enumerate(dealt):
        boxes[i % setup.backends].append(model)
    return boxes


@dataclass
class Slot:
    """One parallel slot of one copy, in the ideal replay."""

    box: int
    #: When it can start its next request (the copy loaded and the last request done).
    free_at: float
    #: The message keys its KV cache holds (the last prompt and its reply), as the simulator's.
    cache: tuple[int, ...] = ()
    used_at: float = -1.0


@dataclass
class IdealRun:
    """What the ideal replay served, and how many loads its placement took."""

    results: list[TurnResult]
    loads: int


def _ready_times(
    setup: Setup, boxes: list[list[str]], preloaded: bool
) -> dict[tuple[int, str], float]:
    """When each copy is loaded: at 0 when preloaded, else every load starts at 0 and takes
    its time (the simulator loads a box's models side by side)."""
    return {
        (box, model): 0.0 if preloaded else setup.load_seconds(model)
        for box, models in enumerate(boxes)
        for model in models
    }


def ideal(setup: Setup, conversations: list[Conversation], preloaded: bool) -> IdealRun:
    """The same conversations with perfect knowledge and no overhead: the static placement of
    ``placement`` (its loads done before the run when ``preloaded``, else started at time 0),
    and each request, in the order they are sent, committed to the slot of its model that
    gives it its first token soonest: its own conversation's slot when that is free (the
    history cached), else the copy that frees first. Same service model as the simulator."""
    boxes = placement(setup, conversations)
    ready = _ready_times(setup, boxes, preloaded)
    slots: dict[str, list[Slot]] = {m: [] for m in setup.models}
    for (box, model), at in ready.items():
        slots[model] += [Slot(box, at) for _ in range(setup.num_parallel)]
    replies: dict[int, list[str]] = {c.ident: [] for c in conversations}
    events = [(c.start, c.ident, 0) for c in conversations]
    heapq.heapify(events)
    results: list[TurnResult] = []
    while events:
        now, ident, k = heapq.heappop(events)
        conversation = conversations[ident]
        result = _serve(setup, slots[conversation.model], conversation, replies[ident], now)
        results.append(result)
        replies[ident].append(reply_text(conversation.turns[k].tokens))
        if k + 1 < len(conversation.turns):
            nxt = result.ended + conversation.turns[k + 1].think
            heapq.heappush(events, (nxt, ident, k + 1))
    loads = sum(len(models) for models in boxes)
    return IdealRun(results, loads)


def _serve(
    setup: Setup, slots: list[Slot], conversation: Conversation, replies: list[str], now: float
) -> TurnResult:
    """Commit one request to the slot giving its first token soonest (ties: the slot used
    least lately, sparing the caches other conversations will come back to)."""
    prompt = prompts.of_messages(conversation.messages(replies))
    tokens = conversation.turns[len(replies)].tokens

    def first_token(slot: Slot) -> tuple[float, float]:
        start = max(now, slot.free_at)
        return start + service(setup, evaluated(prompt, slot.cache), tokens)[0], slot.used_at

    slot = min(slots, key=first_token)
    uncached = evaluated(prompt, slot.cache)
    first, last = service(setup, uncached, tokens)
    start = max(now, slot.free_at)
    reply = prompts.reply_key(reply_text(tokens))
    slot.free_at, slot.cache, slot.used_at = start + last, (*prompt.keys, reply), now
    return TurnResult(
        conversation.ident,
        len(replies),
        conversation.model,
        ok=True,
        ttft=start + first - now,
        tokens=tokens,
        backend=f"box{slot.box}",
        sent=now,
        ended=start + last,
        cache_hit=uncached < prompt.total,
    )


# -- the table --------------------------------------------------------------------------------


@dataclass
class Row:
    """One policy's line: from the client's results and the simulators' counters."""

    policy: str
    requests: int = 0
    failed: int = 0
    p50_ttft: float | None = None
    p99_ttft: float | None = None
    loads: int | None = None
    evictions: int | None = None
    cache_hits: int | None = None
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0
    #: Later turns served by the box of the previous turn.
    same_box: float | None = None
    note: str = ""
    errors: dict[str, int] = field(default_factory=dict)
    #: The slowest first tokens (JSON only): when, which model and turn, where.
    slowest: list[dict[str, object]] = field(default_factory=list)
    #: What each box held in VRAM when it changed: (seconds, box, models); live rows only.
    residency: list[tuple[float, str, list[str]]] = field(default_factory=list)


def summarize(policy: str, results: list[TurnResult], counters: dict[str, int] | None) -> Row:
    """A row from every turn's result and the simulators' summed counters (None: ideal)."""
    ok = [r for r in results if r.ok]
    ttfts = sorted(r.ttft for r in ok if r.ttft is not None)
    span = max((r.ended for r in ok), default=0.0) - min((r.sent for r in ok), default=0.0)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    row = Row(
        policy=policy,
        requests=len(results),
        failed=len(results) - len(ok),
        p50_ttft=percentile(ttfts, 0.5),
        p99_ttft=percentile(ttfts, 0.99),
        requests_per_s=len(ok) / span if span > 0 else 0.0,
        tokens_per_s=sum(r.tokens for r in ok) / span if span > 0 else 0.0,
        same_box=_same_box(results),
        errors=errors,
        slowest=_slowest(ok),
    )
    if counters is not None:
        row.loads = counters.get("loads")
        row.evictions = counters.get("evictions")
        row.cache_hits = counters.get("cache_hits")
    return row


def _slowest(ok: list[TurnResult], count: int = 10) -> list[dict[str, object]]:
    worst = sorted(ok, key=lambda r: -(r.ttft or 0.0))[:count]
    return [
        {"ttft": round(r.ttft or 0.0, 3), "sent": round(r.sent, 2), "model": r.model,
         "conversation": r.conversation, "turn": r.turn, "backend": r.backend}
        for r in worst
    ]  # fmt: skip


def timeline(row: Row, boxes: list[str], every: float = 2.0) -> str:
    """Where models lived during ``row``'s replay: what each box held every ``every``
    seconds, each model by a letter (the legend's)."""
    if not row.residency:
        return f"{row.policy}: no residency recorded"
    names = sorted({m for _, _, models in row.residency for m in models})
    letter = {name: chr(ord("A") + i) for i, name in enumerate(names)}
    legend = ", ".join(f"{letter[n]} {n}" for n in names)
    end = max(at for at, _, _ in row.residency) + every
    held: dict[str, list[str]] = {}
    changes = iter(sorted(row.residency))
    pending = next(changes, None)
    lines = [f"{row.policy}: what each box held, every {every:g} s ({legend})"]
    lines.append("     s " + "".join(f"{b:>6}" for b in boxes))
    at = 0.0
    while at <= end:
        while pending is not None and pending[0] <= at:
            held[pending[1]] = pending[2]
            pending = next(changes, None)
        cells = ["".join(sorted(letter[m] for m in held.get(b, []))) or "-" for b in boxes]
        lines.append(f"{at:6.0f} " + "".join(f"{c:>6}" for c in cells))
        at += every
    return "\n".join(lines)


def _same_box(results: list[TurnResult]) -> float | None:
    where = {(r.conversation, r.turn): r.backend for r in results if r.ok}
    later = [r for r in results if r.ok and r.turn > 0]
    if not later or not all(r.backend for r in later):
        return None
    same = sum(1 for r in later if where.get((r.conversation, r.turn - 1)) == r.backend)
    return same / len(later)


def ideal_row(name: str, run: IdealRun) -> Row:
    row = summarize(name, run.results, None)
    row.loads, row.evictions = run.loads, 0
    row.cache_hits = sum(1 for r in run.results if r.cache_hit)
    return row


def _cell(value: float | int | None, digits: int = 0, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}"


def table(rows: list[Row]) -> str:
    """The rows as aligned text: TTFT in ms, throughput in requests/s and tokens/s."""
    header = (
        f"{'policy':28} {'requests':>8} {'failed':>6} {'p50 TTFT':>9} {'p99 TTFT':>9} "
        f"{'loads':>6} {'evicted':>7} {'cache hits':>10} {'same box':>8} {'req/s':>6} "
        f"{'tok/s':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.note:
            lines.append(f"{r.policy:28} {r.note}")
            continue
        lines.append(
            f"{r.policy:28} {r.requests:8d} {r.failed:6d} {_cell(r.p50_ttft, 0, 1000):>9} "
            f"{_cell(r.p99_ttft, 0, 1000):>9} {_cell(r.loads):>6} {_cell(r.evictions):>7} "
            f"{_cell(r.cache_hits):>10} {_cell(r.same_box, 0, 100) + '%':>8} "
            f"{r.requests_per_s:6.2f} {r.tokens_per_s:6.0f}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Goal:
    what: str
    measured: str
    passed: bool | None


def _metric(row: Row | None, name: str) -> float | None:
    return None if row is None or row.note else getattr(row, name)


def _show(row: Row | None, name: str) -> str:
    value = _metric(row, name)
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if name.endswith("ttft") else f"{value:g}"


def ratio(top: Row | None, bottom: Row | None, name: str) -> float | None:
    """``top``'s ``name`` over ``bottom``'s (None when either is missing)."""
    a, b = _metric(top, name), _metric(bottom, name)
    if a is None or b is None:
        return None
    return a / b if b else math.inf


def check(
    what: str,
    top: Row | None,
    bottom: Row | None,
    name: str,
    *,
    least: float = 0.0,
    most: float = math.inf,
) -> Goal:
    """A goal on the ratio of two rows' ``name``: at least ``least``, at most ``most``."""
    value = ratio(top, bottom, name)
    if value is None:
        return Goal(what, "not measured", None)
    shown = f"{value:.2f}x ({_show(top, name)} / {_show(bottom, name)})"
    return Goal(what, shown, least <= value <= most)


def goals(rows: dict[str, Row], candidate: str, baseline: str, yardstick: str) -> list[Goal]:
    """Issue 21's goals for ``candidate``: against ``baseline`` (today's LeastOutstanding) and
    within 25% of ``yardstick`` (the ideal from the same cold start)."""
    new, old, best = rows.get(candidate), rows.get(baseline), rows.get(yardstick)
    failed = _metric(new, "failed")
    return [
        check("loads: LeastOutstanding / new >= 3", old, new, "loads", least=3),
        check("p99 TTFT: LeastOutstanding / new >= 2", old, new, "p99_ttft", least=2),
        check("p99 TTFT: new / ideal <= 1.25", new, best, "p99_ttft", most=1.25),
        check("loads: new / ideal <= 1.25", new, best, "loads", most=1.25),
        Goal(
            "failed requests: 0",
            "not measured" if failed is None else f"{failed:g}",
            None if failed is None else failed == 0,
        ),
    ]


def goals_text(title: str, checks: list[Goal]) -> str:
    lines = [title]
    for g in checks:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[g.passed]
        lines.append(f"  {verdict}  {g.what:46} {g.measured}")
    return "\n".join(lines)


def describe(setup: Setup, conversations: list[Conversation]) -> str:
    """The workload in a few lines: fleet, models, arrivals, turns."""
    turns = sum(len(c.turns) for c in conversations)
    multi = sum(1 for c in conversations if len(c.turns) > 1)
    shares = setup.popularity()
    models = ", ".join(
        f"{m} {setup.size(m) / GB:.1f} GB {shares[m]:.0%} (load {setup.load_seconds(m):.1f} s)"
        for m in setup.models
    )
    boxes = " ".join("+".join(b) for b in placement(setup, conversations))
    return "\n".join(
        [
            f"{setup.backends} simulated backends, VRAM {setup.vram_bytes() / GB:.2f} GB each "
            f"(any {setup.per_box} of the {len(setup.models)} models fit, no "
            f"{setup.per_box + 1}), {setup.num_parallel} slots per model, "
            f"{setup.tps:g} tokens/s, prompts at {setup.pps:g} tokens/s, "
            f"loads at {setup.load_seconds_per_gb:g} s/GB",
            f"models (Zipf s={setup.zipf:g}, most asked first): {models}",
            f"{len(conversations)} conversations over {setup.seconds:.0f} s "
            f"({conversation_rate(setup):.2f}/s, seed {setup.seed}, {setup.load:.0%} of "
            f"{setup.slots()} slots busy), {multi} multi-turn "
            f"({setup.turns[0]}-{setup.turns[1]} turns, {setup.think[0]:g}-{setup.think[1]:g} s "
            f"think), {turns} requests",
            f"ideal placement: {boxes}",
        ]
    )


def versus(row: Row | None, best: Row) -> str:
    """How far ``row`` (today's LeastOutstanding) is from the ideal: the gap to close."""
    parts = []
    for name, label in (("p99_ttft", "p99 TTFT"), ("loads", "loads"), ("cache_hits", "hits")):
        value = ratio(row, best, name)
        parts.append(f"{label} {'-' if value is None else f'{value:.2f}x'}")
    return f"{row.policy if row else 'LeastOutstanding'} / ideal: " + ", ".join(parts)


def document(
    setup: Setup, conversations: list[Conversation], rows: list[Row], checks: list[Goal]
) -> dict[str, object]:
    """The JSON result: the setup, every row and the goals."""
    data = asdict(setup)
    data["vram_bytes"] = setup.vram_bytes()
    data["popularity"] = setup.popularity()
    data["conversations_per_second"] = conversation_rate(setup)
    data["conversations"] = len(conversations)
    data["placement"] = placement(setup, conversations)
    return {
        "workload": "placement",
        "setup": data,
        "rows": [asdict(r) for r in rows],
        "goals": [asdict(g) for g in checks],
    }
