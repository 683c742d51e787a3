"""Every named scheduler (and its options) in the mesh-free sampler equals diffusers' own pipeline
with that scheduler class built from the model's scheduler config; guidance_rescale too."""
from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffmesh.models.schedulers import (SCHEDULERS, SIGMA_SCHEDULES, build_scheduler, list_schedulers,
                                        lookup_scheduler, require_scheduler, scheduler_names, scheduler_overrides)
from diffmesh.errors import InvalidArgument
from diffmesh.models.latent_space import seeded_generators
from services.denoiser.sampler import Conditioning, DenoiseJob, UNetDenoiser

CPU = torch.device("cpu")
TOLERANCE = 1e-5

# The reference for each name, written out independently of SCHEDULERS' overrides.
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_sde_karras": ("DPMSolverMultistepScheduler",
                         {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


class Model:
    """A sampler and the diffusers pipeline on the same weights, with fixed random conditioning."""

    def __init__(self, entry, pipeline_cls):
        self.denoiser = UNetDenoiser(entry, CPU, torch.float32)
        extra = {"add_watermarker": False} if pipeline_cls is StableDiffusionXLPipeline else {}
        self.pipe = pipeline_cls.from_pretrained(entry.path, local_files_only=True, **extra)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_config = dict(self.pipe.scheduler.config)
        gen = torch.Generator().manual_seed(0)
        dim = self.denoiser.cross_attention_dim
        self.cond = Conditioning(torch.randn(1, 77, dim, generator=gen), torch.randn(1, 77, dim, generator=gen))
        if self.denoiser.is_sdxl:
            self.cond.pooled_prompt_embeds = torch.randn(1, self.denoiser.pooled_dim, generator=gen)
            self.cond.negative_pooled_prompt_embeds = torch.randn(1, self.denoiser.pooled_dim, generator=gen)

    def job(self, scheduler="euler", seeds=(11, 12), **changes) -> DenoiseJob:
        fields = dict(scheduler=SCHEDULERS[scheduler], steps=6, guidance_scale=5.0, width=64, height=64,
                      conditioning=self.cond, generators=seeded_generators(seeds))
        return DenoiseJob(**{**fields, **changes})

    def reference(self, class_name, overrides, seeds=(11, 12), steps=6, guidance_scale=5.0, width=64, height=64,
                  **kwargs) -> torch.Tensor:
        self.pipe.scheduler = getattr(diffusers, class_name).from_config(self.base_config, **overrides)
        cond = self.cond
        embeds = dict(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_prompt_embeds)
        if self.denoiser.is_sdxl:
            embeds.update(pooled_prompt_embeds=cond.pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=cond.negative_pooled_prompt_embeds)
        return self.pipe(**embeds, num_inference_steps=steps, guidance_scale=guidance_scale, width=width,
                         height=height, num_images_per_prompt=len(seeds), generator=seeded_generators(seeds),
                         output_type="latent", **kwargs).images


@pytest.fixture(scope="module")
def sd15(entries):
    return Model(entries["tiny-sd15"], StableDiffusionPipeline)


@pytest.fixture(scope="module")
def sdxl(entries):
    return Model(entries["tiny-sdxl"], StableDiffusionXLPipeline)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.equal(got, want) or (got - want).abs().max().item() < TOLERANCE, (got - want).abs().max().item()


def test_reference_table_covers_every_name():
    assert sorted(REFERENCE) == sorted(SCHEDULERS)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_sd15_scheduler_equals_the_pipeline(sd15, name):
    got = sd15.denoiser.denoise([sd15.job(name)])[0]
    want = sd15.reference(*REFERENCE[name])
    assert_same(got, want)
    assert not torch.equal(got[0], got[1])  # per-image generators: two different images


@pytest.mark.parametrize("name", ["euler_a", "heun", "dpmpp_sde_karras", "unipc", "lcm"])
def test_sdxl_scheduler_equals_the_pipeline(sdxl, name):
    assert_same(sdxl.denoiser.denoise([sdxl.job(name)])[0], sdxl.reference(*REFERENCE[name]))


@pytest.mark.parametrize("name,spacing,sigmas", [
    ("ddim", "trailing", None),
    ("euler_a", "trailing", None),
    ("pndm", "linspace", None),
    ("euler", "trailing", "karras"),
    ("heun", None, "exponential"),
    ("dpmpp_2m", "trailing", "exponential"),
    ("unipc", "leading", "karras"),
    ("dpmpp_2m_karras", "linspace", "karras"),
])
def test_options_equal_the_pipeline_with_the_config_override(sd15, name, spacing, sigmas):
    class_name, overrides = REFERENCE[name]
    overrides = dict(overrides)
    if spacing:
        overrides["timestep_spacing"] = spacing
    if sigmas:
        overrides.update(use_karras_sigmas=sigmas == "karras", use_exponential_sigmas=sigmas == "exponential")
    got = sd15.denoiser.denoise([sd15.job(name, timestep_spacing=spacing, sigma_schedule=sigmas)])[0]
    assert_same(got, sd15.reference(class_name, overrides))
    plain = sd15.denoiser.denoise([sd15.job(name)])[0]
    if (spacing, sigmas) != ("linspace", "karras"):  # dpmpp_2m_karras: karras ignores the spacing
        assert not torch.equal(got, plain)  # the option did something


def test_guidance_rescale_equals_the_pipeline(sd15, sdxl):
    for model in (sd15, sdxl):
        got = model.denoiser.denoise([model.job("euler", guidance_rescale=0.7)])[0]
        assert_same(got, model.reference(*REFERENCE["euler"], guidance_rescale=0.7))
        assert not torch.equal(got, model.denoiser.denoise([model.job("euler")])[0])


def test_guidance_at_most_one_skips_the_unconditional_pass(sd15):
    batches = []
    handle = sd15.denoiser.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        got = sd15.denoiser.denoise([sd15.job("euler", guidance_scale=1.0,
                                              conditioning=Conditioning(sd15.cond.prompt_embeds))])[0]
    finally:
        handle.remove()
    assert batches == [2] * 6  # two images, no negatives
    assert_same(got, sd15.reference(*REFERENCE["euler"], guidance_scale=1.0))


def test_sde_scheduler_is_deterministic_per_seed_and_per_image(sd15):
    first = sd15.denoiser.denoise([sd15.job("dpmpp_sde_karras", seeds=(3, 4))])[0]
    again = sd15.denoiser.denoise([sd15.job("dpmpp_sde_karras", seeds=(3, 4))])[0]
    single = sd15.denoiser.denoise([sd15.job("dpmpp_sde_karras", seeds=(4,))])[0]
    other = sd15.denoiser.denoise([sd15.job("dpmpp_sde_karras", seeds=(5,))])[0]
    assert torch.equal(first, again)
    # Image i of a batch is that seed alone, up to float rounding (the UNet's batch size changes
    # summation order: Euler shows the same ~1e-4 relative difference).
    scale = first.abs().max().item()
    assert (single[0] - first[1]).abs().max().item() < 1e-3 * scale
    assert (single[0] - other[0]).abs().max().item() > 0.1 * scale


@pytest.mark.parametrize("name,changes,field", [
    ("lcm", dict(timestep_spacing="trailing"), "timestep_spacing"),
    ("euler", dict(timestep_spacing="sideways"), "timestep_spacing"),
    ("ddim", dict(sigma_schedule="karras"), "sigma_schedule"),
    ("euler_a", dict(sigma_schedule="exponential"), "sigma_schedule"),
    ("euler", dict(sigma_schedule="beta"), "sigma_schedule"),
    ("dpmpp_2m_karras", dict(sigma_schedule="exponential"), "sigma_schedule"),
    ("lcm", dict(steps=60), "steps"),  # LCM's own limit: original_inference_steps (50)
])
def test_unsupported_options_are_invalid_arguments(sd15, name, changes, field):
    with pytest.raises(InvalidArgument) as info:
        sd15.denoiser.check_job(sd15.job(name, **changes))
    assert info.value.field == field


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(InvalidArgument) as info:
        require_scheduler("dpm_fast")
    assert info.value.field == "scheduler" and "euler_a" in str(info.value) and "LCMScheduler" in str(info.value)
    assert require_scheduler("euler") is SCHEDULERS["euler"]
    assert require_scheduler("EulerDiscreteScheduler").class_name == "EulerDiscreteScheduler"
    assert lookup_scheduler("nope") is None and "dpmpp_sde_karras" in scheduler_names()


def test_listing_has_a_line_per_scheduler():
    specs = list_schedulers()
    assert [spec.name for spec in specs] == list(SCHEDULERS)
    assert all(spec.description and spec.summary() for spec in specs)
    assert "custom timesteps" in SCHEDULERS["euler"].summary()
    assert len(list_schedulers(aliases=True)) > len(specs)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_capability_flags_match_the_diffusers_class(name):
    spec = SCHEDULERS[name]
    cls = getattr(diffusers, spec.class_name)
    init = inspect.signature(cls.__init__).parameters
    set_timesteps = inspect.signature(cls.set_timesteps).parameters
    assert spec.spacing == ("config.timestep_spacing" in inspect.getsource(cls.set_timesteps))
    flags = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}
    assert set(spec.sigma_schedules) == {s for s in SIGMA_SCHEDULES if flags[s] in init}
    assert spec.custom_timesteps == ("timesteps" in set_timesteps)


def test_overrides_set_every_sigma_flag_so_they_never_conflict():
    overrides = scheduler_overrides(SCHEDULERS["dpmpp_2m_karras"], sigma_schedule="karras")
    assert overrides["use_karras_sigmas"] is True and overrides["use_exponential_sigmas"] is False
    scheduler = build_scheduler(SCHEDULERS["euler"], {"use_karras_sigmas": True}, sigma_schedule="exponential")
    assert scheduler.config.use_exponential_sigmas and not scheduler.config.use_karras_sigmas
