"""Vae gRPC servicer: Decode (latents -> image files / pixels) and Encode (pixels -> latents)."""
from __future__ import annotations

import grpc
import numpy as np
import torch

from diffmesh.imaging import FORMATS, decode_cost, encode_image
from diffmesh.limits import INIT_IMAGE_SIDE_FACTOR
from diffmesh.models.latent_space import seeded_generators
from diffmesh.models.pool import ModelPool
from diffmesh.proto.v1 import common_pb2, tensor_pb2, vae_pb2, vae_pb2_grpc
from diffmesh.runtime import codec, metrics, telemetry
from diffmesh.errors import InvalidArgument
from diffmesh.runtime.telemetry import annotate, traced
from diffmesh.runtime.server import Admission
from services.vae.autoencoder import LatentImageCodec

_SAMPLING = frozenset(vae_pb2.LatentSampling.values())


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


def _check_format(request: vae_pb2.DecodeRequest) -> None:
    if request.format and request.format not in FORMATS:
        raise InvalidArgument("format", request.format,
                              f"must be one of {', '.join(common_pb2.ImageFormat.keys())}")


class VaeServicer(vae_pb2_grpc.VaeServicer):
    """Every request is checked against the stage's limits (diffmesh.limits: the orchestrator's
    own), before it waits for a compute slot: images per call, output sides, the memory an
    input image takes, enum values, finite non-empty latents."""

    def __init__(self, models: ModelPool[LatentImageCodec], admission: Admission, max_batch: int,
                 png_compress_level: int, max_size: int | None = None, max_image_bytes: int | None = None) -> None:
        self._models = models
        self._admission = admission
        self._max_batch = max_batch
        self._png_level = png_compress_level
        self._max_size = max_size
        self._max_image_bytes = max_image_bytes

    def _check_output_size(self, field: str, value: list[int], width: int, height: int) -> None:
        if self._max_size is not None and max(width, height) > self._max_size:
            raise InvalidArgument(field, value, f"makes {width}x{height} images; sides at most {self._max_size} pixels")

    def _check_pixels(self, pixels: np.ndarray) -> None:
        """An input image may cost what decoding its file could have (the orchestrator's decode
        budget): the resize below copies it into PIL and then into float32."""
        shape = list(pixels.shape)
        if pixels.shape[0] > self._max_batch:
            raise InvalidArgument("pixels.shape", shape, f"at most {self._max_batch} images")
        height, width = pixels.shape[1:3]
        if self._max_size is not None and max(width, height) > self._max_size * INIT_IMAGE_SIDE_FACTOR:
            raise InvalidArgument("pixels.shape", shape,
                                  f"image sides at most {self._max_size * INIT_IMAGE_SIDE_FACTOR} pixels")
        if self._max_image_bytes is not None and decode_cost(width, height) > self._max_image_bytes:
            raise InvalidArgument("pixels.shape", shape, f"an image of {width}x{height} needs more than the "
                                                         f"{self._max_image_bytes // 2**20} MiB allowed per image")

    async def Decode(self, request: vae_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> vae_pb2.DecodeResponse:
        model = self._models.get(request.model_id)
        latents = codec.to_torch(request.latents, "latents", dtypes=codec.FLOAT_DTYPES, rank=4, finite=True,
                                 nonempty=True)
        if latents.shape[0] > self._max_batch:
            raise InvalidArgument("latents.shape", list(latents.shape), f"at most {self._max_batch} images")
        self._check_output_size("latents.shape", list(latents.shape), latents.shape[3] * model.scale_factor,
                                latents.shape[2] * model.scale_factor)
        _check_format(request)
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
        pixels = codec.to_numpy(request.pixels, "pixels", dtypes=(tensor_pb2.UINT8,), rank=4, nonempty=True)
        self._check_pixels(pixels)
        if request.sampling not in _SAMPLING:
            raise InvalidArgument("sampling", request.sampling,
                                  f"must be one of {', '.join(vae_pb2.LatentSampling.keys())}")
        sample = request.sampling != vae_pb2.MODE
        seeds = list(request.seeds)
        if not 1 <= len(seeds) <= self._max_batch:
            raise InvalidArgument("seeds", len(seeds), f"need 1 to {self._max_batch} (one per latent)")
        for name, size in (("width", request.width), ("height", request.height)):
            if self._max_size is not None and not 0 <= size <= self._max_size:
                raise InvalidArgument(name, size, f"must be in [0, {self._max_size}] (0: the image's own size)")
        # 0 keeps the image's size (rounded down to the VAE's multiple): bounded like a given size.
        scale = model.scale_factor
        self._check_output_size("pixels.shape" if not (request.width and request.height) else "width",
                                list(pixels.shape), request.width or pixels.shape[2] // scale * scale,
                                request.height or pixels.shape[1] // scale * scale)
        generators = seeded_generators(seeds)
        annotate(**{"diffmesh.model": request.model_id, "diffmesh.batch_size": len(seeds)})
        async with self._admission.slot() as usage:
            latents = await self._admission.submit(
                usage, traced("vae.encode", model.encode), pixels, request.width, request.height, sample, generators)
        states = torch.stack([g.get_state() for g in generators])
        return vae_pb2.EncodeImageResponse(latents=codec.from_torch(latents),
                                           generator_states=codec.from_torch(states),
                                           usage=self._admission.report(usage))
