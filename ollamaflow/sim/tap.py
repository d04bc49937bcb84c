"""`twistd ollamaflow-sim`: command-line options and the service they make."""

from __future__ import annotations

import math
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from ollamaflow import modelnames
from ollamaflow.sim.config import DEFAULT_MODELS, DEFAULT_PULLABLE, SimConfig
from ollamaflow.sim.scheduler import parse_keep_alive
from ollamaflow.sim.service import SimulatorService

FAULTS = ("refuse", "error500", "hang", "reset_head")


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _gb_bytes(gb: float) -> int:
    """`--vram-gb` in bytes (GB of 1e9 bytes, as `load_seconds_per_gb` counts them)."""
    if not 0 <= gb < math.inf:  # NaN fails too
        raise ValueError("--vram-gb must be a finite number >= 0")
    return round(gb * 1e9)


class Options(usage.Options):
    """Options of a simulated Ollama server; the defaults make a lively demo, not a benchmark."""

    synopsis = "[options]"
    longdesc = (
        "A simulated Ollama server: the Ollama HTTP API with fake models, paced token streams,"
        " model loads, parallel slots, pulls, blobs, create, push and faults. Knobs can be"
        " changed at run time under /_sim/ (GET /_sim/state, POST /_sim/config,"
        " POST /_sim/reset)."
    )
    optFlags = [
        ["no-host-check", None, "Accept any Host header (Ollama on loopback rejects others: 403)."],
    ]
    optParameters: list[list[Any]] = [
        [
            "port",
            "p",
            11435,
            "TCP port to listen on (11434 is left to Ollama or the gateway).",
            int,
        ],
        ["interface", "i", "127.0.0.1", "Interface to listen on."],
        ["models", "m", ",".join(DEFAULT_MODELS), "Comma-separated models installed at start."],
        [
            "pullable",
            None,
            None,
            "Comma-separated models /api/pull finds ('*' = any name)."
            " Default: common models plus --models.",
        ],
        ["tokens", None, 20, "Tokens per generated response.", int],
        ["tokens-per-second", None, 20.0, "Token pace; 0 = as fast as possible.", float],
        ["ttft", None, 0.1, "Seconds to the first token once a slot is free.", float],
        ["load-time", None, 1.0, "Seconds to load a model that is not loaded.", float],
        ["keep-alive", None, "5m", "Default keep_alive (seconds or 5m, 1h; negative = forever)."],
        ["num-parallel", None, 1, "Parallel requests per loaded model (OLLAMA_NUM_PARALLEL).", int],
        ["max-queue", None, 512, "Requests waiting for loads before 503 (OLLAMA_MAX_QUEUE).", int],
        [
            "vram-gb",
            None,
            0.0,
            "VRAM in GB (1e9 bytes) for loaded models; LRU idle ones are evicted. 0 = unlimited.",
            float,
        ],
        ["load-seconds-per-gb", None, 0.0, "Seconds per GB a load adds to --load-time.", float],
        [
            "prompt-tokens-per-second",
            None,
            0.0,
            "Prompt evaluation pace (uncached prompt tokens delay the first); 0 = free.",
            float,
        ],
        ["pull-time", None, 3.0, "Seconds a pull takes.", float],
        ["pull-tick", None, 0.06, "Seconds between pull, push and create progress lines.", float],
        ["push-time", None, 3.0, "Seconds a push takes.", float],
        ["create-time", None, 2.0, "Seconds a create spends validating or quantizing.", float],
        ["drop-after", None, None, "Fault: close the connection after N stream messages.", int],
        ["stall-after", None, None, "Fault: stall once after N stream messages.", int],
        ["stall-seconds", None, 5.0, "How long the stall-after fault stalls.", float],
        ["refuse-seconds", None, 0.0, "With --fault refuse: listen again after this long.", float],
        ["ollama-version", None, "0.32.15", "Version /api/version reports."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.faults: set[str] = set()
        self.config = SimConfig()

    def opt_fault(self, name: str) -> None:
        """Start with a fault: refuse, error500, hang or reset_head (repeatable)."""
        if name not in FAULTS:
            raise usage.UsageError(f"--fault must be one of {', '.join(FAULTS)}, not {name!r}")
        self.faults.add(name)

    def postOptions(self) -> None:
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError("--port must be between 0 and 65535")
        models = _names(self["models"])
        pullable = (
            _names(self["pullable"])
            if self["pullable"] is not None
            else tuple(dict.fromkeys(DEFAULT_PULLABLE + models))
        )
        try:
            keep_alive = parse_keep_alive(self["keep-alive"], 300.0)
            self.config = SimConfig(
                tokens=self["tokens"],
                tokens_per_second=self["tokens-per-second"],
                ttft=self["ttft"],
                load_time=self["load-time"],
                keep_alive=keep_alive,
                num_parallel=self["num-parallel"],
                max_queue=self["max-queue"],
                vram_bytes=_gb_bytes(self["vram-gb"]),
                load_seconds_per_gb=self["load-seconds-per-gb"],
                prompt_tokens_per_second=self["prompt-tokens-per-second"],
                pull_time=self["pull-time"],
                pull_tick=self["pull-tick"],
                push_time=self["push-time"],
                create_time=self["create-time"],
                pullable=pullable,
                version=self["ollama-version"],
                check_host=not self["no-host-check"],
                refuse="refuse" in self.faults,
                refuse_seconds=self["refuse-seconds"],
                error500="error500" in self.faults,
                hang="hang" in self.faults,
                reset_head="reset_head" in self.faults,
                drop_mid_stream_after=self["drop-after"],
                stall_after=self["stall-after"],
                stall_seconds=self["stall-seconds"],
            )
            for name in models:
                modelnames.parse(name)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["models"] = models


def makeService(options: Options) -> IService:
    """The simulator service for twistd."""
    from twisted.internet import reactor

    return SimulatorService(
        reactor,
        port=options["port"],
        interface=options["interface"],
        config=options.config,
        models=options["models"],
    )
