"""Each stage's compute, alone: plain torch, no gRPC, checked against diffusers' own pieces."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffmesh.models.schedulers import SCHEDULERS
from diffmesh.errors import Cancelled, InvalidArgument
from diffmesh.models.latent_space import (generators_from_states, read_vae_scale_factor, seeded_generators,
                                          vae_scale_factor)
from services.denoiser.sampler import Conditioning, DenoiseJob, JobLimits, UNetDenoiser, img2img_steps
from services.text_encoder.encoder import ClipPromptEncoder, EmbeddingCache, PromptEmbeddings
from services.vae.autoencoder import LatentImageCodec

CPU = torch.device("cpu")


def test_sd15_prompt_embeddings_equal_the_pipelines(entries):
    entry = entries["tiny-sd15"]
    pipe = StableDiffusionPipeline.from_pretrained(entry.path, local_files_only=True)
    expected, expected_negative = pipe.encode_prompt("a cat", CPU, 1, True, negative_prompt="ugly")
    got = ClipPromptEncoder(entry, CPU, torch.float32).encode("a cat", "ugly", with_negative=True)
    assert torch.equal(got.prompt_embeds, expected) and torch.equal(got.negative_prompt_embeds, expected_negative)
    assert got.pooled_prompt_embeds is None


def test_sdxl_prompt_embeddings_equal_the_pipelines(entries):
    entry = entries["tiny-sdxl"]
    pipe = StableDiffusionXLPipeline.from_pretrained(entry.path, local_files_only=True, add_watermarker=False)
    encoder = ClipPromptEncoder(entry, CPU, torch.float32)
    for negative in ("ugly", None):
        expected = pipe.encode_prompt("a cat", device=CPU, num_images_per_prompt=1,
                                      do_classifier_free_guidance=True, negative_prompt=negative)
        got = encoder.encode("a cat", negative, with_negative=True)
        for want, have in zip(expected, (got.prompt_embeds, got.negative_prompt_embeds, got.pooled_prompt_embeds,
                                         got.negative_pooled_prompt_embeds)):
            assert torch.equal(want, have)
    assert got.prompt_embeds.shape[-1] == 48 and not got.negative_prompt_embeds.any()  # zeros: no negative


def test_embedding_cache_is_a_bounded_lru():
    cache = EmbeddingCache(2)
    value = PromptEmbeddings(torch.zeros(1))
    cache.put("a", value)
    cache.put("b", value)
    assert cache.get("a") is value  # "a" is now the most recent
    cache.put("c", value)
    assert cache.get("b") is None and cache.get("a") is value and cache.get("c") is value
    assert len(cache) == 2
    EmbeddingCache(0).put("x", value)  # capacity 0 caches nothing and does not fail


@pytest.fixture(scope="module")
def denoiser(entries):
    return UNetDenoiser(entries["tiny-sd15"], CPU, torch.float32)


def job(denoiser_model, steps=6, **changes):
    embeds = torch.zeros(1, 77, denoiser_model.cross_attention_dim)
    fields = dict(scheduler=SCHEDULERS["euler"], steps=steps, guidance_scale=5.0, width=64, height=64,
                  conditioning=Conditioning(embeds, embeds), generators=seeded_generators([1, 2]))
    return DenoiseJob(**{**fields, **changes})


def test_denoise_reports_every_step_and_is_deterministic(denoiser):
    steps = []
    first = denoiser.denoise([job(denoiser)], on_step=lambda _job, i, total, t: steps.append((i, total)))[0]
    again = denoiser.denoise([job(denoiser)])[0]
    assert steps == [(i, 6) for i in range(1, 7)]
    assert first.shape == (2, 4, 8, 8) and torch.equal(first, again)


def test_cancel_stops_the_loop_between_steps(denoiser):
    cancel = threading.Event()

    def on_step(_job, step, total, timestep):
        if step == 3:
            cancel.set()

    with pytest.raises(Cancelled, match="after 3 of 20 steps"):
        denoiser.denoise([job(denoiser, steps=20)], on_step=on_step, cancel=cancel)


def test_img2img_runs_strength_times_steps(denoiser):
    init = torch.zeros(2, 4, 8, 8)
    calls = []
    denoiser.denoise([job(denoiser, steps=10, init_latents=init, strength=0.35)],
                     on_step=lambda _job, i, total, t: calls.append(total))
    assert calls == [3, 3, 3] and img2img_steps(10, 0.35) == 3


@pytest.mark.parametrize("changes,field", [
    (dict(width=60), "width"),
    (dict(init_latents=torch.zeros(1, 4, 8, 8), strength=0.5), "init_latents.shape"),
    (dict(init_latents=torch.zeros(2, 4, 8, 8), strength=0.05), "strength"),
    (dict(conditioning=Conditioning(torch.zeros(1, 77, 32), None)), "negative_prompt_embeds"),
    # Two images: the conditioning's first dimension must be 1 (broadcast) or 2 (one row each).
    (dict(conditioning=Conditioning(torch.zeros(3, 77, 32), torch.zeros(3, 77, 32))), "prompt_embeds.shape"),
    (dict(conditioning=Conditioning(torch.zeros(77, 32), torch.zeros(77, 32))), "prompt_embeds.shape"),
    (dict(conditioning=Conditioning(torch.zeros(2, 77, 32), torch.zeros(3, 77, 32))), "negative_prompt_embeds.shape"),
    (dict(conditioning=Conditioning(torch.zeros(2, 154, 32), torch.zeros(1, 77, 32))),
     "negative_prompt_embeds.shape"),  # the negative needs the prompt's sequence length
    (dict(generators=[]), "seeds"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(steps=0), "steps"),
    (dict(guidance_rescale=1.5), "guidance_rescale"),
    (dict(guidance_rescale=float("nan")), "guidance_rescale"),
    (dict(preview_every=-1), "preview_every"),
    (dict(timesteps=[900, 500], steps=3), "steps"),
    (dict(scheduler=SCHEDULERS["ddim"], timesteps=[900, 500], steps=0), "timesteps"),
    (dict(timestep_spacing="trailing", timesteps=[900, 500], steps=0), "timestep_spacing"),
    (dict(scheduler=SCHEDULERS["pndm"], sigma_schedule="karras"), "sigma_schedule"),
    (dict(change_map=torch.zeros(1, 1, 64, 64)), "change_map"),
])
def test_check_job_names_the_field(denoiser, changes, field):
    with pytest.raises(InvalidArgument) as info:
        denoiser.check_job(job(denoiser, **changes))
    assert info.value.field == field


def test_per_image_and_broadcast_conditioning_are_accepted(denoiser):
    per_image = Conditioning(torch.zeros(2, 154, 32), torch.zeros(1, 154, 32))  # shared negative
    assert denoiser.check_job(job(denoiser, conditioning=per_image)).job.conditioning is per_image
    unguided = Conditioning(torch.zeros(2, 77, 32))  # no negative needed without guidance
    assert denoiser.check_job(job(denoiser, conditioning=unguided, guidance_scale=1.0)).timesteps.numel() == 6


@pytest.mark.parametrize("limits,changes,field", [
    (JobLimits(max_batch=1), {}, "seeds"),
    (JobLimits(max_steps=5), {}, "steps"),
    (JobLimits(max_steps=1), dict(steps=0, timesteps=[900, 500]), "timesteps"),
])
def test_serving_limits_are_checked_with_the_job(denoiser, limits, changes, field):
    with pytest.raises(InvalidArgument) as info:
        denoiser.check_job(job(denoiser, **changes), limits)
    assert info.value.field == field
    denoiser.check_job(job(denoiser, **changes), JobLimits(max_steps=6, max_batch=2))  # at the limits: fine


def test_vae_round_trip_and_seeded_posterior_sampling(entries):
    vae = LatentImageCodec(entries["tiny-sd15"], CPU, torch.float32)
    pixels = np.random.default_rng(0).integers(0, 255, (1, 40, 48, 3), dtype=np.uint8)
    gens = seeded_generators([5, 5, 6])
    latents = vae.encode(pixels, 0, 0, sample=True, generators=gens)
    assert latents.shape == (3, 4, 5, 6)
    assert torch.equal(latents[0], latents[1]) and not torch.equal(latents[0], latents[2])
    mode = vae.encode(pixels, 0, 0, sample=False, generators=seeded_generators([5]))
    assert not torch.equal(mode[0], latents[0])
    images = vae.decode(latents)
    assert images.shape == (3, 40, 48, 3) and images.dtype == np.uint8
    resized = vae.encode(pixels, 64, 32, sample=False, generators=seeded_generators([1]))
    assert resized.shape == (1, 4, 4, 8)
    with pytest.raises(InvalidArgument):
        vae.decode(torch.zeros(1, 3, 4, 4))


def test_seeded_generators_are_cpu_streams_that_states_continue():
    first, second = seeded_generators([7, 2**64 - 1])  # uint64 seeds, as the protos carry them
    assert first.device.type == "cpu" and first.initial_seed() == 7 and second.initial_seed() == 2**64 - 1
    assert torch.equal(torch.randn(3, generator=first), torch.randn(3, generator=torch.Generator().manual_seed(7)))
    states = torch.stack([first.get_state(), second.get_state()])
    continued = generators_from_states(states)
    assert torch.equal(torch.randn(4, generator=continued[0]), torch.randn(4, generator=first))
    assert torch.equal(torch.randn(4, generator=continued[1]), torch.randn(4, generator=second))
    with pytest.raises(RuntimeError):
        generators_from_states(torch.zeros(1, 16, dtype=torch.uint8))


def test_vae_scale_factor_from_a_config_or_its_channels(entries):
    assert vae_scale_factor([128, 256, 512, 512]) == 8 and vae_scale_factor({"block_out_channels": [64]}) == 1
    with pytest.raises(ValueError):
        vae_scale_factor([])
    for entry in (entry for entry in entries.values() if entry.family is not None):  # the pipelines
        from_file = read_vae_scale_factor(entry)
        assert from_file == LatentImageCodec(entry, CPU, torch.float32).scale_factor  # diffusers' FrozenDict config
        assert from_file == UNetDenoiser(entry, CPU, torch.float32).vae_scale_factor
