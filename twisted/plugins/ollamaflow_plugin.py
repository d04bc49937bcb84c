"""twistd plugins for OllamaFlow; the modules they name load only when the plugin is used."""

from twisted.application.service import ServiceMaker

ollamaflow = ServiceMaker(
    "OllamaFlow",
    "ollamaflow.tap",
    "Load balancer and orchestrator for a fleet of Ollama servers.",
    "ollamaflow",
)

ollamaflow_sim = ServiceMaker(
    "OllamaFlow simulator",
    "ollamaflow.sim.tap",
    "A simulated Ollama server for tests, demos and load.",
    "ollamaflow-sim",
)
