"""Everything one simulated server knows, shared by its routes."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from ollamaflow import modelnames
from ollamaflow.sim.blobs import BlobStore
from ollamaflow.sim.catalog import Catalog, InstalledModel
from ollamaflow.sim.config import SimConfig
from ollamaflow.sim.counters import Counters
from ollamaflow.sim.emitter import Faults
from ollamaflow.sim.events import Events
from ollamaflow.sim.responses import HTTPError, model_not_found
from ollamaflow.sim.scheduler import Scheduler


@attrs.define
class SimState:
    """Clock, knobs, counters, installed models, blobs, events and the scheduler of one
    simulator."""

    clock: IReactorTime
    config: SimConfig
    counters: Counters
    catalog: Catalog
    scheduler: Scheduler
    blobs: BlobStore = attrs.Factory(BlobStore)
    events: Events = attrs.Factory(Events)

    @classmethod
    def create(cls, clock: IReactorTime, config: SimConfig, models: tuple[str, ...]) -> SimState:
        """A fresh state with `models` installed."""
        counters = Counters()
        events = Events()
        return cls(
            clock=clock,
            config=config,
            counters=counters,
            catalog=Catalog.with_models(models, clock.seconds()),
            scheduler=Scheduler(clock, config, counters, events),
            events=events,
        )

    def has_blob(self, digest: str) -> bool:
        """Whether a blob (a `blob_key`) is here: uploaded, or a layer of an installed model."""
        return digest in self.blobs or digest in self.catalog.layer_digests()

    def forget_layers(self, removed: InstalledModel) -> None:
        """Drop the uploads only a removed model used, as Ollama prunes a deleted model's
        layers."""
        still_used = self.catalog.layer_digests()
        for layer in removed.spec.layers:
            if layer.digest not in still_used:
                self.blobs.discard(layer.digest)

    def installed(self, name: str) -> InstalledModel:
        """The installed model `name` names, or the HTTPError Ollama answers."""
        try:
            model = self.catalog.get(name)
        except modelnames.InvalidModelName:
            raise HTTPError(400, "invalid model name") from None
        if model is None:
            raise model_not_found(name)
        return model

    def stream_faults(self) -> Faults:
        """The stream faults to apply to a response starting now."""
        config = self.config
        if config.drop_mid_stream_after is None and config.stall_after is None:
            return Faults()
        return Faults(config.drop_mid_stream_after, config.stall_after, config.stall_seconds)


def model_field(body: dict[str, Any], *, legacy_name: bool = False) -> str:
    """The request's `model` (or legacy `name`); 400 "model is required" when absent."""
    value = body.get("model")
    if not value and legacy_name:
        value = body.get("name")
    if not value:
        raise HTTPError(400, "model is required")
    if not isinstance(value, str):
        raise HTTPError(400, "model must be a string")
    return value
