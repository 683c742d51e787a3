"""The UNet sampling loop: plain torch + diffusers, no gRPC.

Mirrors diffusers' StableDiffusion(XL)(Img2Img)Pipeline step for step (latent preparation, CFG
batch order, SDXL added conditions, scheduler calls, generator use), so that the same weights,
scheduler and seeds give the same latents.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from diffmesh.models.registry import ModelEntry, ModelFamily
from diffmesh.models.schedulers import SchedulerSpec, build_scheduler
from diffmesh.runtime.errors import Cancelled, InvalidArgument

ProgressFn = Callable[[int, int, float], None]


@dataclass
class Conditioning:
    """Text conditioning for one prompt: [1, seq, D] (+ pooled [1, P] for SDXL)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


@dataclass
class DenoiseJob:
    scheduler: SchedulerSpec
    steps: int
    guidance_scale: float
    width: int
    height: int
    conditioning: Conditioning
    generators: list[torch.Generator]  # one per image, on the CPU (device-independent seeds)
    init_latents: torch.Tensor | None = None  # img2img: scaled latents [n, C, h, w]
    strength: float = 1.0

    @property
    def count(self) -> int:
        return len(self.generators)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


def generators_from_seeds(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def generators_from_states(states: torch.Tensor) -> list[torch.Generator]:
    generators = []
    for row in states:
        generator = torch.Generator("cpu")
        generator.set_state(row.contiguous().clone())
        generators.append(generator)
    return generators


def img2img_steps(steps: int, strength: float) -> int:
    """Steps an img2img call actually runs (diffusers' get_timesteps)."""
    return min(int(steps * strength), steps)


class UNetDenoiser:
    """One loaded UNet and its scheduler config; `denoise` is safe to call from several threads
    (each call builds its own scheduler; the UNet is used read-only under inference_mode)."""

    def __init__(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> None:
        self.entry = entry
        self.device = device
        self.dtype = dtype
        self.unet = UNet2DConditionModel.from_pretrained(
            entry.component_dir("unet"), local_files_only=True, torch_dtype=dtype).to(device).eval()
        scheduler_dir = entry.component_dir("scheduler")
        self.scheduler_config: dict[str, Any] = json.loads((scheduler_dir / "scheduler_config.json").read_text())
        self.vae_scale_factor = self._vae_scale_factor(entry)
        self.is_sdxl = entry.family == ModelFamily.SDXL
        config = self.unet.config
        self.latent_channels = int(config.in_channels)
        self.cross_attention_dim = int(config.cross_attention_dim)
        self.pooled_dim = (int(config.projection_class_embeddings_input_dim)
                           - 6 * int(config.addition_time_embed_dim)) if self.is_sdxl else None

    @staticmethod
    def _vae_scale_factor(entry: ModelEntry) -> int:
        vae_config = json.loads((entry.component_dir("vae") / "config.json").read_text())
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    # --- validation of what arrived over the wire, against this model -----------------------
    def check_job(self, job: DenoiseJob) -> None:
        cond = job.conditioning
        if cond.prompt_embeds.ndim != 3 or cond.prompt_embeds.shape[0] != 1 \
                or cond.prompt_embeds.shape[2] != self.cross_attention_dim:
            raise InvalidArgument("prompt_embeds.shape", list(cond.prompt_embeds.shape),
                                  f"expected [1, seq, {self.cross_attention_dim}] for {self.entry.id}")
        if job.guided:
            neg = cond.negative_prompt_embeds
            if neg is None:
                raise InvalidArgument("negative_prompt_embeds", None, "required when guidance_scale > 1")
            if tuple(neg.shape) != tuple(cond.prompt_embeds.shape):
                raise InvalidArgument("negative_prompt_embeds.shape", list(neg.shape),
                                      f"must equal prompt_embeds.shape {list(cond.prompt_embeds.shape)}")
        if self.is_sdxl:
            pooled_fields = [("pooled_prompt_embeds", cond.pooled_prompt_embeds)]
            if job.guided:
                pooled_fields.append(("negative_pooled_prompt_embeds", cond.negative_pooled_prompt_embeds))
            for name, pooled in pooled_fields:
                if pooled is None or tuple(pooled.shape) != (1, self.pooled_dim):
                    raise InvalidArgument(f"{name}.shape", None if pooled is None else list(pooled.shape),
                                          f"SDXL needs [1, {self.pooled_dim}]")
        for name, size in (("width", job.width), ("height", job.height)):
            if size <= 0 or size % self.vae_scale_factor:
                raise InvalidArgument(name, size, f"must be a positive multiple of {self.vae_scale_factor}")
        if job.init_latents is not None:
            expected = (job.count, self.latent_channels, job.height // self.vae_scale_factor,
                        job.width // self.vae_scale_factor)
            if tuple(job.init_latents.shape) != expected:
                raise InvalidArgument("init_latents.shape", list(job.init_latents.shape),
                                      f"expected {list(expected)}")
            if not 0.0 < job.strength <= 1.0 or img2img_steps(job.steps, job.strength) < 1:
                raise InvalidArgument("strength", job.strength,
                                      "must be in (0, 1] and leave at least one step of the schedule")

    # --- the loop ---------------------------------------------------------------------------
    @torch.inference_mode()
    def denoise(self, job: DenoiseJob, on_step: ProgressFn | None = None,
                cancel: threading.Event | None = None) -> torch.Tensor:
        self.check_job(job)
        device, dtype, n = self.device, self.dtype, job.count
        scheduler = build_scheduler(job.scheduler, self.scheduler_config)
        generators = job.generators

        scheduler.set_timesteps(job.steps, device=device)
        timesteps = scheduler.timesteps
        if job.init_latents is None:
            shape = (n, self.latent_channels, job.height // self.vae_scale_factor,
                     job.width // self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
            latents = latents * scheduler.init_noise_sigma
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
        else:
            run_steps = img2img_steps(job.steps, job.strength)
            t_start = max(job.steps - run_steps, 0)
            timesteps = timesteps[t_start * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            init = job.init_latents.to(device=device, dtype=dtype)
            noise = randn_tensor(tuple(init.shape), generator=generators, device=device, dtype=dtype)
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(n))

        embeds, added = self._conditioning(job, n)
        extra = self._step_kwargs(scheduler, generators)
        total = len(timesteps)
        for index, t in enumerate(timesteps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled by the caller after {index} of {total} steps")
            model_input = torch.cat([latents] * 2) if job.guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds,
                                   added_cond_kwargs=added, return_dict=False)[0]
            if job.guided:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + job.guidance_scale * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            if on_step is not None:
                on_step(index + 1, total, float(t))
        return latents

    def _conditioning(self, job: DenoiseJob, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        cond = job.conditioning

        def per_image(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=self.device, dtype=self.dtype).repeat(n, *([1] * (x.ndim - 1)))

        embeds = per_image(cond.prompt_embeds)
        if job.guided:
            embeds = torch.cat([per_image(cond.negative_prompt_embeds), embeds])
        if not self.is_sdxl:
            return embeds, None
        # SDXL micro-conditioning: original size, crop top-left, target size (diffusers' defaults).
        time_ids = torch.tensor([[job.height, job.width, 0, 0, job.height, job.width]], dtype=self.dtype)
        text_embeds = per_image(cond.pooled_prompt_embeds)
        if job.guided:
            text_embeds = torch.cat([per_image(cond.negative_pooled_prompt_embeds), text_embeds])
            time_ids = torch.cat([time_ids, time_ids])
        time_ids = time_ids.to(self.device).repeat(n, 1)
        return embeds, {"text_embeds": text_embeds, "time_ids": time_ids}

    @staticmethod
    def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
        # As diffusers' prepare_extra_step_kwargs: eta (0) and the generators, where step takes them.
        import inspect

        params = inspect.signature(scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = 0.0
        if "generator" in params:
            kwargs["generator"] = generators
        return kwargs
