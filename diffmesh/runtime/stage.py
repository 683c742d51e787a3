"""The shape shared by the model-serving stages: a pool of models loaded at start-up on the
configured device, an admission gate in front of the compute pool, one gRPC service."""
from __future__ import annotations

import logging
from typing import Any, Generic, Sequence, TypeVar

import torch

from diffmesh.models.pool import ModelPool
from diffmesh.models.registry import ModelEntry
from diffmesh.runtime.config import ServerConfig
from diffmesh.runtime.device import select_device, select_dtype
from diffmesh.runtime import metrics
from diffmesh.runtime.logs import log_event
from diffmesh.runtime.server import Admission

M = TypeVar("M")
log = logging.getLogger("diffmesh.stage")


class ModelStage(Generic[M]):
    name = "stage"
    service_full_names: Sequence[str] = ()

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.models: ModelPool[M] = ModelPool()
        self.admission = Admission(self.name, config.max_concurrency, config.max_queue)
        self.admission.variant = config.variant

    def service_names(self) -> Sequence[str]:
        return self.service_full_names

    def load_model(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> M:
        raise NotImplementedError

    def initialize(self) -> None:
        device = select_device(self.config.device)
        dtype = select_dtype(self.config.dtype, device)
        self.admission.device = str(device)
        self.models.load(self.config.registry, self.config.models,
                         lambda entry: self.load_model(entry, device, dtype))
        for model_id in self.models.ids():
            metrics.MODEL_LOADED.labels(self.name, model_id).set(1)
        log_event(log, "models loaded", stage=self.name, models=self.models.ids(),
                  device=str(device), dtype=str(dtype))

    def register(self, server: Any) -> None:
        raise NotImplementedError

    def finalize(self) -> None:
        self.admission.executor.shutdown(wait=False, cancel_futures=True)
