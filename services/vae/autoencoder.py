"""Latents <-> images with diffusers' AutoencoderKL and VaeImageProcessor. No gRPC."""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

from diffmesh.models.latent_space import vae_scale_factor
from diffmesh.models.registry import ModelEntry
from diffmesh.errors import InvalidArgument


class LatentImageCodec:
    def __init__(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> None:
        vae_dir = entry.component_dir("vae")
        config = json.loads((vae_dir / "config.json").read_text())
        # As diffusers' SDXL pipelines: a VAE marked force_upcast overflows in fp16, run it in fp32.
        if dtype == torch.float16 and config.get("force_upcast", False):
            dtype = torch.float32
        self.entry = entry
        self.device = device
        self.dtype = dtype
        self.vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, torch_dtype=dtype).to(device).eval()
        self.scale_factor = vae_scale_factor(self.vae.config)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.processor = VaeImageProcessor(vae_scale_factor=self.scale_factor)

    def check_latents(self, latents: torch.Tensor, field: str = "latents") -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels or latents.shape[0] < 1 \
                or latents.shape[2] < 1 or latents.shape[3] < 1:
            raise InvalidArgument(f"{field}.shape", list(latents.shape),
                                  f"expected [n, {self.latent_channels}, h, w] for {self.entry.id}")
        if not torch.isfinite(latents).all():
            raise InvalidArgument(field, "non-finite values", "latents must be finite")

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents [n, C, h, w] -> uint8 [n, H, W, 3], rounded exactly as diffusers' PIL output."""
        self.check_latents(latents)
        latents = latents.to(device=self.device, dtype=self.dtype)
        latents = latents / self.scaling_factor + self.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        images = self.processor.postprocess(images, output_type="np")
        return (images * 255).round().astype(np.uint8)

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray, width: int, height: int, sample: bool,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
        """uint8 [m, H, W, 3] -> scaled latents [n, C, h, w], n = len(generators); image i % m for
        latent i. Each distinct image is encoded once and its posterior sampled per generator,
        as diffusers' img2img does with one generator per image."""
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[0] < 1:
            raise InvalidArgument("pixels.shape", list(pixels.shape), "expected [n, H, W, 3] RGB")
        if pixels.shape[1] < self.scale_factor or pixels.shape[2] < self.scale_factor:
            raise InvalidArgument("pixels.shape", list(pixels.shape),
                                  f"images must be at least {self.scale_factor} pixels on each side")
        for name, size in (("width", width), ("height", height)):
            if size < 0 or size % self.scale_factor:
                raise InvalidArgument(name, size, f"must be 0 or a positive multiple of {self.scale_factor}")
        images = [PIL.Image.fromarray(np.ascontiguousarray(p)) for p in pixels]
        batch = self.processor.preprocess(images, height=height or None, width=width or None)
        batch = batch.to(device=self.device, dtype=self.dtype)
        posteriors = [self.vae.encode(batch[j:j + 1]).latent_dist for j in range(batch.shape[0])]
        latents = []
        for i, generator in enumerate(generators):
            posterior = posteriors[i % len(posteriors)]
            latents.append(posterior.sample(generator) if sample else posterior.mode())
        return (torch.cat(latents) - self.shift_factor) * self.scaling_factor
