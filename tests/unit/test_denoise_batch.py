"""The batch-first denoiser: several jobs in one call share UNet calls, and every job still gets
the latents it gets alone (per image, up to batch-size-dependent float rounding)."""
from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

import services.denoiser.sampler as sampler
from diffmesh.errors import Cancelled
from diffmesh.models.latent_space import seeded_generators
from diffmesh.models.schedulers import SCHEDULERS, build_scheduler
from diffmesh.proto.v1 import denoiser_pb2
from diffmesh.runtime import codec
from diffmesh.runtime.server import Admission
from services.denoiser.sampler import Conditioning, DenoiseJob, JobLimits, UNetDenoiser
from services.denoiser.servicer import DenoiserServicer, job_from_request
from services.vae.autoencoder import LatentImageCodec

CPU = torch.device("cpu")
# A UNet call at another batch size sums in another order. In float32 that is ~5e-7 per call, and
# the tiny random UNet amplifies it over the steps (CFG x sigma per step) to ~5e-4 of the latents'
# scale (measured: 1e-2 on latents of magnitude 20-80; at most 1 pixel level after decode, the
# 1/255 DEPENDENCIES allows). That hides bugs of that size, so the logic is checked in float64,
# where the same runs differ by at most ~5e-10 (the schedulers' float32 upcasts included); float32 is
# checked against the pixel bound.
ATOL = 1e-8
# The float32 checks run their jobs at this guidance scale. The random UNet's gain grows with it:
# at 5-7 a 1e-6 relative change of the prompt rows already moves the latents by 1e-2, and on some
# CPUs (measured on an AVX-512 Xeon) batching's summation order took one img2img row 0.22 off on
# latents of 4.7 (18 pixel levels): chaos of the random weights, not of batching (float64 holds
# 1e-8 at 5-7). At 2.0 the same jobs stay within 3e-4 relative and one pixel level there.
FLOAT32_GUIDANCE = 2.0


def at_float32_guidance(jobs: list[DenoiseJob]) -> list[DenoiseJob]:
    return [dataclasses.replace(job, guidance_scale=FLOAT32_GUIDANCE) for job in jobs]


@pytest.fixture(scope="module")
def sd15(entries) -> UNetDenoiser:
    return UNetDenoiser(entries["tiny-sd15"], CPU, torch.float64)


@pytest.fixture(scope="module")
def sdxl(entries) -> UNetDenoiser:
    return UNetDenoiser(entries["tiny-sdxl"], CPU, torch.float64)


@pytest.fixture(scope="module")
def sd15_f32(entries) -> UNetDenoiser:
    return UNetDenoiser(entries["tiny-sd15"], CPU, torch.float32)


def conditioning(denoiser: UNetDenoiser, seed: int, rows: int = 1, seq: int = 77) -> Conditioning:
    """Random prompt and negative rows (and pooled ones for SDXL): a distinct 'prompt' per seed."""
    gen = torch.Generator().manual_seed(seed)
    dim = denoiser.cross_attention_dim

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(denoiser.dtype)

    cond = Conditioning(draw(rows, seq, dim), draw(rows, seq, dim))
    if denoiser.is_sdxl:
        cond.pooled_prompt_embeds = draw(rows, denoiser.pooled_dim)
        cond.negative_pooled_prompt_embeds = draw(rows, denoiser.pooled_dim)
    return cond


def make_job(denoiser: UNetDenoiser, cond: Conditioning, scheduler: str = "euler", seeds=(1, 2),
             **changes) -> DenoiseJob:
    fields = dict(scheduler=SCHEDULERS[scheduler], steps=6, guidance_scale=5.0, width=64, height=64,
                  conditioning=cond, generators=seeded_generators(seeds))
    return DenoiseJob(**{**fields, **changes})


def solo(denoiser: UNetDenoiser, job: DenoiseJob) -> torch.Tensor:
    [latents] = denoiser.denoise([job])
    return latents


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    difference = (got - want).abs().max().item()
    assert difference <= ATOL, difference


class UNetCalls:
    """Records the batch size of every UNet call (a forward pre-hook; the UNet is untouched)."""

    def __init__(self, denoiser: UNetDenoiser) -> None:
        self.rows: list[int] = []
        self._handle = denoiser.unet.register_forward_pre_hook(lambda module, args: self.rows.append(args[0].shape[0]))

    def __enter__(self) -> UNetCalls:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


INIT = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.8


def half_map() -> torch.Tensor:
    change_map = torch.zeros(1, 1, 64, 64)
    change_map[..., 32:] = 1.0
    return change_map


def mixed_jobs(sd15: UNetDenoiser) -> list[DenoiseJob]:
    """Four jobs that can share a call: different prompts, schedulers, step counts, img2img with a
    progressive mask and per-image conditioning, guidance_rescale, a stochastic scheduler."""
    return [
        make_job(sd15, conditioning(sd15, 1), "euler", seeds=(1, 2), steps=6),
        make_job(sd15, conditioning(sd15, 2), "dpmpp_2m", seeds=(3,), steps=4, guidance_scale=7.0),
        make_job(sd15, conditioning(sd15, 3), "heun", seeds=(4,), steps=3, guidance_rescale=0.5),  # 5 UNet calls
        make_job(sd15, conditioning(sd15, 4, rows=2), "ddim", seeds=(5, 6), steps=8, init_latents=INIT,
                 strength=0.5, change_map=half_map()),  # 4 steps
        make_job(sd15, conditioning(sd15, 5), "dpmpp_sde_karras", seeds=(8,), steps=5),
    ]


def test_jobs_that_can_share_run_in_one_unet_call_per_step_and_equal_their_solo_runs(sd15):
    alone = [solo(sd15, job) for job in mixed_jobs(sd15)]
    events: list[tuple[int, int, int]] = []
    with UNetCalls(sd15) as calls:
        batched = sd15.denoise(mixed_jobs(sd15), on_step=lambda job, step, total, t: events.append((job, step, total)))
    totals = [6, 4, 5, 4, 5]
    images = [2, 1, 1, 2, 1]
    # One call per step of the longest job; each job's rows (negatives and positives) while it runs.
    assert calls.rows == [sum(2 * n for n, total in zip(images, totals) if total > k) for k in range(max(totals))]
    for index, total in enumerate(totals):
        assert [(step, t) for job, step, t in events if job == index] == [(s, total) for s in range(1, total + 1)]
    for got, want in zip(batched, alone):
        assert_close(got, want)
    assert torch.equal(batched[3][..., :4], INIT[..., :4])  # the mask's frozen half is still exact
    assert not torch.equal(batched[0], batched[3])


def test_in_float32_batching_stays_within_one_pixel_level_after_decode(sd15_f32, entries):
    vae = LatentImageCodec(entries["tiny-sd15"], CPU, torch.float32)
    alone = [solo(sd15_f32, job) for job in at_float32_guidance(mixed_jobs(sd15_f32))]
    for got, want in zip(sd15_f32.denoise(at_float32_guidance(mixed_jobs(sd15_f32))), alone):
        assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item()
        pixels = np.abs(vae.decode(got).astype(int) - vae.decode(want).astype(int))
        assert pixels.max() <= 1


def test_jobs_that_cannot_share_run_as_separate_batches_in_order(sd15):
    jobs = lambda: [  # noqa: E731  (fresh generators for every run)
        make_job(sd15, conditioning(sd15, 1), seeds=(1,)),
        make_job(sd15, conditioning(sd15, 2), seeds=(2,), width=48),  # another latent size
        make_job(sd15, Conditioning(conditioning(sd15, 3).prompt_embeds), seeds=(3,), guidance_scale=1.0),  # no CFG
        make_job(sd15, conditioning(sd15, 4, seq=154), seeds=(4,), steps=3),  # another sequence length
        make_job(sd15, conditioning(sd15, 5), "dpmpp_2m", seeds=(5, 6), steps=2),  # shares with the first
    ]
    alone = [solo(sd15, job) for job in jobs()]
    with UNetCalls(sd15) as calls:
        batched = sd15.denoise(jobs())
    # Groups in order of first appearance: jobs 0 + 4, then 1, then 2, then 3.
    assert calls.rows == [2 + 4, 2 + 4] + [2] * 4 + [2] * 6 + [1] * 6 + [2] * 3
    for got, want in zip(batched, alone):
        assert_close(got, want)
    assert batched[1].shape == (1, 4, 8, 6)


def test_sdxl_jobs_with_their_own_pooled_conditioning_share_calls(sdxl):
    jobs = lambda: [  # noqa: E731
        make_job(sdxl, conditioning(sdxl, 11), "euler_a", seeds=(1, 2)),
        make_job(sdxl, conditioning(sdxl, 12, rows=2), "unipc", seeds=(3, 4), steps=4),
    ]
    alone = [solo(sdxl, job) for job in jobs()]
    with UNetCalls(sdxl) as calls:
        batched = sdxl.denoise(jobs())
    assert calls.rows == [8] * 4 + [4] * 2
    for got, want in zip(batched, alone):
        assert_close(got, want)


def test_per_image_conditioning_equals_one_image_jobs_with_the_matching_rows(sd15, sdxl):
    for denoiser in (sd15, sdxl):
        cond = conditioning(denoiser, 21, rows=3)
        seeds = (31, 32, 33)
        [together] = denoiser.denoise([make_job(denoiser, cond, "dpmpp_2m", seeds=seeds)])
        for i, seed in enumerate(seeds):
            row = Conditioning(*(None if x is None else x[i:i + 1] for x in (
                cond.prompt_embeds, cond.negative_prompt_embeds, cond.pooled_prompt_embeds,
                cond.negative_pooled_prompt_embeds)))
            assert_close(together[i:i + 1], solo(denoiser, make_job(denoiser, row, "dpmpp_2m", seeds=(seed,))))
        assert not torch.equal(together[0], together[1])


def test_per_image_conditioning_equals_the_pipeline_with_a_batch_of_prompts(sd15_f32, entries):
    pipe = StableDiffusionPipeline.from_pretrained(entries["tiny-sd15"].path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cond = conditioning(sd15_f32, 22, rows=2)
    got = solo(sd15_f32, make_job(sd15_f32, cond, seeds=(41, 42)))
    want = pipe(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_prompt_embeds,
                num_inference_steps=6, guidance_scale=5.0, width=64, height=64,
                generator=seeded_generators((41, 42)), output_type="latent").images
    assert torch.equal(got, want) or (got - want).abs().max().item() < 1e-5


def test_one_row_broadcasts_to_every_image_as_before(sd15):
    one = conditioning(sd15, 23)
    repeated = Conditioning(one.prompt_embeds.repeat(2, 1, 1), one.negative_prompt_embeds.repeat(2, 1, 1))
    broadcast = solo(sd15, make_job(sd15, one, seeds=(51, 52)))
    assert torch.equal(broadcast, solo(sd15, make_job(sd15, repeated, seeds=(51, 52))))
    # A shared negative with per-image prompts: the negative row broadcasts on its own.
    mixed = Conditioning(repeated.prompt_embeds, one.negative_prompt_embeds)
    assert torch.equal(broadcast, solo(sd15, make_job(sd15, mixed, seeds=(51, 52))))


def test_previews_say_which_job_they_belong_to(sd15):
    def jobs():
        return [make_job(sd15, conditioning(sd15, 1), seeds=(1, 2), preview_every=2),
                make_job(sd15, conditioning(sd15, 2), "heun", seeds=(3,), steps=2, preview_every=3),
                make_job(sd15, conditioning(sd15, 3), seeds=(4,))]

    def run(job_list):
        previews: dict[int, list] = {}
        latents = sd15.denoise(job_list, on_preview=lambda job, step, total, images: previews.setdefault(
            job, []).append((step, total, images)))
        return latents, previews

    batched, previews = run(jobs())
    assert sorted(previews) == [0, 1]  # job 2 asked for none
    assert [(s, t) for s, t, _ in previews[0]] == [(2, 6), (4, 6), (6, 6)]
    assert [(s, t) for s, t, _ in previews[1]] == [(3, 3)]  # Heun, 2 steps: 3 UNet calls
    for index, job in enumerate(jobs()[:2]):
        _, alone = run([job])
        for (_, _, got), (_, _, want) in zip(previews[index], alone[0]):
            assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    plain = [solo(sd15, make_job(sd15, job.conditioning, job.scheduler.name, seeds=seeds, steps=job.steps))
             for job, seeds in zip(jobs(), ((1, 2), (3,), (4,)))]
    for got, want in zip(batched, plain):
        assert_close(got, want)  # previews never touch the latents


def test_cancel_stops_the_whole_batch_and_says_where_each_job_was(sd15):
    cancel = threading.Event()

    def on_step(job, step, total, timestep):
        if job == 1 and step == 2:
            cancel.set()

    jobs = [make_job(sd15, conditioning(sd15, 1)), make_job(sd15, conditioning(sd15, 2), steps=3)]
    with pytest.raises(Cancelled, match=r"job 0: 2 of 6 steps, job 1: 2 of 3 steps"):
        sd15.denoise(jobs, on_step=on_step, cancel=cancel)


@pytest.fixture
def scheduler_builds(monkeypatch) -> list[str]:
    """The names of the schedulers the sampler builds, in order."""
    built: list[str] = []

    def counting(spec, *args, **kwargs):
        built.append(spec.name)
        return build_scheduler(spec, *args, **kwargs)

    monkeypatch.setattr(sampler, "build_scheduler", counting)
    return built


def test_a_validated_job_runs_on_the_scheduler_validation_built(sd15, scheduler_builds):
    prepared = sd15.check_job(make_job(sd15, conditioning(sd15, 1)), JobLimits(max_steps=10, max_batch=2))
    [latents] = sd15.denoise([prepared])
    assert scheduler_builds == ["euler"]
    assert latents.shape == (2, 4, 8, 8)
    sd15.denoise([make_job(sd15, conditioning(sd15, 1), "ddim"), make_job(sd15, conditioning(sd15, 2), "heun")])
    assert scheduler_builds == ["euler", "ddim", "heun"]  # unvalidated jobs: validated in denoise, once each


def test_a_prepared_job_runs_once_and_only_on_its_model(sd15, sdxl):
    prepared = sd15.check_job(make_job(sd15, conditioning(sd15, 1)))
    with pytest.raises(ValueError, match="twice"):
        sd15.denoise([prepared, prepared])
    sd15.denoise([prepared])
    with pytest.raises(ValueError, match="runs once"):
        sd15.denoise([prepared])
    with pytest.raises(ValueError, match="prepared it"):
        sdxl.denoise([sd15.check_job(make_job(sd15, conditioning(sd15, 1)))])


class _OneModel:
    def __init__(self, model: UNetDenoiser) -> None:
        self._model = model

    def get(self, model_id: str) -> UNetDenoiser:
        assert model_id == "tiny-sd15"
        return self._model


class _Context:
    """The one thing the servicer reads from its grpc context: the call's metadata (none here)."""

    @staticmethod
    def invocation_metadata() -> tuple:
        return ()


def test_servicer_sends_per_image_conditioning_and_builds_one_scheduler(sd15_f32, scheduler_builds):
    sd15 = sd15_f32  # the wire carries float32 conditioning
    cond = conditioning(sd15, 61, rows=2)
    request = denoiser_pb2.DenoiseRequest(
        model_id="tiny-sd15", scheduler="euler", steps=4, guidance_scale=5.0, width=64, height=64, seeds=[7, 8],
        prompt_embeds=codec.from_torch(cond.prompt_embeds),
        negative_prompt_embeds=codec.from_torch(cond.negative_prompt_embeds), quiet=True)
    admission = Admission("denoiser", 1, 1)
    servicer = DenoiserServicer(_OneModel(sd15), admission, max_steps=10, max_batch=4)

    async def call() -> list[denoiser_pb2.DenoiseEvent]:
        return [event async for event in servicer.Denoise(request, _Context())]

    try:
        events = asyncio.run(call())
    finally:
        admission.executor.shutdown(wait=True)
    assert [event.WhichOneof("event") for event in events] == ["result"]  # quiet: no progress events
    got = codec.to_torch(events[0].result.latents, "latents")
    assert scheduler_builds == ["euler"]  # validated before the queue, run on the same scheduler
    assert torch.equal(got, solo(sd15, make_job(sd15, cond, seeds=(7, 8), steps=4)))  # the same computation
    assert job_from_request(request).conditioning.prompt_embeds.shape == (2, 77, sd15.cross_attention_dim)
