"""Differential diffusion: change maps, feathered masks, progressive masks in the sampler."""
from __future__ import annotations

import pytest
import torch

from diffmesh.models.registry import Registry
from diffmesh.models.schedulers import SCHEDULERS
from diffmesh.errors import InvalidArgument
from services.denoiser.masks import (change_map_from_grey, change_map_from_mask, free_masks, gaussian_blur,
                                     latent_change_map, step_thresholds)
from diffmesh.models.latent_space import seeded_generators
from services.denoiser.sampler import Conditioning, DenoiseJob, UNetDenoiser

CPU = torch.device("cpu")


# --- pure functions -----------------------------------------------------------------------------
def test_thresholds_run_from_one_step_below_one_down_to_exactly_zero():
    assert step_thresholds(4).tolist() == [0.75, 0.5, 0.25, 0.0]


def test_free_masks_only_grow_and_follow_the_map():
    latent_map = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    latent_map[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    masks = free_masks(latent_map, 10)
    assert masks.shape == (10, 2, 1, 16, 16) and masks.dtype == torch.bool
    for before, after in zip(masks, masks[1:]):
        assert torch.equal(before & after, before)  # nothing free ever freezes again
    assert masks.sum(dim=(1, 2, 3, 4)).tolist() == sorted(masks.sum(dim=(1, 2, 3, 4)).tolist())
    free_steps = masks[:, 0, 0, 0, :3].sum(dim=0).tolist()
    assert free_steps == [0, 10, 5]  # 0: frozen throughout; 1: free from the first step; 0.5: half the steps
    assert torch.equal(masks[:, 0, 0, 0, 2], torch.tensor([False] * 5 + [True] * 5))
    # Each pixel is free for about (map value x steps) steps: its own strength.
    assert ((masks.sum(dim=0) - latent_map * 10).abs() <= 1).all()


def test_latent_map_is_the_mean_of_each_8x8_block():
    change_map = torch.zeros(1, 1, 16, 24)
    change_map[..., :8, :8] = 1.0
    change_map[..., 8:, 8:16] = torch.linspace(0, 1, 64).reshape(8, 8)
    latent = latent_change_map(change_map, 2, 3)
    assert latent.shape == (1, 1, 2, 3)
    assert latent[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert latent[0, 0, 1, 1].item() == pytest.approx(0.5)
    assert latent[0, 0, 1, 2].item() == 0.0


def test_grey_images_become_maps_in_zero_one():
    grey = torch.tensor([[0, 255], [51, 102]], dtype=torch.uint8)
    change_map = change_map_from_grey(grey)
    assert change_map.shape == (1, 1, 2, 2) and change_map.dtype == torch.float32
    assert change_map.flatten().tolist() == pytest.approx([0.0, 1.0, 0.2, 0.4])
    with pytest.raises(InvalidArgument):
        change_map_from_grey(grey.float())


def test_gaussian_blur_is_a_normalised_separable_gaussian():
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1.0
    blurred = gaussian_blur(impulse, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6)
    offsets = torch.arange(-6, 7, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / 2.0) ** 2)
    kernel /= kernel.sum()
    expected = torch.zeros(21, 21, dtype=torch.float64)
    expected[4:17, 4:17] = torch.outer(kernel, kernel)
    assert torch.allclose(blurred[0, 0].double(), expected, atol=1e-7)
    flat = torch.full((1, 1, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, 3.0), flat)  # replicated edges: no darkening at the border
    assert gaussian_blur(impulse, 0) is impulse


def test_feathered_mask_is_soft_at_the_edge_and_exact_far_from_it():
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[:, 32:] = 255
    hard = change_map_from_mask(mask)
    assert hard.shape == (1, 1, 64, 64) and set(hard.unique().tolist()) == {0.0, 1.0}
    soft = change_map_from_mask(mask, feather_radius=4)
    row = soft[0, 0, 10]
    assert (row[1:] >= row[:-1]).all()  # monotone across the edge
    assert row[:32 - 12].eq(0).all() and row[32 + 12:].sub(1).abs().max() < 1e-6  # beyond 3 sigma: unchanged
    assert 0.0 < row[31].item() < 0.5 < row[32].item() < 1.0
    assert soft.min() >= 0 and soft.max() <= 1
    bool_mask = change_map_from_mask(torch.ones(1, 8, 8, dtype=torch.bool))
    assert bool_mask.shape == (1, 1, 8, 8) and bool_mask.eq(1).all()
    with pytest.raises(InvalidArgument) as info:
        change_map_from_mask(mask, feather_radius=-1)
    assert info.value.field == "mask_feather"


# --- in the sampler -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def denoiser(registry):
    return UNetDenoiser(Registry.load(registry).get("tiny-sd15"), CPU, torch.float32)


INIT = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 0.8


def half_map(count=1):
    """Left half 0 (keep), right half 1 (regenerate), at image size 64x64."""
    change_map = torch.zeros(count, 1, 64, 64)
    change_map[..., 32:] = 1.0
    return change_map


def make_job(denoiser, scheduler="euler", seeds=(1, 2), **changes):
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 77, denoiser.cross_attention_dim, generator=gen)
    fields = dict(scheduler=SCHEDULERS[scheduler], steps=8, guidance_scale=5.0, width=64, height=64,
                  conditioning=Conditioning(embeds, torch.zeros_like(embeds)), generators=seeded_generators(seeds),
                  init_latents=INIT, strength=1.0, change_map=half_map())
    return DenoiseJob(**{**fields, **changes})


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "heun", "ddim", "pndm", "unipc", "lcm",
                                       "dpmpp_sde_karras"])
def test_map_zero_keeps_the_original_exactly_and_map_one_regenerates(denoiser, scheduler):
    out = denoiser.denoise([make_job(denoiser, scheduler)])[0]
    assert torch.equal(out[..., :4], INIT[..., :4])  # latent columns 0-3 <- pixel columns 0-31 (map 0)
    assert (out[..., 4:] - INIT[..., 4:]).abs().mean() > 0.5  # the map-1 half is regenerated
    assert torch.isfinite(out).all()


def test_map_all_ones_is_plain_img2img(denoiser):
    for scheduler in ("euler", "heun", "dpmpp_2m"):
        with_map = denoiser.denoise([make_job(denoiser, scheduler, change_map=torch.ones(2, 1, 64, 64))])[0]
        plain = denoiser.denoise([make_job(denoiser, scheduler, change_map=None)])[0]
        assert torch.equal(with_map, plain)


def test_deterministic_per_seed_and_broadcast_over_the_batch(denoiser):
    graded = torch.linspace(0, 1, 64).expand(1, 1, 64, 64).contiguous()
    first = denoiser.denoise([make_job(denoiser, change_map=graded)])[0]
    again = denoiser.denoise([make_job(denoiser, change_map=graded.repeat(2, 1, 1, 1))])[0]
    other = denoiser.denoise([make_job(denoiser, seeds=(3, 4), change_map=graded)])[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # More change where the map is higher: columns nearer the right drift further from the original.
    drift = (first - INIT).abs().mean(dim=(0, 1, 2))
    assert drift[-2:].mean() > drift[:2].mean()


def test_with_strength_the_map_scales_the_shortened_schedule(denoiser):
    steps = []
    [out] = denoiser.denoise([make_job(denoiser, strength=0.5)],
                             on_step=lambda _job, i, total, t: steps.append(total))
    assert steps == [4] * 4
    assert torch.equal(out[..., :4], INIT[..., :4])


def test_custom_timesteps_with_a_change_map(denoiser):
    out = denoiser.denoise([make_job(denoiser, "dpmpp_2m", steps=0, timesteps=[999, 700, 400, 150, 20])])[0]
    assert torch.equal(out[..., :4], INIT[..., :4])


@pytest.mark.parametrize("changes,field", [
    (dict(change_map=torch.zeros(1, 1, 64, 72)), "change_map.shape"),
    (dict(change_map=torch.zeros(3, 1, 64, 64)), "change_map.shape"),
    (dict(change_map=torch.zeros(1, 64, 64)), "change_map.shape"),
    (dict(change_map=torch.zeros(1, 3, 64, 64)), "change_map.shape"),
    (dict(change_map=torch.full((1, 1, 64, 64), 1.5)), "change_map"),
    (dict(change_map=torch.full((1, 1, 64, 64), float("nan"))), "change_map"),
    (dict(change_map=torch.zeros(1, 1, 64, 64, dtype=torch.uint8)), "change_map.dtype"),
    (dict(init_latents=None), "change_map"),
])
def test_bad_change_maps_name_the_field(denoiser, changes, field):
    with pytest.raises(InvalidArgument) as info:
        denoiser.check_job(make_job(denoiser, **changes))
    assert info.value.field == field
