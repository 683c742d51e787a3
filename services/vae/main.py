"""The vae process: `diffmesh serve vae` or `python -m services.vae`."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from diffmesh.models.pool import ModelPool
from diffmesh.models.registry import ModelEntry
from diffmesh.limits import BatchLimits, ImageMemoryLimits, ImageSizeLimits
from diffmesh.runtime.config import ServerConfig, setting
from diffmesh.runtime.server import run_stage
from diffmesh.runtime.stage import ModelStage
from diffmesh.stages import STAGES
from services.vae.autoencoder import LatentImageCodec
from services.vae.servicer import VaeServicer


@dataclass
class VaeConfig(ImageSizeLimits, BatchLimits, ImageMemoryLimits, ServerConfig):
    """diffmesh vae: latents <-> images."""

    port: int = setting(STAGES["vae"].default_port, "gRPC port", min=0, max=65535)
    png_compress_level: int = setting(4, "zlib level for PNG output (speed vs size)", min=0, max=9)


class VaeStage(ModelStage[LatentImageCodec]):
    name = "vae"

    def load_model(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> LatentImageCodec:
        return LatentImageCodec(entry, device, dtype)

    def servicer(self, models: ModelPool[LatentImageCodec]) -> VaeServicer:
        config: VaeConfig = self.config  # type: ignore[assignment]
        return VaeServicer(models, self.admission, config.max_batch, config.png_compress_level,
                           max_size=config.max_size, max_image_bytes=config.max_image_decode_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(VaeStage, VaeConfig, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
