"""Vae gRPC servicer: Decode (latents -> image files / pixels) and Encode (pixels -> latents)."""
from __future__ import annotations

import time

import grpc
import numpy as np
import torch

from diffmesh.imaging import encode_image
from diffmesh.models.pool import ModelPool
from diffmesh.proto.v1 import tensor_pb2, vae_pb2, vae_pb2_grpc
from diffmesh.runtime import codec
from diffmesh.runtime.errors import InvalidArgument
from diffmesh.runtime.logs import elapsed_ms
from diffmesh.runtime.server import Admission
from services.vae.autoencoder import LatentImageCodec

_FLOATS = (tensor_pb2.FLOAT32, tensor_pb2.FLOAT16, tensor_pb2.BFLOAT16)


class VaeServicer(vae_pb2_grpc.VaeServicer):
    def __init__(self, models: ModelPool[LatentImageCodec], admission: Admission, max_batch: int,
                 png_compress_level: int) -> None:
        self._models = models
        self._admission = admission
        self._max_batch = max_batch
        self._png_level = png_compress_level

    async def Decode(self, request: vae_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> vae_pb2.DecodeResponse:
        start = time.perf_counter()
        model = self._models.get(request.model_id)
        latents = codec.to_torch(request.latents, "latents", dtypes=_FLOATS, rank=4)
        if latents.shape[0] > self._max_batch:
            raise InvalidArgument("latents.shape", list(latents.shape), f"at most {self._max_batch} images")
        if not 0 <= request.quality <= 100:
            raise InvalidArgument("quality", request.quality, "must be in [0, 100]")
        model.check_latents(latents)

        def run() -> tuple[np.ndarray, list]:
            pixels = model.decode(latents)
            files = [] if request.skip_files else [
                encode_image(p, request.format, request.quality, self._png_level) for p in pixels]
            return pixels, files

        async with self._admission.slot():
            pixels, files = await self._admission.submit(run)
        response = vae_pb2.DecodeResponse(images=files)
        if request.return_tensor:
            response.pixels.CopyFrom(codec.from_numpy(pixels))
        response.compute_ms = elapsed_ms(start)
        return response

    async def Encode(self, request: vae_pb2.EncodeImageRequest,
                     context: grpc.aio.ServicerContext) -> vae_pb2.EncodeImageResponse:
        start = time.perf_counter()
        model = self._models.get(request.model_id)
        pixels = codec.to_numpy(request.pixels, "pixels", dtypes=(tensor_pb2.UINT8,), rank=4)
        sample = request.sampling != vae_pb2.MODE
        seeds = list(request.seeds)
        if not 1 <= len(seeds) <= self._max_batch:
            raise InvalidArgument("seeds", len(seeds), f"need 1 to {self._max_batch} (one per latent)")
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        async with self._admission.slot():
            latents = await self._admission.submit(
                model.encode, pixels, request.width, request.height, sample, generators)
        states = torch.stack([g.get_state() for g in generators])
        return vae_pb2.EncodeImageResponse(latents=codec.from_torch(latents),
                                           generator_states=codec.from_torch(states),
                                           compute_ms=elapsed_ms(start))
