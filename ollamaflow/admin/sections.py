"""What the live feed samples: the fleet's state as sections of the admin API's records (the
contract is in :mod:`ollamaflow.dashboard`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

import attrs

from ollamaflow import __version__
from ollamaflow.activity import BUCKET_SECONDS, BUCKETS, Activity, request_line
from ollamaflow.catalog import Registry
from ollamaflow.records import Backend, Frontend
from ollamaflow.utctime import format_utc

#: What changes at every health check or every second: left out, so that a section is sent
#: again only when something a person would see changed.
_RESTLESS = ("Uptime", "Downtime", "LastCheckUtc", "ConsecutiveSuccesses")


class AdminRecords(Protocol):
    """The records of the admin API the sections are made of."""

    registry: Registry
    worker: int
    started: datetime

    def daemon_status(self) -> dict[str, Any]: ...

    def health_record(self, backend: Backend) -> dict[str, Any]: ...

    def frontend_record(self, frontend: Frontend) -> dict[str, Any]: ...

    def models(self, backend_id: str) -> list[dict[str, Any]]: ...


def time_text(seconds: float) -> str:
    """Seconds since the epoch as the admin API writes times."""
    return format_utc(datetime.fromtimestamp(seconds, UTC))


@attrs.frozen
class FleetSections:
    """Samples the sections of the feed from the admin API's records and the activity."""

    records: AdminRecords
    activity: Activity

    def hello(self) -> dict[str, Any]:
        return {
            "Version": __version__,
            "Worker": self.records.worker,
            "StartedUtc": format_utc(self.records.started),
            "BucketSeconds": BUCKET_SECONDS,
            "Buckets": BUCKETS,
        }

    def sample(self) -> dict[str, Any]:
        """Every section but ``requests``, as JSON-able values."""
        records = self.records
        catalog = records.registry.catalog
        backends = catalog.backends.values()
        daemon = records.daemon_status()
        del daemon["Uptime"]
        queues = {queue["Identifier"]: queue for queue in daemon["Queues"]}
        frontends = []
        for frontend in catalog.frontends.values():
            record = records.frontend_record(frontend)
            queue = dict(queues.get(frontend.identifier) or {})
            queue.pop("Identifier", None)
            record["Queue"] = queue
            record["Recent"] = self.activity.recent_counts(frontend.identifier)
            frontends.append(record)
        return {
            "daemon": daemon,
            "backends": [_settled(records.health_record(b)) for b in backends],
            "models": {b.identifier: records.models(b.identifier) for b in backends},
            "frontends": frontends,
            "series": {
                "BucketSeconds": BUCKET_SECONDS,
                "EndUtc": time_text(self.activity.bucket() * BUCKET_SECONDS),
                "Backends": self.activity.series(catalog.backends.keys()),
            },
            "config": {"Generation": catalog.generation},
        }

    def requests_after(self, sequence: int, at_most: int) -> tuple[int, list[dict[str, Any]]]:
        """The request lines after the one numbered ``sequence`` (the last ``at_most``), and
        the number of the newest."""
        finished = list(self.activity.after(sequence))[-at_most:]
        return self.activity.sequence, [request_line(f, time_text) for f in finished]


def _settled(record: dict[str, Any]) -> dict[str, Any]:
    for name in _RESTLESS:
        record.pop(name, None)
    return record
