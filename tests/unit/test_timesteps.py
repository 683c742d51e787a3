"""Custom timestep schedules: validation, log-linear anchor interpolation, and equality with
diffusers' pipelines called with timesteps=[...]."""
from __future__ import annotations

import math

import diffusers
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from diffmesh.models.registry import Registry
from diffmesh.models.schedulers import SCHEDULERS
from diffmesh.errors import InvalidArgument
from diffmesh.models.latent_space import seeded_generators
from services.denoiser.sampler import Conditioning, DenoiseJob, UNetDenoiser
from diffmesh.models.timesteps import (FACE_DETAIL_ANCHORS, interpolate_timesteps, max_interpolated_steps,
                                         validate_timesteps)

CPU = torch.device("cpu")
CUSTOM = [999, 850, 700, 500, 301, 120, 40]


# --- validation ---------------------------------------------------------------------------------
def test_valid_schedules_come_back_as_ints():
    assert validate_timesteps([999, 500.0, 0]) == [999, 500, 0]
    assert validate_timesteps((7,)) == [7]


@pytest.mark.parametrize("timesteps,field", [
    ([], "timesteps"),
    ([999, 999], "timesteps[1]"),
    ([500, 600], "timesteps[1]"),
    ([1000, 10], "timesteps[0]"),
    ([10, -1], "timesteps[1]"),
    ([900, 10.5], "timesteps[1]"),
    ([900, True], "timesteps[1]"),
])
def test_invalid_schedules_name_the_entry(timesteps, field):
    with pytest.raises(InvalidArgument) as info:
        validate_timesteps(timesteps)
    assert info.value.field == field


# --- interpolation ------------------------------------------------------------------------------
def test_ten_steps_are_the_anchors():
    assert interpolate_timesteps(10) == list(FACE_DETAIL_ANCHORS)
    assert interpolate_timesteps(1) == [999]
    assert interpolate_timesteps(2) == [999, 13]


def test_interpolation_is_log_linear_between_anchors():
    steps = interpolate_timesteps(19)  # every anchor, plus the log-space midpoint between each pair
    assert steps[::2] == list(FACE_DETAIL_ANCHORS)
    for i, (hi, lo) in enumerate(zip(FACE_DETAIL_ANCHORS, FACE_DETAIL_ANCHORS[1:])):
        assert steps[2 * i + 1] == round(math.sqrt((hi + 1) * (lo + 1)) - 1)


@pytest.mark.parametrize("steps", [2, 3, 7, 11, 25, 50, 100, 250, 400, 700, 986, 987])
def test_any_count_is_strictly_descending_with_both_ends_kept(steps):
    schedule = interpolate_timesteps(steps)
    assert len(schedule) == steps
    assert all(a > b for a, b in zip(schedule, schedule[1:]))
    assert schedule[0] == 999 and schedule[-1] == 13
    assert validate_timesteps(schedule) == schedule


def test_duplicates_after_rounding_are_pushed_up_from_the_fine_end():
    # At 400 steps the last segment (53 -> 13) holds ~44 steps for 40 integers: rounding collides.
    schedule = interpolate_timesteps(400)
    raw = _raw(400)
    assert len(set(raw)) < len(raw)  # the plain rounding does collide
    assert all(got >= want for got, want in zip(schedule, raw))  # values only move up...
    assert schedule[:100] == raw[:100]  # ...and only where it was needed (the coarse end is untouched)
    assert interpolate_timesteps(987) == list(range(999, 12, -1))  # the limit: every integer


def test_more_steps_than_integers_between_the_ends_is_invalid():
    assert max_interpolated_steps() == 987
    for steps in (0, 988):
        with pytest.raises(InvalidArgument) as info:
            interpolate_timesteps(steps)
        assert info.value.field == "steps"
    with pytest.raises(InvalidArgument) as info:
        interpolate_timesteps(5, anchors=[900, 950])
    assert info.value.field == "anchors[1]"


def test_custom_anchors():
    assert interpolate_timesteps(3, anchors=[899, 99]) == [899, round(math.sqrt(900 * 100) - 1), 99]


def _raw(steps):
    logs = [math.log(a + 1) for a in FACE_DETAIL_ANCHORS]
    out = []
    for i in range(steps):
        position = i * 9 / (steps - 1)
        left = min(int(position), 8)
        out.append(round(math.exp(logs[left] + (logs[left + 1] - logs[left]) * (position - left)) - 1))
    return out


# --- in the sampler, against diffusers --------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15(registry):
    entry = Registry.load(registry).get("tiny-sd15")
    denoiser = UNetDenoiser(entry, CPU, torch.float32)
    pipes = {cls: cls.from_pretrained(entry.path, local_files_only=True)
             for cls in (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 77, denoiser.cross_attention_dim, generator=gen),
                        torch.randn(1, 77, denoiser.cross_attention_dim, generator=gen))
    return denoiser, pipes, cond


def make_job(sd15, scheduler, **changes):
    denoiser, _, cond = sd15
    fields = dict(scheduler=SCHEDULERS[scheduler], steps=0, guidance_scale=4.0, width=64, height=64,
                  conditioning=cond, generators=seeded_generators([21, 22]), timesteps=CUSTOM)
    return DenoiseJob(**{**fields, **changes})


def reference(sd15, pipe_cls, scheduler, **kwargs):
    _, pipes, cond = sd15
    pipe = pipes[pipe_cls]
    spec = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, spec.class_name).from_config(pipe.scheduler.config, **dict(spec.overrides))
    return pipe(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_prompt_embeds,
                guidance_scale=4.0, num_images_per_prompt=2, generator=seeded_generators([21, 22]),
                output_type="latent", **kwargs).images


def close(a, b):
    return a.shape == b.shape and (torch.equal(a, b) or (a - b).abs().max().item() < 1e-5)


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "heun", "lcm"])
def test_custom_timesteps_equal_the_pipeline(sd15, scheduler):
    denoiser = sd15[0]
    got = denoiser.denoise([make_job(sd15, scheduler)])[0]
    want = reference(sd15, StableDiffusionPipeline, scheduler, timesteps=CUSTOM, width=64, height=64)
    assert close(got, want)
    [plain] = denoiser.denoise([make_job(sd15, scheduler, timesteps=None, steps=len(CUSTOM))])
    assert not torch.equal(got, plain)


def test_steps_are_reported_over_the_custom_schedule(sd15):
    calls = []
    sd15[0].denoise([make_job(sd15, "euler", steps=len(CUSTOM))],
                    on_step=lambda _job, i, total, t: calls.append((i, t)))
    assert calls == [(i + 1, float(t)) for i, t in enumerate(CUSTOM)]


def test_face_detail_schedule_in_img2img_equals_the_pipeline(sd15):
    schedule = interpolate_timesteps(12)
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got = sd15[0].denoise([make_job(sd15, "dpmpp_2m", timesteps=schedule, init_latents=init, strength=0.5)])[0]
    want = reference(sd15, StableDiffusionImg2ImgPipeline, "dpmpp_2m", image=init, strength=0.5, timesteps=schedule)
    assert close(got, want)


@pytest.mark.parametrize("scheduler,changes,field", [
    ("ddim", {}, "timesteps"),
    ("euler_a", {}, "timesteps"),
    ("unipc", {}, "timesteps"),
    ("pndm", {}, "timesteps"),
    ("dpmpp_2m_karras", {}, "timesteps"),
    ("euler", dict(sigma_schedule="karras"), "timesteps"),
    ("euler", dict(timestep_spacing="trailing"), "timestep_spacing"),
    ("euler", dict(steps=3), "steps"),
    ("euler", dict(timesteps=[5, 10]), "timesteps[1]"),
    ("euler", dict(timesteps=[]), "timesteps"),
])
def test_rejections_name_the_field(sd15, scheduler, changes, field):
    with pytest.raises(InvalidArgument) as info:
        sd15[0].check_job(make_job(sd15, scheduler, **changes))
    assert info.value.field == field
