"""The denoiser process: `diffmesh serve denoiser` or `python -m services.denoiser`."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from diffmesh.models.pool import ModelPool
from diffmesh.models.registry import Kind, ModelEntry, ModelError
from diffmesh.limits import BatchLimits, ImageSizeLimits, StepLimits, TokenWindowLimits
from diffmesh.runtime import metrics
from diffmesh.runtime.batching import BatchPolicy
from diffmesh.runtime.config import ConfigError, ServerConfig, setting
from diffmesh.runtime.server import run_stage
from diffmesh.runtime.stage import ModelStage
from diffmesh.stages import STAGES
from services.denoiser.adapters import attach_identity_adapter
from services.denoiser.sampler import UNetDenoiser
from services.denoiser.servicer import DenoiserServicer


@dataclass
class DenoiserConfig(ImageSizeLimits, StepLimits, BatchLimits, TokenWindowLimits, ServerConfig):
    """diffmesh denoiser: the UNet sampling loop."""

    port: int = setting(STAGES["denoiser"].default_port, "gRPC port", min=0, max=65535)
    scheduler_override: str = setting("", "serve every request with this scheduler (to canary a scheduler "
                                      "change against stable); empty: the requested one")
    # Step-level batching: each request's loop runs in its own compute slot, so max_concurrency is
    # how many requests can be mid-loop (sharing UNet calls) at once; max_batch_rows bounds a call.
    max_concurrency: int = setting(16, "requests mid-loop at once (with batching they share UNet calls); "
                                   "more wait in the queue", min=1)
    batching: bool = setting(True, "continuous step-level batching: concurrent requests share each UNet call")
    max_batch_rows: int = setting(16, "most rows in one UNet call (CFG's negative rows count); a single "
                                  "request with more runs alone", min=1)
    batch_wait_ms: float = setting(2.0, "longest a request's step waits for the others of its bucket to hand "
                                   "theirs in (0: never; a lone request never waits)", min=0, max=1000)

    def batch_policy(self) -> BatchPolicy:
        return BatchPolicy(enabled=self.batching, max_rows=self.max_batch_rows, max_wait_ms=self.batch_wait_ms)

    def validate(self) -> None:
        from diffmesh.models.schedulers import lookup_scheduler

        if self.scheduler_override and lookup_scheduler(self.scheduler_override) is None:
            raise ConfigError(f"scheduler_override: unknown scheduler {self.scheduler_override!r}")


@dataclass(frozen=True)
class AttachedAdapter:
    """What the pool holds for an identity_encoder entry: its LoRA lives in its base's UNet."""

    id: str
    base: str


DenoiserModel = Union[UNetDenoiser, AttachedAdapter]


class DenoiserStage(ModelStage[DenoiserModel]):
    """Loads pipelines (one UNetDenoiser each) and identity encoders, whose lora_weights become an
    adapter of their base pipeline's UNet (the pool loads adapters after the pipelines)."""

    name = "denoiser"

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self._pipelines: dict[str, UNetDenoiser] = {}

    def load_model(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> DenoiserModel:
        if entry.kind is Kind.PIPELINE:
            config: DenoiserConfig = self.config  # type: ignore[assignment]
            model = self._pipelines[entry.id] = UNetDenoiser(entry, device, dtype, config.batch_policy(),
                                                             metrics.batch_call_observer(entry.id))
            return model
        base = self._pipelines.get(entry.base or "")
        if base is None:
            raise ModelError(f"identity encoder {entry.id!r}: its base {entry.base!r} is not loaded by this denoiser "
                             f"(loaded pipelines: {', '.join(sorted(self._pipelines)) or 'none'}); "
                             f"load both or neither")
        attach_identity_adapter(base, entry)
        return AttachedAdapter(entry.id, base.entry.id)

    def servicer(self, models: ModelPool[DenoiserModel]) -> DenoiserServicer:
        config: DenoiserConfig = self.config  # type: ignore[assignment]
        pipelines = models.subset([model_id for model_id in models.ids() if model_id in self._pipelines])
        return DenoiserServicer(pipelines, self.admission, config.max_steps, config.max_batch,
                                config.scheduler_override, max_size=config.max_size, max_sequence=config.max_sequence)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(DenoiserStage, DenoiserConfig, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
