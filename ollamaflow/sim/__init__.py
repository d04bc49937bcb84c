"""A simulated Ollama server: faithful HTTP API, fake models, tunable pace, scheduling and faults.

Start one in-process with `start_simulator(reactor)` or with `twistd -n ollamaflow-sim`.
"""

from ollamaflow.sim.config import SimConfig
from ollamaflow.sim.counters import Counters
from ollamaflow.sim.service import (
    RunningSimulator,
    SimulatorService,
    listen_simulator,
    start_simulator,
)

__all__ = [
    "Counters",
    "RunningSimulator",
    "SimConfig",
    "SimulatorService",
    "listen_simulator",
    "start_simulator",
]
