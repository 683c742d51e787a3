"""The UNet sampling loop: plain torch + diffusers, no gRPC.

Mirrors diffusers' StableDiffusion(XL)(Img2Img)Pipeline step for step (latent preparation, CFG
batch order, SDXL added conditions, scheduler calls, generator use, custom timesteps as
retrieve_timesteps passes them, guidance_rescale as rescale_noise_cfg), so that the same weights,
scheduler and seeds give the same latents. On top of that: progressive masks from a change map
(differential diffusion, masks.py) and live previews (previews.py), neither of which touches the
latents when unused.
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from diffmesh.models.registry import ModelEntry, ModelFamily
from diffmesh.models.schedulers import SchedulerSpec, build_scheduler
from diffmesh.errors import Cancelled, InvalidArgument
from services.denoiser.masks import ProgressiveMask, check_change_map, latent_change_map
from services.denoiser.previews import latents_to_rgb, predicted_x0
from diffmesh.models.timesteps import validate_timesteps

ProgressFn = Callable[[int, int, float], None]
# (step, total, images): step as on_step's (1-based), images [n, h, w, 3] uint8 at latent size.
PreviewFn = Callable[[int, int, np.ndarray], None]


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
    # Explicit descending schedule (set_timesteps(timesteps=...)); `steps` must then be 0 or its length.
    timesteps: list[int] | None = None
    timestep_spacing: str | None = None  # "leading" | "trailing" | "linspace"; None/"": the config's
    sigma_schedule: str | None = None  # "karras" | "exponential"; None/"": the scheduler's own
    guidance_rescale: float = 0.0  # rescale_noise_cfg's factor, in [0, 1]; only with CFG
    # Differential diffusion (needs init_latents): [n or 1, 1, H, W] in [0, 1] at image size;
    # 0 keeps the pixel, 1 regenerates it.
    change_map: torch.Tensor | None = None
    preview_every: int = 0  # > 0: on_preview every that many steps

    @property
    def count(self) -> int:
        return len(self.generators)

    @property
    def schedule_steps(self) -> int:
        """Steps of the full schedule (before img2img's strength cut)."""
        return len(self.timesteps) if self.timesteps is not None else self.steps

    @property
    def run_steps(self) -> int:
        """Denoising steps this job runs (each may take several UNet calls for Heun)."""
        if self.init_latents is None:
            return self.schedule_steps
        return img2img_steps(self.schedule_steps, self.strength)

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


def rescale_guidance(guided: torch.Tensor, text: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (arXiv:2305.08891, section 3.4): match the guided prediction's per-image
    standard deviation to the text prediction's, blended by `factor` (diffusers' rescale_noise_cfg)."""
    dims = list(range(1, text.ndim))
    ratio = text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return factor * (guided * ratio) + (1 - factor) * guided


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
        if job.timesteps is None:
            if job.steps < 1:
                raise InvalidArgument("steps", job.steps, "must be >= 1")
        else:
            validate_timesteps(job.timesteps, int(self.scheduler_config.get("num_train_timesteps", 1000)))
            if job.steps not in (0, len(job.timesteps)):
                raise InvalidArgument("steps", job.steps, f"must be 0 or len(timesteps) = {len(job.timesteps)}")
        if job.init_latents is not None:
            expected = (job.count, self.latent_channels, job.height // self.vae_scale_factor,
                        job.width // self.vae_scale_factor)
            if tuple(job.init_latents.shape) != expected:
                raise InvalidArgument("init_latents.shape", list(job.init_latents.shape),
                                      f"expected {list(expected)}")
            if not 0.0 < job.strength <= 1.0 or job.run_steps < 1:
                raise InvalidArgument("strength", job.strength,
                                      "must be in (0, 1] and leave at least one step of the schedule")
        if not math.isfinite(job.guidance_rescale) or not 0.0 <= job.guidance_rescale <= 1.0:
            raise InvalidArgument("guidance_rescale", job.guidance_rescale, "must be in [0, 1]")
        if job.preview_every < 0:
            raise InvalidArgument("preview_every", job.preview_every, "must be >= 0 (0: no previews)")
        if job.change_map is not None:
            if job.init_latents is None:
                raise InvalidArgument("change_map", list(job.change_map.shape), "needs init_latents (img2img)")
            check_change_map(job.change_map, job.count, job.height, job.width)
        self._schedule(job)  # scheduler options and the schedule itself: rejected here, before any work

    # --- the loop ---------------------------------------------------------------------------
    @torch.inference_mode()
    def denoise(self, job: DenoiseJob, on_step: ProgressFn | None = None,
                cancel: threading.Event | None = None, on_preview: PreviewFn | None = None) -> torch.Tensor:
        self.check_job(job)
        scheduler, timesteps = self._schedule(job)
        latents, noise = self._initial_latents(job, scheduler, timesteps)
        mask = None
        if job.change_map is not None:
            latent_map = latent_change_map(job.change_map, latents.shape[-2], latents.shape[-1])
            original = job.init_latents.to(device=self.device, dtype=self.dtype)
            mask = ProgressiveMask(latent_map.to(self.device), original, noise, job.run_steps)
        embeds, added = self._conditioning(job, job.count)
        extra = self._step_kwargs(scheduler, job.generators)
        total = len(timesteps)
        for index, t in enumerate(timesteps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled by the caller after {index} of {total} steps")
            model_input = torch.cat([latents] * 2) if job.guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = self._guide(job, self.unet(model_input, t, encoder_hidden_states=embeds,
                                                    added_cond_kwargs=added, return_dict=False)[0])
            output = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)
            latents = output[0]
            if mask is not None:
                latents = mask.apply(scheduler, latents, timesteps[index + 1] if index + 1 < total else None)
            if on_step is not None:
                on_step(index + 1, total, float(t))
            if on_preview is not None and job.preview_every > 0 and (index + 1) % job.preview_every == 0:
                x0 = predicted_x0(scheduler, output, model_input[-job.count:], noise_pred, t)
                if mask is not None:
                    x0 = mask.composite(x0)
                on_preview(index + 1, total, latents_to_rgb(x0, self.entry.family))
        if mask is not None and mask.completed != mask.steps:
            raise RuntimeError(f"progressive mask ran {mask.completed} of {mask.steps} steps")
        return latents

    def _schedule(self, job: DenoiseJob) -> tuple[Any, torch.Tensor]:
        """A fresh scheduler with its timesteps set (custom ones as retrieve_timesteps passes them),
        and the timesteps this job runs (img2img: the tail that strength leaves, as get_timesteps)."""
        custom = job.timesteps is not None
        scheduler = build_scheduler(job.scheduler, self.scheduler_config, job.timestep_spacing,
                                    job.sigma_schedule, custom_timesteps=custom)
        try:
            if custom:
                scheduler.set_timesteps(timesteps=list(job.timesteps), device=self.device)
            else:
                scheduler.set_timesteps(job.steps, device=self.device)
        except ValueError as exc:  # the scheduler's own limits (LCM: at most 50 steps, ...)
            field, value = ("timesteps", job.timesteps) if custom else ("steps", job.steps)
            raise InvalidArgument(field, value, f"not accepted by scheduler {job.scheduler.name}: {exc}") from None
        timesteps = scheduler.timesteps
        begin = 0
        if job.init_latents is not None:
            begin = max(job.schedule_steps - job.run_steps, 0) * scheduler.order
            timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        return scheduler, timesteps

    def _initial_latents(self, job: DenoiseJob, scheduler: Any,
                         timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """txt2img: seeded noise scaled to the first sigma. img2img: init latents noised to the
        first timestep; that noise is returned too (progressive masks re-noise with it)."""
        n, generators = job.count, job.generators
        if job.init_latents is None:
            shape = (n, self.latent_channels, job.height // self.vae_scale_factor,
                     job.width // self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
            return latents * scheduler.init_noise_sigma, None
        init = job.init_latents.to(device=self.device, dtype=self.dtype)
        noise = randn_tensor(tuple(init.shape), generator=generators, device=self.device, dtype=self.dtype)
        return scheduler.add_noise(init, noise, timesteps[:1].repeat(n)), noise

    @staticmethod
    def _guide(job: DenoiseJob, noise_pred: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over the [negatives..., positives...] batch (only when
        guidance_scale > 1: otherwise the UNet ran on the positives alone), then guidance_rescale."""
        if not job.guided:
            return noise_pred
        uncond, text = noise_pred.chunk(2)
        guided = uncond + job.guidance_scale * (text - uncond)
        if job.guidance_rescale > 0.0:
            guided = rescale_guidance(guided, text, job.guidance_rescale)
        return guided

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
