"""OllamaFlow: one endpoint in front of a fleet of Ollama servers."""

__version__ = "2.0.0.dev0"
