"""Vae gRPC servicer: Decode (latents -> image files / pixels) and Encode (pixels -> latents)."""
from __future__ import annotations

import grpc
import numpy as np
import torch

from diffmesh.imaging import encode_image
from diffmesh.models.latent_space import seeded_generators
from diffmesh.models.pool import ModelPool
from diffmesh.proto.v1 import tensor_pb2, vae_pb2, vae_pb2_grpc
from diffmesh.runtime import codec, metrics, telemetry
from diffmesh.errors import InvalidArgument
from diffmesh.runtime.telemetry import annotate, traced
from diffmesh.runtime.server import Admission
from services.vae.autoencoder import LatentImageCodec

_FLOATS = (tensor_pb2.FLOAT32, tensor_pb2.FLOAT16, tensor_pb2.BFLOAT16)


def _paste_back(request: vae_pb2.DecodeRequest, count: int, height: int,
                width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(pixels [1|n, H, W, 3], keep [1|n, H, W]) when the request asks for paste-back."""
    if not request.HasField("keep_mask"):
        return None
    keep = codec.to_numpy(request.keep_mask, "keep_mask", dtypes=(tensor_pb2.UINT8,), rank=3)
    pixels = codec.to_numpy(request.paste_pixels, "paste_pixels", dtypes=(tensor_pb2.UINT8,), rank=4)
    if keep.shape[0] not in (1, count) or keep.shape[1:] != (height, width):
        raise InvalidArgument("keep_mask.shape", list(keep.shape), f"expected [1 or {count}, {height}, {width}]")
    if pixels.shape[0] not in (1, count) or pixels.shape[1:] != (height, width, 3):
        raise InvalidArgument("paste_pixels.shape", list(pixels.shape), f"expected [1 or {count}, {height}, {width}, 3]")
    return pixels, keep


class VaeServicer(vae_pb2_grpc.VaeServicer):
    def __init__(self, models: ModelPool[LatentImageCodec], admission: Admission, max_batch: int,
                 png_compress_level: int) -> None:
        self._models = models
        self._admission = admission
        self._max_batch = max_batch
        self._png_level = png_compress_level

    async def Decode(self, request: vae_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> vae_pb2.DecodeResponse:
        model = self._models.get(request.model_id)
        latents = codec.to_torch(request.latents, "latents", dtypes=_FLOATS, rank=4)
        if latents.shape[0] > self._max_batch:
            raise InvalidArgument("latents.shape", list(latents.shape), f"at most {self._max_batch} images")
        if not 0 <= request.quality <= 100:
            raise InvalidArgument("quality", request.quality, "must be in [0, 100]")
        model.check_latents(latents)
        paste = _paste_back(request, latents.shape[0], latents.shape[2] * model.scale_factor,
                            latents.shape[3] * model.scale_factor)

        annotate(**{"diffmesh.model": request.model_id, "diffmesh.batch_size": int(latents.shape[0]),
                    "diffmesh.size": f"{latents.shape[3] * model.scale_factor}x{latents.shape[2] * model.scale_factor}"})
        metrics.BATCH_SIZE.labels("vae").observe(latents.shape[0])
        tracer = telemetry.tracer()

        def run() -> tuple[np.ndarray, list]:
            with tracer.start_as_current_span("vae.decode"):
                pixels = model.decode(latents)
            if paste is not None:
                pixels = np.where(paste[1][..., None] != 0, paste[0], pixels)
            if request.skip_files:
                return pixels, []
            with tracer.start_as_current_span("image.encode", attributes={"diffmesh.format": request.format}):
                return pixels, [encode_image(p, request.format, request.quality, self._png_level) for p in pixels]

        async with self._admission.slot() as usage:
            pixels, files = await self._admission.submit(usage, run)
        response = vae_pb2.DecodeResponse(images=files, usage=self._admission.report(usage))
        if request.return_tensor:
            response.pixels.CopyFrom(codec.from_numpy(pixels))
        return response

    async def Encode(self, request: vae_pb2.EncodeImageRequest,
                     context: grpc.aio.ServicerContext) -> vae_pb2.EncodeImageResponse:
        model = self._models.get(request.model_id)
        pixels = codec.to_numpy(request.pixels, "pixels", dtypes=(tensor_pb2.UINT8,), rank=4)
        sample = request.sampling != vae_pb2.MODE
        seeds = list(request.seeds)
        if not 1 <= len(seeds) <= self._max_batch:
            raise InvalidArgument("seeds", len(seeds), f"need 1 to {self._max_batch} (one per latent)")
        generators = seeded_generators(seeds)
        annotate(**{"diffmesh.model": request.model_id, "diffmesh.batch_size": len(seeds)})
        async with self._admission.slot() as usage:
            latents = await self._admission.submit(
                usage, traced("vae.encode", model.encode), pixels, request.width, request.height, sample, generators)
        states = torch.stack([g.get_state() for g in generators])
        return vae_pb2.EncodeImageResponse(latents=codec.from_torch(latents),
                                           generator_states=codec.from_torch(states),
                                           usage=self._admission.report(usage))
