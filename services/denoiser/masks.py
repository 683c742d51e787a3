"""Differential diffusion: a per-pixel change map turned into progressive masks.

A change map is a float tensor [n or 1, 1, H, W] at image size with values in [0, 1] (a grey
image / 255): 0 keeps the pixel, 1 regenerates it fully, values between give the pixel that share
of the schedule's steps (a per-pixel strength). Over K denoising steps, a latent pixel with value m
is "free" (the UNet's result is kept) after step k when m > 1 - (k + 1) / K; otherwise it is
replaced by the original latents re-noised to the next step's noise level (the clean original
after the last step). Thresholds only fall, so the free region only grows: value 1 is free from
the first step, value 0 is frozen to the end and comes out exactly as the original latents.

Plain torch, no gRPC, no torchvision.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from diffmesh.errors import InvalidArgument


def check_change_map(change_map: torch.Tensor, count: int, height: int, width: int) -> None:
    """InvalidArgument naming `change_map.shape` / `change_map` unless it is [1 or count, 1, H, W],
    floating point, finite, within [0, 1]."""
    expected = f"[1 or {count}, 1, {height}, {width}] (one grey channel at image size)"
    if change_map.ndim != 4 or change_map.shape[0] not in (1, count) or change_map.shape[1] != 1 \
            or tuple(change_map.shape[2:]) != (height, width):
        raise InvalidArgument("change_map.shape", list(change_map.shape), f"expected {expected}")
    if not change_map.is_floating_point():
        raise InvalidArgument("change_map.dtype", str(change_map.dtype), "must be floating point in [0, 1]")
    if not bool(torch.isfinite(change_map).all()) or change_map.min() < 0 or change_map.max() > 1:
        raise InvalidArgument("change_map", f"[{float(change_map.min())}, {float(change_map.max())}]",
                              "values must be finite and in [0, 1] (grey / 255)")


def change_map_from_grey(grey: torch.Tensor) -> torch.Tensor:
    """A uint8 grey image ([H, W], [n, H, W] or [n, 1, H, W], 0-255) as a change map."""
    if grey.dtype != torch.uint8:
        raise InvalidArgument("change_map.dtype", str(grey.dtype), "grey images are uint8 0-255")
    while grey.ndim < 4:
        grey = grey.unsqueeze(0 if grey.ndim < 3 else 1)
    return grey.to(torch.float32) / 255.0


def gaussian_blur(image: torch.Tensor, radius: float) -> torch.Tensor:
    """Separable gaussian blur of [n, c, H, W] with standard deviation `radius` pixels (as PIL's
    GaussianBlur(radius)), kernel cut at 3 sigma, edges replicated (no darkening at the border)."""
    if radius <= 0:
        return image
    half = max(1, math.ceil(3.0 * radius))
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / radius) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype).to(image.device)
    n, c, h, w = image.shape
    x = image.reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, half, half), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def change_map_from_mask(mask: torch.Tensor, feather_radius: float = 0.0) -> torch.Tensor:
    """A plain inpaint mask (white / > 0.5 = regenerate; [H, W], [n, H, W] or [n, 1, H, W], any
    dtype; uint8 is read as 0-255) binarised, then feathered with a gaussian of `feather_radius`
    pixels: a soft-edged change map in [0, 1]."""
    if feather_radius < 0 or not math.isfinite(feather_radius):
        raise InvalidArgument("mask_feather", feather_radius, "must be finite and >= 0 (pixels)")
    threshold = 127.5 if mask.dtype == torch.uint8 else 0.5
    binary = (mask.to(torch.float32) > threshold).to(torch.float32)
    while binary.ndim < 4:
        binary = binary.unsqueeze(0 if binary.ndim < 3 else 1)
    return gaussian_blur(binary, feather_radius).clamp_(0.0, 1.0)


def latent_change_map(change_map: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """The change map at latent size by area averaging: each latent pixel takes the mean of the
    image block it covers (8x8 for SD), so a block that is all 0 stays exactly 0 (frozen) and no
    value leaves [0, 1]."""
    return F.interpolate(change_map.to(torch.float32), size=(latent_height, latent_width), mode="area")


def step_thresholds(steps: int) -> torch.Tensor:
    """threshold_k = 1 - (k + 1) / steps for k in 0..steps-1: from 1 - 1/steps down to exactly 0."""
    return 1.0 - torch.arange(1, steps + 1, dtype=torch.float64) / steps


def free_masks(latent_map: torch.Tensor, steps: int) -> torch.Tensor:
    """[steps, *latent_map.shape] bool: where the UNet's result is kept after each step (map value
    above that step's threshold). Each step's mask contains the previous one's."""
    thresholds = step_thresholds(steps).to(latent_map.device)
    return latent_map.to(torch.float64).unsqueeze(0) > thresholds.view(-1, *([1] * latent_map.ndim))


class ProgressiveMask:
    """Applies the change map inside the loop: after each completed step, the frozen latent pixels
    are reset to the original latents noised to the next step's level (one fixed noise draw per
    image: the same noise that started the img2img schedule), or to the clean original after the
    last step."""

    def __init__(self, latent_map: torch.Tensor, original: torch.Tensor, noise: torch.Tensor, steps: int) -> None:
        self.masks = free_masks(latent_map, steps).to(original.device)
        self.original = original
        self.noise = noise
        self.steps = steps
        self.completed = 0

    def apply(self, scheduler: Any, latents: torch.Tensor, next_timestep: torch.Tensor | None) -> torch.Tensor:
        """Call after every scheduler.step (`next_timestep`: the loop's next timestep, None after
        the last); acts only when a full step has completed: second-order schedulers such as Heun,
        or PNDM's first step, take two calls per step (Heun's last step is a single Euler call)."""
        if next_timestep is not None and not _step_completed(scheduler):
            return latents
        if self.completed >= self.steps:
            raise RuntimeError(f"progressive mask applied more than {self.steps} times")
        free = self.masks[self.completed]
        self.completed += 1
        if next_timestep is None:
            target = self.original
        else:
            # With a step index set, sigma schedulers take the noise level of the step they are
            # about to run, which is `next_timestep`'s (as diffusers' inpaint pipelines rely on).
            target = scheduler.add_noise(self.original, self.noise, next_timestep.reshape(1))
        return torch.where(free, latents, target.to(latents.dtype))

    def composite(self, x0: torch.Tensor) -> torch.Tensor:
        """A predicted clean image with the still-frozen pixels shown as the original (previews)."""
        free = self.masks[max(self.completed - 1, 0)]
        return torch.where(free, x0, self.original.to(x0.dtype))


def _step_completed(scheduler: Any) -> bool:
    # Heun / KDPM2: between their two calls `state_in_first_order` is False. PNDM (PLMS) keeps
    # `cur_sample` between the two calls of its first step.
    return bool(getattr(scheduler, "state_in_first_order", True)) and getattr(scheduler, "cur_sample", None) is None
