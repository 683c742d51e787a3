"""The shape shared by the model-serving stages: a pool of models of the kinds the stage table
says the stage loads, loaded at start-up on the configured device; an admission gate in front of
the compute pool; one gRPC service whose servicer is built from the loaded pool."""
from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

import torch

from diffmesh.models.pool import ModelPool
from diffmesh.models.registry import ModelEntry
from diffmesh.runtime.config import ServerConfig
from diffmesh.runtime.device import select_device, select_dtype
from diffmesh.runtime import metrics
from diffmesh.runtime.logs import log_event
from diffmesh.runtime.server import Admission
from diffmesh.stages import STAGES

M = TypeVar("M")
log = logging.getLogger("diffmesh.stage")


class ModelStage(Generic[M]):
    name = "stage"  # the stage table's name

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.admission = Admission(self.name, config.max_concurrency, config.max_queue)
        self.admission.variant = config.variant

    def load_model(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> M:
        raise NotImplementedError

    def initialize(self) -> ModelPool[M]:
        device = select_device(self.config.device)
        dtype = select_dtype(self.config.dtype, device)
        self.admission.device = str(device)
        models: ModelPool[M] = ModelPool()
        models.load(self.config.registry, self.config.models, lambda entry: self.load_model(entry, device, dtype),
                    kinds=STAGES[self.name].loads)
        for model_id in models.ids():
            metrics.MODEL_LOADED.labels(self.name, model_id).set(1)
        log_event(log, "models loaded", stage=self.name, models=models.ids(), device=str(device), dtype=str(dtype))
        return models

    def servicer(self, models: ModelPool[M]) -> Any:
        raise NotImplementedError

    async def finalize(self) -> None:
        self.admission.executor.shutdown(wait=False, cancel_futures=True)
