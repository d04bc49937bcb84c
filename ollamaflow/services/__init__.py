"""Background services: health checks, model inventory and model synchronization.

Each is a ``twisted.application.service.Service`` built from injected dependencies (clock, HTTP
client, registry, runtime), so the daemon adds them as children and tests drive them with a
``task.Clock`` and a fake HTTP client.
"""

from ollamaflow.services.health import HealthChecker
from ollamaflow.services.inventory import BackendInventory, ModelInventory
from ollamaflow.services.pull import (
    PullError,
    PullFailed,
    PullHTTPError,
    PullIdleTimeout,
    PullProgress,
    PullStreamBroken,
    PullUnavailable,
    pull,
)
from ollamaflow.services.sync import ModelSync

__all__ = [
    "BackendInventory",
    "HealthChecker",
    "ModelInventory",
    "ModelSync",
    "PullError",
    "PullFailed",
    "PullHTTPError",
    "PullIdleTimeout",
    "PullProgress",
    "PullStreamBroken",
    "PullUnavailable",
    "pull",
]
