"""The admin REST API under ``/v1.0/``, wire-compatible with OllamaFlow 1.2."""
