"""The denoiser process: `diffmesh serve denoiser` or `python -m services.denoiser`."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from diffmesh.models.pool import ModelPool
from diffmesh.models.registry import ModelEntry
from diffmesh.limits import BatchLimits, ImageSizeLimits, StepLimits, TokenWindowLimits
from diffmesh.runtime.config import ConfigError, ServerConfig, setting
from diffmesh.runtime.server import run_stage
from diffmesh.runtime.stage import ModelStage
from diffmesh.stages import STAGES
from services.denoiser.sampler import UNetDenoiser
from services.denoiser.servicer import DenoiserServicer


@dataclass
class DenoiserConfig(ImageSizeLimits, StepLimits, BatchLimits, TokenWindowLimits, ServerConfig):
    """diffmesh denoiser: the UNet sampling loop."""

    port: int = setting(STAGES["denoiser"].default_port, "gRPC port", min=0, max=65535)
    scheduler_override: str = setting("", "serve every request with this scheduler (to canary a scheduler "
                                      "change against stable); empty: the requested one")

    def validate(self) -> None:
        from diffmesh.models.schedulers import lookup_scheduler

        if self.scheduler_override and lookup_scheduler(self.scheduler_override) is None:
            raise ConfigError(f"scheduler_override: unknown scheduler {self.scheduler_override!r}")


class DenoiserStage(ModelStage[UNetDenoiser]):
    name = "denoiser"

    def load_model(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> UNetDenoiser:
        return UNetDenoiser(entry, device, dtype)

    def servicer(self, models: ModelPool[UNetDenoiser]) -> DenoiserServicer:
        config: DenoiserConfig = self.config  # type: ignore[assignment]
        return DenoiserServicer(models, self.admission, config.max_steps, config.max_batch, config.scheduler_override,
                                max_size=config.max_size, max_sequence=config.max_sequence)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(DenoiserStage, DenoiserConfig, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
