"""Continuous batching across requests: concurrent `denoise` calls (each a request's loop in its
own thread) share UNet calls through the model's StepBatcher, join and leave at step
boundaries, and each still gets what it gets alone (float64: to rounding; float32: one pixel
level after decode). Cancellation and failure stay with their own request."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from diffmesh.errors import Cancelled
from diffmesh.runtime.batching import BatchPolicy, SharedCalls
from services.denoiser.sampler import DenoiseJob, NonFiniteOutput, UNetDenoiser, batch_key
from services.vae.autoencoder import LatentImageCodec
from tests.unit.test_denoise_batch import (CPU, INIT, UNetCalls, assert_close, at_float32_guidance, conditioning,
                                           half_map, make_job, solo)

# Waits for company only as long as a straggler needs: the threads of a test all join first.
TOGETHER = BatchPolicy(max_rows=64, max_wait_ms=2000.0)


@pytest.fixture(scope="module")
def sd15(entries) -> UNetDenoiser:
    return UNetDenoiser(entries["tiny-sd15"], CPU, torch.float64, TOGETHER)


@pytest.fixture(scope="module")
def sdxl(entries) -> UNetDenoiser:
    return UNetDenoiser(entries["tiny-sdxl"], CPU, torch.float64, TOGETHER)


@pytest.fixture(scope="module")
def sdxl_f32(entries) -> UNetDenoiser:
    return UNetDenoiser(entries["tiny-sdxl"], CPU, torch.float32, TOGETHER)


def requests_for(denoiser: UNetDenoiser) -> list[DenoiseJob]:
    """Requests that differ in everything a request may differ in and still share the UNet:
    scheduler (incl. second-order Heun and stochastic euler_a), steps, guidance scale and
    rescale, img2img strength, a change map (differential diffusion), previews, seeds, count."""
    init = INIT.to(denoiser.dtype) if denoiser.latent_channels == 4 else None
    return [
        make_job(denoiser, conditioning(denoiser, 11), "euler", seeds=(1, 2), steps=6),
        make_job(denoiser, conditioning(denoiser, 12), "heun", seeds=(3,), steps=4, guidance_rescale=0.7),
        make_job(denoiser, conditioning(denoiser, 13), "euler_a", seeds=(4,), steps=5, guidance_scale=3.0),
        make_job(denoiser, conditioning(denoiser, 14), "dpmpp_2m", seeds=(5, 6), steps=8, init_latents=init,
                 strength=0.6, preview_every=2),
        make_job(denoiser, conditioning(denoiser, 15), "ddim", seeds=(7, 8), steps=6, init_latents=init,
                 strength=0.5, change_map=half_map()),
    ]


def concurrently(denoiser: UNetDenoiser, jobs: list[DenoiseJob], priorities=None, cancels=None, on_steps=None):
    """Every job as its own request (its own denoise call, thread and stats), all inside the
    batcher before the first UNet call. Returns [(latents or the exception, stats)]."""
    stats = [SharedCalls() for _ in jobs]
    # A placeholder member per bucket holds every call until all the requests have joined (a
    # bucket runs once each of its members has handed in a step): no request starts alone.
    holds = [denoiser.batcher.join(key) for key in {batch_key(job, denoiser.vae_scale_factor) for job in jobs}]
    expected = denoiser.batcher.members + len(jobs)

    def request(index: int):
        try:
            [latents] = denoiser.denoise([jobs[index]], on_steps[index] if on_steps else None,
                                         cancels[index] if cancels else None,
                                         on_preview=lambda *args: None,
                                         priority=priorities[index] if priorities else "interactive",
                                         stats=stats[index])
            return latents
        except Exception as exc:  # noqa: BLE001 - returned for the test to look at
            return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(request, index) for index in range(len(jobs))]
        while denoiser.batcher.members < expected and not any(f.done() for f in futures):
            threading.Event().wait(0.001)
        for hold in holds:
            hold.leave()
        results = [future.result(60) for future in futures]
    return list(zip(results, stats))


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_concurrent_requests_share_unet_calls_and_each_equals_its_lone_run(model, request):
    denoiser: UNetDenoiser = request.getfixturevalue(model)
    alone = [solo(denoiser, job) for job in requests_for(denoiser)]
    with UNetCalls(denoiser) as calls:
        together = concurrently(denoiser, requests_for(denoiser))
    for (got, stats), want in zip(together, alone):
        assert isinstance(got, torch.Tensor), got
        assert_close(got, want)
        assert max(stats.requests) == 5  # it shared calls with every other request
    # Per-row timesteps and leaving early: the first call holds every request's rows (CFG: 2 per
    # image), and there are as many calls as the longest request makes (Heun: 2 per step but one).
    assert calls.rows[0] == 2 * (2 + 1 + 1 + 2 + 2)
    assert len(calls.rows) == 7
    assert calls.rows == sorted(calls.rows, reverse=True)


def test_in_float32_a_batched_request_is_within_one_pixel_level_of_its_lone_run(sdxl_f32, entries):
    vae = LatentImageCodec(entries["tiny-sdxl"], CPU, torch.float32)
    alone = [solo(sdxl_f32, job) for job in at_float32_guidance(requests_for(sdxl_f32))]
    for (got, stats), want in zip(concurrently(sdxl_f32, at_float32_guidance(requests_for(sdxl_f32))), alone):
        assert max(stats.requests) > 1
        pixels = np.abs(vae.decode(got).astype(int) - vae.decode(want).astype(int))
        assert pixels.max() <= 1


def test_a_request_that_arrives_mid_loop_joins_at_the_next_step(sd15):
    first_job = lambda: make_job(sd15, conditioning(sd15, 21), "euler", seeds=(1,), steps=8)  # noqa: E731
    late_job = lambda: make_job(sd15, conditioning(sd15, 22), "heun", seeds=(2,), steps=3)  # noqa: E731
    want_first, want_late = solo(sd15, first_job()), solo(sd15, late_job())
    first_stats, late_stats, late_result = SharedCalls(), SharedCalls(), []

    def late() -> None:
        [latents] = sd15.denoise([late_job()], stats=late_stats)
        late_result.append(latents)

    worker = threading.Thread(target=late)

    def on_step(_job: int, step: int, _total: int, _t: float) -> None:
        if step == 3:  # mid-loop: the newcomer arrives and joins the batcher
            worker.start()
            while sd15.batcher.members < 2:
                threading.Event().wait(0.001)

    [got_first] = sd15.denoise([first_job()], on_step, stats=first_stats)
    worker.join(30)
    assert_close(got_first, want_first)
    assert_close(late_result[0], want_late)
    # Alone for 3 steps, then together for the newcomer's 5 UNet calls, then alone again.
    assert first_stats.requests == [1, 1, 1, 2, 2, 2, 2, 2]
    assert late_stats.requests == [2, 2, 2, 2, 2]


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish_correct(sd15):
    jobs = lambda: requests_for(sd15)[:3]  # noqa: E731
    alone = [solo(sd15, job) for job in jobs()]
    cancels = [None, threading.Event(), None]

    def cancel_at_two(_job, step, _total, _t):
        if step == 2:
            cancels[1].set()

    results = concurrently(sd15, jobs(), cancels=cancels, on_steps=[None, cancel_at_two, None])
    assert isinstance(results[1][0], Cancelled)
    assert "after 2 of" in str(results[1][0])
    for index in (0, 2):
        assert_close(results[index][0], alone[index])
    assert results[0][1].requests[2] == 2  # the others went on without it from the next step


def test_a_request_whose_prediction_goes_non_finite_fails_alone(entries):
    denoiser = UNetDenoiser(entries["tiny-sd15"], CPU, torch.float32, TOGETHER)
    good = lambda: make_job(denoiser, conditioning(denoiser, 31), seeds=(1,), steps=4)  # noqa: E731
    cond = conditioning(denoiser, 32)
    cond.prompt_embeds = cond.prompt_embeds * 1e30  # finite, but the UNet overflows on it
    want = solo(denoiser, good())
    results = concurrently(denoiser, [good(), make_job(denoiser, cond, seeds=(2,), steps=4)])
    assert isinstance(results[1][0], NonFiniteOutput), results[1][0]
    assert results[1][0].code == "INTERNAL" and "non-finite at step 1" in str(results[1][0])
    got, stats = results[0]
    assert stats.requests[0] == 2  # they did share the call
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item()


def test_rows_that_cannot_share_go_to_separate_buckets(sd15):
    jobs = lambda: [make_job(sd15, conditioning(sd15, 41), seeds=(1,), steps=3),  # noqa: E731
                    make_job(sd15, conditioning(sd15, 42), seeds=(2,), steps=3, width=48),
                    make_job(sd15, conditioning(sd15, 43, seq=154), seeds=(3,), steps=3),
                    make_job(sd15, conditioning(sd15, 44), seeds=(4,), steps=3, guidance_scale=1.0)]
    alone = [solo(sd15, job) for job in jobs()]
    results = concurrently(sd15, jobs())
    for (got, _), want in zip(results, alone):
        assert_close(got, want)
    # Unguided rows stack with guided ones (same size and text length); the other two are alone.
    assert [stats.requests for _, stats in results] == [[2] * 3, [1] * 3, [1] * 3, [2] * 3]
    assert results[0][1].rows == [3] * 3


def test_interactive_requests_get_the_rows_first_when_a_call_is_full(entries):
    denoiser = UNetDenoiser(entries["tiny-sd15"], CPU, torch.float64, BatchPolicy(max_rows=4, max_wait_ms=2000.0))
    jobs = lambda: [make_job(denoiser, conditioning(denoiser, 50 + n), seeds=(n,), steps=4)  # noqa: E731
                    for n in range(3)]
    alone = [solo(denoiser, job) for job in jobs()]
    finished: list[int] = []

    def finish(index: int):
        return lambda _job, step, total, _t: finished.append(index) if step == total else None

    results = concurrently(denoiser, jobs(), priorities=["batch", "batch", "interactive"],
                           on_steps=[finish(0), finish(1), finish(2)])
    for (got, _), want in zip(results, alone):
        assert_close(got, want)
    # A call takes two requests' rows (2 each, CFG): the interactive one is in each of the first
    # four calls and finishes first; the batch requests take turns in the other seats.
    assert finished[0] == 2
    assert results[2][1].requests == [2, 2, 2, 2]
    assert all(rows == 4 for _, stats in results for rows in stats.rows)  # every call full: 6 calls of 4


def test_with_batching_off_concurrent_requests_never_share_and_are_bit_exact(entries):
    denoiser = UNetDenoiser(entries["tiny-sd15"], CPU, torch.float64, BatchPolicy(enabled=False))
    alone = [solo(denoiser, job) for job in requests_for(denoiser)[:3]]
    for (got, stats), want in zip(concurrently(denoiser, requests_for(denoiser)[:3]), alone):
        assert torch.equal(got, want)
        assert set(stats.requests) == {1}
