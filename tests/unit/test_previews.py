"""Live previews: latent2rgb projection, predicted x0, callbacks that never touch the latents."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmesh.models.registry import ModelFamily, Registry
from diffmesh.models.schedulers import SCHEDULERS, build_scheduler
from services.denoiser.previews import LATENT_RGB_FACTORS, latents_to_rgb, predicted_x0
from diffmesh.models.latent_space import seeded_generators
from services.denoiser.sampler import Conditioning, DenoiseJob, UNetDenoiser

CPU = torch.device("cpu")


def test_projection_uses_the_family_factors_and_bias():
    zeros = torch.zeros(1, 4, 2, 3)
    assert latents_to_rgb(zeros, ModelFamily.SD15).shape == (1, 2, 3, 3)
    assert latents_to_rgb(zeros, ModelFamily.SD15).dtype == np.uint8
    assert (latents_to_rgb(zeros, ModelFamily.SD15) == 128).all()  # 0 -> mid grey
    assert latents_to_rgb(zeros, ModelFamily.SDXL)[0, 0, 0].tolist() == [141, 125, 127]  # SDXL's bias
    unit = torch.zeros(1, 4, 1, 1)
    unit[0, 3] = 1.0  # channel 3 alone: (-0.2120, -0.2616, -0.7177) for SD 1.x
    assert latents_to_rgb(unit, "sd15")[0, 0, 0].tolist() == [round((1 - 0.2120) * 127.5),
                                                              round((1 - 0.2616) * 127.5),
                                                              round((1 - 0.7177) * 127.5)]
    assert (latents_to_rgb(torch.full((1, 4, 1, 1), 50.0), ModelFamily.SD15) <= 255).all()  # clamped
    assert all(len(f) == 4 and all(len(row) == 3 for row in f) for f, _ in LATENT_RGB_FACTORS.values())


@pytest.fixture(scope="module")
def models(registry):
    loaded = Registry.load(registry)
    return {family: UNetDenoiser(loaded.get(model_id), CPU, torch.float32)
            for family, model_id in ((ModelFamily.SD15, "tiny-sd15"), (ModelFamily.SDXL, "tiny-sdxl"))}


def make_job(denoiser, scheduler="euler", **changes):
    gen = torch.Generator().manual_seed(0)
    dim = denoiser.cross_attention_dim
    cond = Conditioning(torch.randn(1, 77, dim, generator=gen), torch.randn(1, 77, dim, generator=gen))
    if denoiser.is_sdxl:
        cond.pooled_prompt_embeds = torch.randn(1, denoiser.pooled_dim, generator=gen)
        cond.negative_pooled_prompt_embeds = torch.randn(1, denoiser.pooled_dim, generator=gen)
    fields = dict(scheduler=SCHEDULERS[scheduler], steps=8, guidance_scale=5.0, width=64, height=48,
                  conditioning=cond, generators=seeded_generators([5, 6]))
    return DenoiseJob(**{**fields, **changes})


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "heun", "lcm"])
@pytest.mark.parametrize("family", [ModelFamily.SD15, ModelFamily.SDXL])
def test_previews_never_change_the_latents(models, family, scheduler):
    denoiser = models[family]
    previews = []
    on = denoiser.denoise([make_job(denoiser, scheduler, preview_every=2)],
                          on_preview=lambda _job, step, total, images: previews.append((step, total, images)))[0]
    off = denoiser.denoise([make_job(denoiser, scheduler)])[0]
    assert torch.equal(on, off)
    total = 15 if scheduler == "heun" else 8  # Heun: 2 UNet calls a step but the last
    assert [(step, t) for step, t, _ in previews] == [(s, total) for s in range(2, total + 1, 2)]
    for _, _, images in previews:
        assert images.shape == (2, 6, 8, 3) and images.dtype == np.uint8


def test_no_callback_or_zero_interval_means_no_previews(models):
    denoiser = models[ModelFamily.SD15]
    calls = []
    denoiser.denoise([make_job(denoiser, preview_every=0)], on_preview=lambda *args: calls.append(args))
    denoiser.denoise([make_job(denoiser, preview_every=1)])  # no callback: nothing computed, nothing fails
    assert calls == []


def test_last_preview_is_the_final_image_for_euler(models):
    denoiser = models[ModelFamily.SD15]
    previews = []
    [latents] = denoiser.denoise([make_job(denoiser, preview_every=8)],
                                 on_preview=lambda _job, s, t, img: previews.append(img))
    assert len(previews) == 1
    diff = np.abs(previews[0].astype(int) - latents_to_rgb(latents, ModelFamily.SD15).astype(int))
    assert diff.max() <= 1  # Euler's last step lands on its x0 prediction


def test_x0_from_the_noise_prediction_matches_the_schedulers_own():
    # Euler gives pred_original_sample; the fallback formula from the scaled model input agrees.
    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading"}
    scheduler = build_scheduler(SCHEDULERS["euler"], config)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=gen) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:4]:
        model_input = scheduler.scale_model_input(latents, t)
        noise_pred = torch.randn(2, 4, 8, 8, generator=gen)
        output = scheduler.step(noise_pred, t, latents, return_dict=False)
        own = output[1]
        computed = predicted_x0(scheduler, output[:1], model_input, noise_pred, t)
        assert torch.allclose(own, computed, atol=1e-3 * own.abs().max().item())
        assert predicted_x0(scheduler, output, model_input, noise_pred, t) is own
        latents = output[0]


def test_previews_with_a_change_map_show_the_frozen_region_as_the_original(models):
    denoiser = models[ModelFamily.SD15]
    init = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    change_map = torch.zeros(1, 1, 48, 64)
    change_map[..., 32:] = 1.0
    previews = []
    job = make_job(denoiser, "dpmpp_2m", init_latents=init, change_map=change_map, preview_every=1)
    on = denoiser.denoise([job], on_preview=lambda _job, s, t, img: previews.append(img))[0]
    [off] = denoiser.denoise([make_job(denoiser, "dpmpp_2m", init_latents=init, change_map=change_map)])
    assert torch.equal(on, off)
    original = latents_to_rgb(init, ModelFamily.SD15)
    for images in previews:
        assert np.array_equal(images[:, :, :4], original[:, :, :4])
