"""Each stage's compute, alone: plain torch, no gRPC, checked against diffusers' own pieces."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffmesh.models.registry import Registry
from diffmesh.models.schedulers import SCHEDULERS
from diffmesh.errors import Cancelled, InvalidArgument
from services.denoiser.sampler import Conditioning, DenoiseJob, UNetDenoiser, generators_from_seeds, img2img_steps
from services.text_encoder.encoder import ClipPromptEncoder, EmbeddingCache, PromptEmbeddings
from services.vae.autoencoder import LatentImageCodec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def entries(registry):
    loaded = Registry.load(registry)
    return {model_id: loaded.get(model_id) for model_id in loaded.ids()}


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
                  conditioning=Conditioning(embeds, embeds), generators=generators_from_seeds([1, 2]))
    return DenoiseJob(**{**fields, **changes})


def test_denoise_reports_every_step_and_is_deterministic(denoiser):
    steps = []
    first = denoiser.denoise(job(denoiser), on_step=lambda i, total, t: steps.append((i, total)))
    again = denoiser.denoise(job(denoiser))
    assert steps == [(i, 6) for i in range(1, 7)]
    assert first.shape == (2, 4, 8, 8) and torch.equal(first, again)


def test_cancel_stops_the_loop_between_steps(denoiser):
    cancel = threading.Event()

    def on_step(step, total, timestep):
        if step == 3:
            cancel.set()

    with pytest.raises(Cancelled, match="after 3 of 20 steps"):
        denoiser.denoise(job(denoiser, steps=20), on_step=on_step, cancel=cancel)


def test_img2img_runs_strength_times_steps(denoiser):
    init = torch.zeros(2, 4, 8, 8)
    calls = []
    denoiser.denoise(job(denoiser, steps=10, init_latents=init, strength=0.35),
                     on_step=lambda i, total, t: calls.append(total))
    assert calls == [3, 3, 3] and img2img_steps(10, 0.35) == 3


@pytest.mark.parametrize("changes,field", [
    (dict(width=60), "width"),
    (dict(init_latents=torch.zeros(1, 4, 8, 8), strength=0.5), "init_latents.shape"),
    (dict(init_latents=torch.zeros(2, 4, 8, 8), strength=0.05), "strength"),
    (dict(conditioning=Conditioning(torch.zeros(1, 77, 32), None)), "negative_prompt_embeds"),
    (dict(conditioning=Conditioning(torch.zeros(2, 77, 32), torch.zeros(2, 77, 32))), "prompt_embeds.shape"),
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


def test_vae_round_trip_and_seeded_posterior_sampling(entries):
    vae = LatentImageCodec(entries["tiny-sd15"], CPU, torch.float32)
    pixels = np.random.default_rng(0).integers(0, 255, (1, 40, 48, 3), dtype=np.uint8)
    gens = generators_from_seeds([5, 5, 6])
    latents = vae.encode(pixels, 0, 0, sample=True, generators=gens)
    assert latents.shape == (3, 4, 5, 6)
    assert torch.equal(latents[0], latents[1]) and not torch.equal(latents[0], latents[2])
    mode = vae.encode(pixels, 0, 0, sample=False, generators=generators_from_seeds([5]))
    assert not torch.equal(mode[0], latents[0])
    images = vae.decode(latents)
    assert images.shape == (3, 40, 48, 3) and images.dtype == np.uint8
    resized = vae.encode(pixels, 64, 32, sample=False, generators=generators_from_seeds([1]))
    assert resized.shape == (1, 4, 4, 8)
    with pytest.raises(InvalidArgument):
        vae.decode(torch.zeros(1, 3, 4, 4))
