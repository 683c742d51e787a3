"""The vae process: `diffmesh serve vae` or `python -m services.vae`."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import grpc
import torch

from diffmesh.models.registry import ModelEntry
from diffmesh.proto.v1 import vae_pb2, vae_pb2_grpc
from diffmesh.runtime.config import ServerConfig, setting
from diffmesh.runtime.server import run_stage
from diffmesh.runtime.stage import ModelStage
from services.vae.autoencoder import LatentImageCodec
from services.vae.servicer import VaeServicer


@dataclass
class VaeConfig(ServerConfig):
    """diffmesh vae: latents <-> images."""

    port: int = setting(50063, "gRPC port", min=0, max=65535)
    max_batch: int = setting(16, "most images one call may decode or encode", min=1)
    png_compress_level: int = setting(4, "zlib level for PNG output (speed vs size)", min=0, max=9)


class VaeStage(ModelStage[LatentImageCodec]):
    name = "vae"
    service_full_names = (vae_pb2.DESCRIPTOR.services_by_name["Vae"].full_name,)

    def load_model(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> LatentImageCodec:
        return LatentImageCodec(entry, device, dtype)

    def register(self, server: grpc.aio.Server) -> None:
        config: VaeConfig = self.config  # type: ignore[assignment]
        vae_pb2_grpc.add_VaeServicer_to_server(
            VaeServicer(self.models, self.admission, config.max_batch, config.png_compress_level), server)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(VaeStage, VaeConfig, sys.argv[1:] if argv is None else argv, "diffmesh-vae")


if __name__ == "__main__":
    sys.exit(main())
