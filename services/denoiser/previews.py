"""Live previews: the current predicted clean latents (x0) projected to RGB without the VAE.

The projection is a per-family 4x3 linear map (plus bias) from (scaled) SD latents to RGB in
[-1, 1], the "latent2rgb" preview of ComfyUI. The factors are ComfyUI's, from
comfy/latent_formats.py (classes SD15 and SDXL: `latent_rgb_factors`, `latent_rgb_factors_bias`);
they apply to the latents as the UNet sees them (already multiplied by the VAE scaling factor),
which are the latents this sampler holds. The RGB mapping is ComfyUI's preview_to_image:
((rgb + 1) / 2).clamp(0, 1) * 255.

Plain torch / numpy, no gRPC.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffmesh.models.registry import ModelFamily

# rows: latent channels 0..3; columns: R, G, B.
LATENT_RGB_FACTORS: dict[ModelFamily, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    ModelFamily.SD15: (
        ((0.3512, 0.2297, 0.3227),
         (0.3250, 0.4974, 0.2350),
         (-0.2829, 0.1762, 0.2721),
         (-0.2120, -0.2616, -0.7177)),
        (0.0, 0.0, 0.0),
    ),
    ModelFamily.SDXL: (
        ((0.3651, 0.4232, 0.4341),
         (-0.2533, -0.0042, 0.1068),
         (0.1076, 0.1111, -0.0362),
         (-0.3165, -0.2492, -0.2188)),
        (0.1084, -0.0175, -0.0011),
    ),
}


def latents_to_rgb(latents: torch.Tensor, family: ModelFamily) -> np.ndarray:
    """[n, 4, h, w] scaled latents -> [n, h, w, 3] uint8 RGB at latent resolution (1/8 of the
    image side: a small image, ready for JPEG)."""
    factors, bias = LATENT_RGB_FACTORS[ModelFamily(family)]
    weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)
    offset = torch.tensor(bias, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("nchw,cr->nhwr", latents.to(torch.float32), weight) + offset
    pixels = ((rgb + 1.0) * 127.5).clamp_(0.0, 255.0).round_()
    return pixels.to(torch.uint8).cpu().numpy()


def predicted_x0(scheduler: Any, step_output: tuple, model_input: torch.Tensor, noise_pred: torch.Tensor,
                 timestep: torch.Tensor) -> torch.Tensor:
    """The predicted clean latents at this step: the scheduler's own (pred_original_sample /
    LCM's denoised: the second element of its step tuple) where it gives one, else computed from
    the noise prediction. `model_input` is the scaled UNet input for these latents, which every
    scheduler makes the variance-preserving x_t = sqrt(a) x0 + sqrt(1 - a) eps (k-diffusion style
    schedulers divide by sqrt(sigma^2 + 1) for exactly that), so one formula serves them all."""
    if len(step_output) > 1 and isinstance(step_output[1], torch.Tensor):
        return step_output[1]
    alphas = scheduler.alphas_cumprod
    index = int(torch.as_tensor(timestep).float().round().clamp(0, len(alphas) - 1))
    alpha = alphas[index].to(device=model_input.device, dtype=torch.float32)
    x_t, pred = model_input.to(torch.float32), noise_pred.to(torch.float32)
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction == "v_prediction":
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * pred
    if prediction == "sample":
        return pred
    return (x_t - (1 - alpha).sqrt() * pred) / alpha.sqrt()
