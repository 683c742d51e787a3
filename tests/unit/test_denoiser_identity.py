"""The denoiser's half of PhotoMaker identity: the merge step (text-only conditioning up to
start_merge_step, the identity-fused conditioning after it, indexed over the full schedule) and
the identity encoders' LoRA as switchable adapters of the served UNet."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from diffmesh.errors import Cancelled, InvalidArgument
from diffmesh.models.latent_space import seeded_generators
from diffmesh.models.schedulers import SCHEDULERS
from diffmesh.proto.v1 import denoiser_pb2
from diffmesh.runtime import codec
from diffmesh.runtime.config import load_config
from services.denoiser.adapters import attach_identity_adapter
from services.denoiser.main import AttachedAdapter, DenoiserConfig, DenoiserStage
from services.denoiser.sampler import Conditioning, DenoiseJob, UNetDenoiser, share_key
from services.denoiser.servicer import job_from_request

CPU = torch.device("cpu")
# float64: batch-size-dependent summation order only (as test_denoise_batch.py). The DDIM img2img
# job's float32 scheduler upcasts reach 1.5e-8 batched vs alone with no merge at all (measured) and
# 2.9e-8 with one; a merge one step off moves the latents by more than 1e-2.
ATOL = 1e-7
IDENTITY = "photomaker-tiny"
OTHER_IDENTITY = "photomaker-tiny-arcface"


@pytest.fixture(scope="module")
def sdxl(entries) -> UNetDenoiser:
    """The plain UNet: no adapter was ever loaded into it."""
    return UNetDenoiser(entries["tiny-sdxl"], CPU, torch.float64)


@pytest.fixture(scope="module")
def with_adapters(entries) -> UNetDenoiser:
    model = UNetDenoiser(entries["tiny-sdxl"], CPU, torch.float64)
    for identity in (IDENTITY, OTHER_IDENTITY):
        attach_identity_adapter(model, entries[identity])
    return model


def conditioning(denoiser: UNetDenoiser, seed: int, rows: int = 1, merged: bool = True) -> Conditioning:
    """Random text-only, negative and merged rows (a distinct 'prompt' and 'identity' per seed)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(denoiser.dtype)

    dim, pooled = denoiser.cross_attention_dim, denoiser.pooled_dim
    cond = Conditioning(draw(rows, 77, dim), draw(rows, 77, dim), draw(rows, pooled), draw(rows, pooled))
    if merged:
        cond.merged_prompt_embeds, cond.merged_pooled_prompt_embeds = draw(rows, 77, dim), draw(rows, pooled)
    return cond


def text_only(cond: Conditioning) -> Conditioning:
    return Conditioning(cond.prompt_embeds, cond.negative_prompt_embeds, cond.pooled_prompt_embeds,
                        cond.negative_pooled_prompt_embeds)


def merged_as_prompt(cond: Conditioning) -> Conditioning:
    return Conditioning(cond.merged_prompt_embeds, cond.negative_prompt_embeds, cond.merged_pooled_prompt_embeds,
                        cond.negative_pooled_prompt_embeds)


def make_job(cond: Conditioning, scheduler: str = "euler", seeds=(1, 2), **changes) -> DenoiseJob:
    fields = dict(scheduler=SCHEDULERS[scheduler], steps=6, guidance_scale=4.0, width=128, height=128,
                  conditioning=cond, generators=seeded_generators(seeds))
    return DenoiseJob(**{**fields, **changes})


def solo(denoiser: UNetDenoiser, job: DenoiseJob) -> torch.Tensor:
    [latents] = denoiser.denoise([job])
    return latents


def init_latents(denoiser: UNetDenoiser, count: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(count, 4, 16, 16, generator=gen, dtype=denoiser.dtype) * 0.8


class PositiveRows:
    """The positive text rows (encoder_hidden_states' second half under CFG) of every UNet call."""

    def __init__(self, denoiser: UNetDenoiser) -> None:
        self.calls: list[torch.Tensor] = []
        self._handle = denoiser.unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        embeds = kwargs["encoder_hidden_states"]
        self.calls.append(embeds[embeds.shape[0] // 2:].clone())

    def which(self, cond: Conditioning) -> list[str]:
        """Per call: "text" or "merged", whichever rows it got (one-row conditioning, any n)."""
        def kind(rows: torch.Tensor) -> str:
            if all(torch.equal(row, cond.prompt_embeds[0]) for row in rows):
                return "text"
            assert all(torch.equal(row, cond.merged_prompt_embeds[0]) for row in rows)
            return "merged"
        return [kind(rows) for rows in self.calls]

    def __enter__(self) -> PositiveRows:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


# --- the merge step ---------------------------------------------------------------------------


def test_a_merge_step_at_or_past_the_last_index_is_exactly_the_text_only_result(sdxl):
    cond = conditioning(sdxl, 1)
    want = solo(sdxl, make_job(text_only(cond)))
    for last in (5, 6, 1000):  # 6 steps: indices 0..5
        assert torch.equal(solo(sdxl, make_job(cond, start_merge_step=last)), want)


def test_start_merge_step_minus_one_is_exactly_the_merged_rows_sent_as_the_prompt(sdxl):
    cond = conditioning(sdxl, 2)
    assert torch.equal(solo(sdxl, make_job(cond, start_merge_step=-1)), solo(sdxl, make_job(merged_as_prompt(cond))))


def test_a_step_in_between_differs_from_both_and_switches_right_after_it(sdxl):
    cond = conditioning(sdxl, 3)
    with PositiveRows(sdxl) as rows:
        got = solo(sdxl, make_job(cond, start_merge_step=2))
    assert rows.which(cond) == ["text"] * 3 + ["merged"] * 3  # indices 0, 1, 2 <= 2
    assert not torch.equal(got, solo(sdxl, make_job(text_only(cond))))
    assert not torch.equal(got, solo(sdxl, make_job(merged_as_prompt(cond))))


def test_img2img_indexes_the_full_schedule_not_the_steps_it_runs(sdxl):
    cond = conditioning(sdxl, 4)
    # 10 steps at strength 0.5 run the schedule's indices 5..9; 6 is the last text-only one.
    img2img = dict(steps=10, strength=0.5, init_latents=init_latents(sdxl))
    with PositiveRows(sdxl) as rows:
        got = solo(sdxl, make_job(cond, start_merge_step=6, **img2img))
    assert rows.which(cond) == ["text", "text", "merged", "merged", "merged"]  # by run step: all text
    assert not torch.equal(got, solo(sdxl, make_job(text_only(cond), **img2img)))
    # A merge step before the part that runs: merged from the first call.
    assert torch.equal(solo(sdxl, make_job(cond, start_merge_step=3, **img2img)),
                       solo(sdxl, make_job(merged_as_prompt(cond), **img2img)))


def test_heun_indexes_the_timesteps_array_with_its_repeated_entries(sdxl):
    cond = conditioning(sdxl, 5)
    with PositiveRows(sdxl) as rows:
        solo(sdxl, make_job(cond, "heun", steps=3, start_merge_step=1))
    # 3 Heun steps are 5 UNet calls over timesteps [t0, t1, t1, t2, t2]: PhotoMaker's enumerate(timesteps).
    assert rows.which(cond) == ["text", "text", "merged", "merged", "merged"]


def test_jobs_with_different_merge_steps_share_unet_calls_and_equal_their_solo_runs(sdxl):
    def jobs() -> list[DenoiseJob]:
        return [make_job(conditioning(sdxl, 6), seeds=(1, 2), start_merge_step=1),
                make_job(conditioning(sdxl, 7, rows=2), "dpmpp_2m", seeds=(3, 4), steps=5, start_merge_step=3),
                make_job(conditioning(sdxl, 8, merged=False), seeds=(5,)),
                make_job(conditioning(sdxl, 9), "ddim", seeds=(6, 7), steps=8, strength=0.5,
                         init_latents=init_latents(sdxl), start_merge_step=5)]  # indices 4..7: merges after 5

    alone = [solo(sdxl, job) for job in jobs()]
    sizes: list[int] = []
    handle = sdxl.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        batched = sdxl.denoise(jobs())
    finally:
        handle.remove()
    assert sizes == [4 + 4 + 2 + 4] * 4 + [4 + 4 + 2] + [4 + 2]  # one call per step for all
    for got, want in zip(batched, alone):
        assert (got - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("change, field", [
    (lambda c: setattr(c, "merged_prompt_embeds", c.merged_prompt_embeds[:, :50]), "merged_prompt_embeds.shape"),
    (lambda c: setattr(c, "merged_prompt_embeds", c.merged_prompt_embeds.repeat(3, 1, 1)),
     "merged_prompt_embeds.shape"),
    (lambda c: setattr(c, "merged_pooled_prompt_embeds", None), "merged_pooled_prompt_embeds.shape"),
    (lambda c: setattr(c, "merged_pooled_prompt_embeds", c.merged_pooled_prompt_embeds[:, :3]),
     "merged_pooled_prompt_embeds.shape"),
    (lambda c: setattr(c, "merged_prompt_embeds", None), "merged_pooled_prompt_embeds"),
])
def test_merged_conditioning_is_validated_like_the_prompt(sdxl, change, field):
    cond = conditioning(sdxl, 10)
    change(cond)
    with pytest.raises(InvalidArgument) as caught:
        sdxl.check_job(make_job(cond, start_merge_step=2))
    assert caught.value.field == field


def test_start_merge_step_below_minus_one_is_rejected(sdxl):
    with pytest.raises(InvalidArgument) as caught:
        sdxl.check_job(make_job(conditioning(sdxl, 11), start_merge_step=-2))
    assert caught.value.field == "start_merge_step"


# --- adapters ---------------------------------------------------------------------------------


def test_adapters_are_attached_disabled_so_plain_jobs_compute_exactly_as_before(sdxl, with_adapters):
    assert with_adapters.adapters == [IDENTITY, OTHER_IDENTITY] and sdxl.adapters == []
    cond = conditioning(sdxl, 12, merged=False)
    plain = solo(sdxl, make_job(cond))
    assert torch.equal(solo(with_adapters, make_job(cond)), plain)
    on = solo(with_adapters, make_job(cond, adapters=(IDENTITY,)))
    assert (on - plain).abs().max().item() > 1e-3  # the LoRA changes the output
    other = solo(with_adapters, make_job(cond, adapters=(OTHER_IDENTITY,)))
    assert not torch.equal(other, on)
    # Switching back and forth leaves no trace: each set computes what it computed before.
    assert torch.equal(solo(with_adapters, make_job(cond)), plain)
    assert torch.equal(solo(with_adapters, make_job(cond, adapters=(IDENTITY,))), on)


def test_an_unknown_or_repeated_adapter_is_rejected_before_any_work(sdxl, with_adapters):
    cond = conditioning(sdxl, 13)
    for model, adapters in ((sdxl, (IDENTITY,)), (with_adapters, ("photomaker",)),
                            (with_adapters, (IDENTITY, IDENTITY))):
        calls: list[int] = []
        handle = model.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            with pytest.raises(InvalidArgument) as caught:
                model.denoise([make_job(cond), make_job(cond, adapters=adapters)])
        finally:
            handle.remove()
        assert caught.value.field == "adapters" and calls == []
    assert f"known: {IDENTITY}, {OTHER_IDENTITY}" in str(
        pytest.raises(InvalidArgument, with_adapters.check_job, make_job(cond, adapters=("x",))).value)


def test_jobs_with_different_adapter_sets_never_share_a_unet_call(with_adapters):
    cond = conditioning(with_adapters, 14, merged=False)
    assert share_key(make_job(cond), 8) != share_key(make_job(cond, adapters=(IDENTITY,)), 8)
    assert share_key(make_job(cond, adapters=(IDENTITY, OTHER_IDENTITY)), 8) == \
        share_key(make_job(cond, adapters=(OTHER_IDENTITY, IDENTITY)), 8)

    def jobs() -> list[DenoiseJob]:
        return [make_job(cond, seeds=(1,)), make_job(cond, seeds=(2,), adapters=(IDENTITY,)),
                make_job(cond, seeds=(3,), steps=3)]

    alone = [solo(with_adapters, job) for job in jobs()]
    active: list[tuple] = []
    handle = with_adapters.unet.register_forward_pre_hook(
        lambda module, args: active.append((args[0].shape[0], with_adapters.adapter_switch.active)))
    try:
        batched = with_adapters.denoise(jobs())
    finally:
        handle.remove()
    assert active == [(4, ())] * 3 + [(2, ())] * 3 + [(2, (IDENTITY,))] * 6
    for got, want in zip(batched, alone):
        assert (got - want).abs().max().item() <= ATOL


def test_concurrent_calls_with_different_adapter_sets_take_turns_and_get_their_solo_results(with_adapters):
    cond = conditioning(with_adapters, 15)
    sets = [(IDENTITY,), (OTHER_IDENTITY,), (), (IDENTITY, OTHER_IDENTITY)]
    alone = [solo(with_adapters, make_job(cond, adapters=s, start_merge_step=2)) for s in sets]
    lock, running, overlaps = threading.Lock(), [], []

    def enter(module, args):
        with lock:
            running.append(with_adapters.adapter_switch.active)
            if len(set(running)) > 1:
                overlaps.append(tuple(running))

    def leave(module, args, output):
        with lock:
            running.remove(with_adapters.adapter_switch.active)

    switches = with_adapters.adapter_switch.switches
    hooks = [with_adapters.unet.register_forward_pre_hook(enter), with_adapters.unet.register_forward_hook(leave)]
    try:
        with ThreadPoolExecutor(len(sets)) as pool:
            results = list(pool.map(lambda s: solo(with_adapters, make_job(cond, adapters=s, start_merge_step=2)),
                                    sets))
    finally:
        for hook in hooks:
            hook.remove()
    assert overlaps == []  # never two adapter sets inside the UNet at once
    assert with_adapters.adapter_switch.switches - switches >= 2 * len(sets)  # they took turns, step by step
    for got, want in zip(results, alone):
        assert torch.equal(got, want)


def test_a_call_waiting_for_another_adapter_set_can_be_cancelled(with_adapters):
    cond = conditioning(with_adapters, 16, merged=False)
    cancel, outcome = threading.Event(), []

    def run() -> None:
        try:
            solo_job = make_job(cond, adapters=(IDENTITY,))
            with_adapters.denoise([solo_job], cancel=cancel)
            outcome.append("ran")
        except Cancelled as exc:
            outcome.append(str(exc))

    with with_adapters.adapter_switch.using((OTHER_IDENTITY,)):  # another call holds the UNet
        worker = threading.Thread(target=run)
        worker.start()
        worker.join(0.3)
        assert worker.is_alive()  # waiting for its turn
        cancel.set()
        worker.join(5)
    assert outcome == ["cancelled by the caller after 0 of 6 steps"]


# --- the stage and the wire -------------------------------------------------------------------


def test_the_stage_attaches_each_identity_encoders_lora_to_its_base_pipeline(registry):
    config = load_config(DenoiserConfig, ["--registry", str(registry), "--device", "cpu"], environ={})
    stage = DenoiserStage(config)
    try:
        models = stage.initialize()
        assert models.get(IDENTITY) == AttachedAdapter(IDENTITY, "tiny-sdxl")
        assert models.get("tiny-sdxl").adapters == [IDENTITY, OTHER_IDENTITY]
        assert models.get("tiny-sd15").adapters == []
        servicer_models = stage.servicer(models)._models
        with pytest.raises(InvalidArgument, match="model_id"):  # an adapter is not a model to denoise with
            servicer_models.get(IDENTITY)
    finally:
        stage.admission.executor.shutdown(wait=True)


def test_the_wire_carries_merged_conditioning_the_merge_step_and_adapters(sdxl):
    cond = conditioning(sdxl, 17)
    wire = {name: codec.from_torch(getattr(cond, name).float()) for name in (
        "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "merged_prompt_embeds", "merged_pooled_prompt_embeds")}
    request = denoiser_pb2.DenoiseRequest(model_id="tiny-sdxl", scheduler="euler", steps=6, guidance_scale=4.0,
                                          width=128, height=128, seeds=[1], start_merge_step=3,
                                          adapters=[IDENTITY], **wire)
    job = job_from_request(request)
    assert torch.equal(job.conditioning.merged_prompt_embeds, cond.merged_prompt_embeds.float())
    assert torch.equal(job.conditioning.merged_pooled_prompt_embeds, cond.merged_pooled_prompt_embeds.float())
    assert job.start_merge_step == 3 and tuple(job.adapters) == (IDENTITY,)
    plain = job_from_request(denoiser_pb2.DenoiseRequest(
        model_id="tiny-sdxl", scheduler="euler", steps=6, seeds=[1], prompt_embeds=wire["prompt_embeds"]))
    assert plain.conditioning.merged_prompt_embeds is None and tuple(plain.adapters) == ()
    # A merge step without merged conditioning would be ignored silently: rejected instead.
    lone_step = denoiser_pb2.DenoiseRequest(model_id="tiny-sdxl", scheduler="euler", steps=6, seeds=[1],
                                            prompt_embeds=wire["prompt_embeds"], start_merge_step=3)
    with pytest.raises(InvalidArgument) as caught:
        job_from_request(lone_step)
    assert caught.value.field == "start_merge_step"
    nan = cond.merged_prompt_embeds.float().clone()
    nan[0, 0, 0] = float("nan")
    request.merged_prompt_embeds.CopyFrom(codec.from_torch(nan))
    with pytest.raises(InvalidArgument, match="merged_prompt_embeds"):
        job_from_request(request)
