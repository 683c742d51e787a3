"""The UNet sampling loop: plain torch + diffusers, no gRPC.

Mirrors diffusers' StableDiffusion(XL)(Img2Img)Pipeline step for step (latent preparation, CFG
batch order, SDXL added conditions, scheduler calls, generator use, custom timesteps as
retrieve_timesteps passes them, guidance_rescale as rescale_noise_cfg), so that the same weights,
scheduler and seeds give the same latents, per image. On top of that: progressive masks from a
change map (differential diffusion, masks.py) and live previews (previews.py), neither of which
touches the latents when unused.

Batch-first: `UNetDenoiser.denoise` takes a list of jobs. Jobs whose rows can share a UNet call
(same latent size, same text sequence length, all guided or all unguided, the same adapters:
`share_key`) run in one UNet call per step, each with its own scheduler instance (diffusers'
schedulers hold a step index and are not thread-safe) and a per-row timestep
(UNet2DConditionModel takes a [B] tensor), so jobs
with different schedulers, step counts, strengths, prompts or masks can share the model; a job
whose schedule is shorter leaves the batch when it ends. Jobs that cannot share run as separate
groups, one after another.

Validation happens once: `check_job` returns a PreparedJob (the job with its scheduler built and
its timesteps set), which `denoise` runs without building anything again.

Identity conditioning (PhotoMaker V2's merge step): a job may carry merged conditioning (the
prompt with the identity fused in) and a start_merge_step. The UNet call whose index into the
scheduler's FULL timesteps array (before img2img's strength cut; for order-2 schedulers such as
Heun that array repeats timesteps, one entry per UNet call) is i uses the text-only prompt rows
when i <= start_merge_step and the merged rows after; -1 merges from the first call. This is
PhotoMaker's own `for i, t in enumerate(timesteps): if i <= start_merge_step`, with i counted over
the whole schedule, so an img2img job that runs the tail of the schedule starts at index
len(full timesteps) - len(run timesteps). Negative rows never change.

Across requests (continuous, step-level batching): each UNetDenoiser owns a StepBatcher
(diffmesh.runtime.batching). A `denoise` call's loop hands it one model evaluation per step (its
rows' latents, per-row timesteps, conditioning and SDXL added conditions); evaluations of other
concurrent `denoise` calls in the same bucket (`batch_key`: latent size, text length, adapters;
guided and unguided rows stack fine) go into the same UNet call, so a request that arrives while
others are mid-loop joins at their next step and one that finishes leaves at once. Everything
else (scheduler, guidance, masks, previews, generators, cancellation) stays in the request's own
thread, so requests never share state but the UNet's forward pass. A request whose prediction is
not finite fails alone (NonFiniteOutput), whatever it was batched with.

Adapters: a job names LoRA adapters attached to this UNet (adapters.py); jobs with different
adapter sets never share a UNet call (share_key), and calls from different threads with different
sets never run the UNet at the same time (AdapterSwitch around each UNet call).
"""
from __future__ import annotations

import inspect
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from diffmesh.errors import Cancelled, InvalidArgument, MeshError
from diffmesh.models.latent_space import read_vae_scale_factor
from diffmesh.models.registry import ModelEntry, ModelFamily
from diffmesh.models.schedulers import SchedulerSpec, build_scheduler
from diffmesh.models.timesteps import validate_timesteps
from diffmesh.runtime.batching import BatchPolicy, Member, OnCall, SharedCalls, StepBatcher, group_indices
from services.denoiser.adapters import AdapterSet, AdapterSwitch, adapter_set
from services.denoiser.masks import ProgressiveMask, check_change_map, latent_change_map
from services.denoiser.previews import latents_to_rgb, predicted_x0

# (job_index, step, total, timestep): job_index is the job's position in the list given to
# `denoise`; step is 1-based; total is the UNet calls that job runs.
ProgressFn = Callable[[int, int, int, float], None]
# (job_index, step, total, images): step as on_step's, images [n, h, w, 3] uint8 at latent size.
PreviewFn = Callable[[int, int, int, np.ndarray], None]


class NonFiniteOutput(MeshError):
    """The UNet's prediction for a request's rows was NaN or infinite (inputs that overflow the
    model, or a numerically broken model): the request fails instead of returning a NaN image."""

    code = "INTERNAL"


@dataclass(frozen=True)
class UNetInputs:
    """One model evaluation: the rows a request hands the UNet for one step."""

    sample: torch.Tensor  # [rows, C, h, w], already scale_model_input'ed
    timesteps: torch.Tensor  # [rows] float32
    embeds: torch.Tensor  # encoder_hidden_states [rows, seq, D]
    added: dict[str, torch.Tensor] | None  # SDXL added_cond_kwargs, [rows, ...] each

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])


@dataclass
class Conditioning:
    """Text conditioning of one job of n images.

    prompt_embeds / negative_prompt_embeds: [n, seq, D] (row i conditions image i: images of one
    job may have different prompts or identities) or [1, seq, D] (one row for every image); the
    negative needs the prompt's seq length, its first dimension is chosen on its own (a shared
    negative with per-image prompts is fine). SDXL's pooled_prompt_embeds /
    negative_pooled_prompt_embeds: [n, P] or [1, P] likewise. The negatives are needed only with
    classifier-free guidance (guidance_scale > 1).

    merged_prompt_embeds / merged_pooled_prompt_embeds (identity conditioning, optional): the
    prompt with the identity fused in, shaped like prompt_embeds / pooled_prompt_embeds (SDXL
    needs both); they replace the positive rows after the job's start_merge_step (see the module
    docstring).
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    merged_prompt_embeds: torch.Tensor | None = None
    merged_pooled_prompt_embeds: torch.Tensor | None = None

    @property
    def merges(self) -> bool:
        return self.merged_prompt_embeds is not None


@dataclass
class DenoiseJob:
    scheduler: SchedulerSpec
    steps: int
    guidance_scale: float
    width: int
    height: int
    conditioning: Conditioning
    generators: list[torch.Generator]  # one per image, on the CPU (device-independent seeds)
    init_latents: torch.Tensor | None = None  # img2img: scaled latents [n, C, h, w]
    strength: float = 1.0
    # Explicit descending schedule (set_timesteps(timesteps=...)); `steps` must then be 0 or its length.
    timesteps: list[int] | None = None
    timestep_spacing: str | None = None  # "leading" | "trailing" | "linspace"; None/"": the config's
    sigma_schedule: str | None = None  # "karras" | "exponential"; None/"": the scheduler's own
    guidance_rescale: float = 0.0  # rescale_noise_cfg's factor, in [0, 1]; only with CFG
    # Differential diffusion (needs init_latents): [n or 1, 1, H, W] in [0, 1] at image size;
    # 0 keeps the pixel, 1 regenerates it.
    change_map: torch.Tensor | None = None
    preview_every: int = 0  # > 0: on_preview every that many steps
    # With merged conditioning: the last index into the full timesteps array that still uses the
    # text-only rows (-1: merged from the first UNet call). Ignored without merged conditioning.
    start_merge_step: int = -1
    adapters: Sequence[str] = ()  # LoRA adapters attached to the UNet, by registry id; (): the plain UNet

    @property
    def count(self) -> int:
        return len(self.generators)

    @property
    def schedule_steps(self) -> int:
        """Steps of the full schedule (before img2img's strength cut)."""
        return len(self.timesteps) if self.timesteps is not None else self.steps

    @property
    def run_steps(self) -> int:
        """Denoising steps this job runs (each may take several UNet calls for Heun)."""
        if self.init_latents is None:
            return self.schedule_steps
        return img2img_steps(self.schedule_steps, self.strength)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class JobLimits:
    """The serving limits a job must stay within (the server's configuration); None: no limit."""

    max_steps: int | None = None  # steps, or custom timesteps, of the full schedule
    max_batch: int | None = None  # images in one job
    max_size: int | None = None  # width and height, pixels
    max_sequence: int | None = None  # text sequence length of the embeddings (77 per CLIP window)


@dataclass(eq=False)
class PreparedJob:
    """A job `check_job` accepted, with its own fresh scheduler (timesteps set) and the timesteps
    it runs. Schedulers keep a step index, so a prepared job runs once, on the model that
    prepared it."""

    job: DenoiseJob
    scheduler: Any
    timesteps: torch.Tensor
    owner: UNetDenoiser = field(repr=False)
    used: bool = False


def img2img_steps(steps: int, strength: float) -> int:
    """Steps an img2img call actually runs (diffusers' get_timesteps)."""
    return min(int(steps * strength), steps)


def rescale_guidance(guided: torch.Tensor, text: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (arXiv:2305.08891, section 3.4): match the guided prediction's per-image
    standard deviation to the text prediction's, blended by `factor` (diffusers' rescale_noise_cfg)."""
    dims = list(range(1, text.ndim))
    ratio = text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return factor * (guided * ratio) + (1 - factor) * guided


def share_key(job: DenoiseJob, vae_scale_factor: int) -> tuple[int, int, int, bool, AdapterSet]:
    """Jobs with equal keys can share one UNet call per step: their rows stack into one batch
    (latent height and width, text sequence length, guided or not, which decides whether a job
    contributes negative rows, and the adapter set, which is UNet state for the whole call). The
    model is the same by construction: one UNetDenoiser."""
    return (job.height // vae_scale_factor, job.width // vae_scale_factor,
            int(job.conditioning.prompt_embeds.shape[1]), job.guided, job_adapter_set(job))


def batch_key(job: DenoiseJob, vae_scale_factor: int) -> tuple[int, int, int, AdapterSet]:
    """The StepBatcher bucket of a job's rows: evaluations of different requests with equal keys
    stack into one UNet call (guided or not does not matter at the row level)."""
    height, width, sequence, _, adapters = share_key(job, vae_scale_factor)
    return height, width, sequence, adapters


def job_adapter_set(job: DenoiseJob) -> AdapterSet:
    """The adapters a job runs with, in their canonical order (check_job rejected repeats)."""
    return tuple(sorted(job.adapters))


@dataclass
class _Run:
    """One job's state inside a batched loop. Its UNet rows are contiguous in the batch:
    [negatives (n)..., positives (n)...] when guided (diffusers' order), else [positives (n)...]."""

    index: int  # position in the list given to `denoise`: what the callbacks report
    prepared: PreparedJob
    latents: torch.Tensor
    mask: ProgressiveMask | None
    embeds: torch.Tensor  # encoder_hidden_states rows
    added: dict[str, torch.Tensor] | None  # SDXL added_cond_kwargs rows
    step_kwargs: dict[str, Any]
    position: int = 0  # UNet calls done
    # Identity merge: the rows (embeds, added) that replace the text-only ones when `position`
    # reaches merge_position; None when the run never switches (no merge, or merged throughout).
    merged: tuple[torch.Tensor, dict[str, torch.Tensor] | None] | None = None
    merge_position: int | None = None

    def switch_to_merged(self) -> bool:
        """On the merge step, the merged rows replace the text-only ones; True when they did."""
        if self.merged is None or self.position != self.merge_position:
            return False
        self.embeds, self.added = self.merged
        self.merged = None
        return True

    @property
    def job(self) -> DenoiseJob:
        return self.prepared.job

    @property
    def total(self) -> int:
        return len(self.prepared.timesteps)

    @property
    def done(self) -> bool:
        return self.position >= self.total

    @property
    def timestep(self) -> torch.Tensor:
        return self.prepared.timesteps[self.position]


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


class UNetDenoiser:
    """One loaded UNet and its scheduler config; `denoise` is safe to call from several threads
    (every job has its own scheduler; the UNet is used read-only under inference_mode, and its
    adapter state changes only through adapter_switch, when no other set is inside the UNet)."""

    def __init__(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype,
                 batching: BatchPolicy = BatchPolicy(), on_call: OnCall | None = None) -> None:
        self.entry = entry
        self.device = device
        self.dtype = dtype
        self.unet = UNet2DConditionModel.from_pretrained(
            entry.component_dir("unet"), local_files_only=True, torch_dtype=dtype).to(device).eval()
        scheduler_dir = entry.component_dir("scheduler")
        self.scheduler_config: dict[str, Any] = json.loads((scheduler_dir / "scheduler_config.json").read_text())
        self.vae_scale_factor = read_vae_scale_factor(entry)
        self.is_sdxl = entry.family == ModelFamily.SDXL
        config = self.unet.config
        self.latent_channels = int(config.in_channels)
        self.cross_attention_dim = int(config.cross_attention_dim)
        self.pooled_dim = (int(config.projection_class_embeddings_input_dim)
                           - 6 * int(config.addition_time_embed_dim)) if self.is_sdxl else None
        self._adapters: list[str] = []
        self.adapter_switch = AdapterSwitch(self.unet)
        self.batcher = StepBatcher(self._call_unet, batching, on_call)

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters attached to this UNet (registry ids), sorted."""
        return sorted(self._adapters)

    def attach_adapter(self, name: str, load: Callable[[UNet2DConditionModel], Any]) -> None:
        """Loads an adapter into the UNet with `load(unet)` (adapters.attach_identity_adapter),
        then leaves every adapter disabled, so that jobs naming none run the plain UNet. Start-up
        only: not while jobs run."""
        if name in self._adapters:
            raise ValueError(f"{self.entry.id} already has an adapter named {name!r}")
        # PEFT freezes the base weights (requires_grad False). torch's matmul chooses whether to
        # fold a [B, L, C] input by the weight's requires_grad, which changes the float rounding
        # (3e-14 in float64 on tiny-sdxl, measured): the flags are restored, so the plain UNet
        # computes bit for bit what it computed before the adapter.
        requires_grad = {id(param): param.requires_grad for param in self.unet.parameters()}
        with self.adapter_switch.using(()):  # no job runs the UNet while it changes
            load(self.unet)
            for param in self.unet.parameters():
                if id(param) in requires_grad:
                    param.requires_grad_(requires_grad[id(param)])
            self.unet.disable_adapters()
        self._adapters.append(name)

    # --- validation, against this model and the serving limits: once per job ----------------
    def check_job(self, job: DenoiseJob, limits: JobLimits = JobLimits()) -> PreparedJob:
        """InvalidArgument naming the field and value for anything this model cannot run; else
        the job prepared to run (its scheduler built: the only build for this job)."""
        if limits.max_batch is not None and not 1 <= job.count <= limits.max_batch:
            raise InvalidArgument("seeds", job.count, f"need 1 to {limits.max_batch} images (one seed each)")
        if job.count < 1:
            raise InvalidArgument("seeds", job.count, "need at least one image (one seed each)")
        if not math.isfinite(job.guidance_scale) or job.guidance_scale < 0:
            raise InvalidArgument("guidance_scale", job.guidance_scale, "must be finite and >= 0")
        self._check_conditioning(job, limits)
        for name, size in (("width", job.width), ("height", job.height)):
            if size <= 0 or size % self.vae_scale_factor or (limits.max_size is not None and size > limits.max_size):
                bound = f" up to {limits.max_size}" if limits.max_size is not None else ""
                raise InvalidArgument(name, size, f"must be a positive multiple of {self.vae_scale_factor}{bound}")
        self._check_steps(job, limits)
        if job.init_latents is not None:
            expected = (job.count, self.latent_channels, job.height // self.vae_scale_factor,
                        job.width // self.vae_scale_factor)
            if tuple(job.init_latents.shape) != expected:
                raise InvalidArgument("init_latents.shape", list(job.init_latents.shape),
                                      f"expected {list(expected)}")
            if not 0.0 < job.strength <= 1.0 or job.run_steps < 1:
                raise InvalidArgument("strength", job.strength,
                                      "must be in (0, 1] and leave at least one step of the schedule")
        if not math.isfinite(job.guidance_rescale) or not 0.0 <= job.guidance_rescale <= 1.0:
            raise InvalidArgument("guidance_rescale", job.guidance_rescale, "must be in [0, 1]")
        if job.preview_every < 0:
            raise InvalidArgument("preview_every", job.preview_every, "must be >= 0 (0: no previews)")
        if job.conditioning.merges and job.start_merge_step < -1:
            raise InvalidArgument("start_merge_step", job.start_merge_step,
                                  "must be >= -1 (-1: merged conditioning from the first step)")
        adapter_set(job.adapters, self._adapters, self.entry.id)
        if job.change_map is not None:
            if job.init_latents is None:
                raise InvalidArgument("change_map", list(job.change_map.shape), "needs init_latents (img2img)")
            check_change_map(job.change_map, job.count, job.height, job.width)
        # Scheduler options and the schedule itself are checked by building it: rejected here,
        # before any work, and kept for the run.
        scheduler, timesteps = self._schedule(job)
        return PreparedJob(job, scheduler, timesteps, owner=self)

    def _check_conditioning(self, job: DenoiseJob, limits: JobLimits = JobLimits()) -> None:
        cond, n, dim = job.conditioning, job.count, self.cross_attention_dim
        prompt = cond.prompt_embeds
        if prompt.ndim != 3 or prompt.shape[0] not in (1, n) or prompt.shape[1] < 1 or prompt.shape[2] != dim:
            raise InvalidArgument("prompt_embeds.shape", list(prompt.shape),
                                  f"expected [1 or {n}, seq, {dim}] for {self.entry.id} (n: one row per image)")
        if limits.max_sequence is not None and prompt.shape[1] > limits.max_sequence:
            raise InvalidArgument("prompt_embeds.shape", list(prompt.shape),
                                  f"sequence longer than {limits.max_sequence} tokens (max_prompt_windows)")
        if job.guided:
            neg = cond.negative_prompt_embeds
            if neg is None:
                raise InvalidArgument("negative_prompt_embeds", None, "required when guidance_scale > 1")
            if neg.ndim != 3 or neg.shape[0] not in (1, n) or neg.shape[1] != prompt.shape[1] or neg.shape[2] != dim:
                raise InvalidArgument("negative_prompt_embeds.shape", list(neg.shape),
                                      f"expected [1 or {n}, {prompt.shape[1]}, {dim}] "
                                      f"(the seq length of prompt_embeds {list(prompt.shape)})")
        merged = cond.merged_prompt_embeds
        if merged is not None and (merged.ndim != 3 or merged.shape[0] not in (1, n)
                                   or tuple(merged.shape[1:]) != tuple(prompt.shape[1:])):
            raise InvalidArgument("merged_prompt_embeds.shape", list(merged.shape),
                                  f"expected [1 or {n}, {prompt.shape[1]}, {dim}] "
                                  f"(the seq length of prompt_embeds {list(prompt.shape)})")
        if merged is None and cond.merged_pooled_prompt_embeds is not None:
            raise InvalidArgument("merged_pooled_prompt_embeds", list(cond.merged_pooled_prompt_embeds.shape),
                                  "given without merged_prompt_embeds")
        if self.is_sdxl:
            pooled_fields = [("pooled_prompt_embeds", cond.pooled_prompt_embeds)]
            if job.guided:
                pooled_fields.append(("negative_pooled_prompt_embeds", cond.negative_pooled_prompt_embeds))
            if cond.merges:
                pooled_fields.append(("merged_pooled_prompt_embeds", cond.merged_pooled_prompt_embeds))
            for name, pooled in pooled_fields:
                if pooled is None or pooled.ndim != 2 or pooled.shape[0] not in (1, n) \
                        or pooled.shape[1] != self.pooled_dim:
                    raise InvalidArgument(f"{name}.shape", None if pooled is None else list(pooled.shape),
                                          f"SDXL needs [1 or {n}, {self.pooled_dim}]")

    def _check_steps(self, job: DenoiseJob, limits: JobLimits) -> None:
        max_steps = limits.max_steps
        if job.timesteps is None:
            if job.steps < 1 or (max_steps is not None and job.steps > max_steps):
                bound = f"in [1, {max_steps}]" if max_steps is not None else ">= 1"
                raise InvalidArgument("steps", job.steps, f"must be {bound}")
            return
        # The count first: a huge list is rejected before each entry is looked at.
        if max_steps is not None and len(job.timesteps) > max_steps:
            raise InvalidArgument("timesteps", f"{len(job.timesteps)} timesteps", f"at most {max_steps}")
        validate_timesteps(job.timesteps, int(self.scheduler_config.get("num_train_timesteps", 1000)))
        if job.steps not in (0, len(job.timesteps)):
            raise InvalidArgument("steps", job.steps, f"must be 0 or len(timesteps) = {len(job.timesteps)}")

    # --- the loop ---------------------------------------------------------------------------
    @torch.inference_mode()
    def denoise(self, jobs: Sequence[DenoiseJob | PreparedJob], on_step: ProgressFn | None = None,
                cancel: threading.Event | None = None, on_preview: PreviewFn | None = None,
                priority: str = "interactive", stats: SharedCalls | None = None) -> list[torch.Tensor]:
        """Runs every job to the end; returns each job's latents [n, C, h, w] in the order given.

        A DenoiseJob is validated here; a PreparedJob (from check_job) runs as it is. Every job
        is checked before any runs. Jobs that can share UNet calls (share_key) run as one batch;
        the others as further batches, one after another. Each batch's UNet calls go through the
        model's StepBatcher with `priority` ("interactive" or "batch"), shared with concurrent
        calls; what they cost is added to `stats`. `cancel` stops the whole call at the next UNet
        call (Cancelled)."""
        prepared = [self._prepared(item) for item in jobs]
        if len({id(item) for item in prepared}) != len(prepared):
            raise ValueError("the same PreparedJob twice in one call: each job has one scheduler")
        for item in prepared:
            item.used = True
        results: list[torch.Tensor | None] = [None] * len(prepared)
        keys = [share_key(item.job, self.vae_scale_factor) for item in prepared]
        for group in group_indices(keys):
            runs = [self._start(index, prepared[index]) for index in group]
            bucket = batch_key(prepared[group[0]].job, self.vae_scale_factor)
            with self.batcher.join(bucket, priority, stats) as member:
                self._run_batch(runs, member, on_step, cancel, on_preview)
            for run in runs:
                results[run.index] = run.latents
        return results  # type: ignore[return-value]  # every index belongs to one group

    def _prepared(self, item: DenoiseJob | PreparedJob) -> PreparedJob:
        if isinstance(item, DenoiseJob):
            return self.check_job(item)
        if item.owner is not self:
            raise ValueError("a PreparedJob runs on the UNetDenoiser whose check_job prepared it")
        if item.used:
            raise ValueError("a PreparedJob runs once: its scheduler has already stepped")
        return item

    def _start(self, index: int, prepared: PreparedJob) -> _Run:
        """A job's initial latents, progressive mask, conditioning rows and step arguments."""
        job, scheduler = prepared.job, prepared.scheduler
        latents, noise = self._initial_latents(job, scheduler, prepared.timesteps)
        mask = None
        if job.change_map is not None:
            latent_map = latent_change_map(job.change_map, latents.shape[-2], latents.shape[-1])
            original = job.init_latents.to(device=self.device, dtype=self.dtype)
            mask = ProgressiveMask(latent_map.to(self.device), original, noise, job.run_steps)
        cond = job.conditioning
        embeds, added = self._conditioning(job, cond.prompt_embeds, cond.pooled_prompt_embeds)
        run = _Run(index, prepared, latents, mask, embeds, added, self._step_kwargs(scheduler, job.generators))
        if cond.merges:
            # The first call past start_merge_step, as a position in the calls this job runs.
            offset = len(scheduler.timesteps) - len(prepared.timesteps)
            merge_position = max(job.start_merge_step + 1 - offset, 0)
            if merge_position < run.total:
                merged = self._conditioning(job, cond.merged_prompt_embeds, cond.merged_pooled_prompt_embeds)
                run.merged, run.merge_position = merged, merge_position
                run.switch_to_merged()  # merged from the first call: no switch inside the loop
        return run

    def _run_batch(self, runs: list[_Run], member: Member, on_step: ProgressFn | None,
                   cancel: threading.Event | None, on_preview: PreviewFn | None) -> None:
        """One model evaluation per step for all runs still going (shared with other requests by
        the StepBatcher); a run leaves when its schedule ends."""
        active = [run for run in runs if not run.done]
        embeds, added = self._stack_conditioning(active)
        while active:
            if cancel is not None and cancel.is_set():
                raise Cancelled(_cancel_message(active))
            # Every run switches to the merged rows (identity) on its own step: restack only then.
            switched = [run.switch_to_merged() for run in active]  # every run: no short cut
            if any(switched):
                embeds, added = self._stack_conditioning(active)
            inputs = [self._model_input(run) for run in active]
            rows = [x.shape[0] for x in inputs]
            # Per-row timesteps: each job is at its own point of its own schedule. float32 holds
            # every integer timestep exactly, and the UNet's sinusoidal embedding is float32 anyway.
            timesteps = torch.cat([run.timestep.reshape(1).to(device=self.device, dtype=torch.float32).expand(count)
                                   for run, count in zip(active, rows)])
            evaluation = UNetInputs(_cat(inputs), timesteps, embeds, added)
            try:
                noise_pred = member.evaluate(evaluation, evaluation.rows, cancel,
                                             lambda: Cancelled(_cancel_message(active)))
            except Cancelled:  # also from inside a call that waited for its adapter set
                raise Cancelled(_cancel_message(active)) from None
            if not bool(torch.isfinite(noise_pred).all()):
                raise NonFiniteOutput(f"the UNet's prediction went non-finite at step {active[0].position + 1} "
                                      f"of {active[0].total} (inputs out of the model's range?)")
            for run, model_input, prediction in zip(active, inputs, noise_pred.split(rows)):
                self._advance(run, model_input, prediction, on_step, on_preview)
            still = [run for run in active if not run.done]
            if len(still) != len(active):
                active = still
                embeds, added = self._stack_conditioning(active)

    @torch.inference_mode()
    def _call_unet(self, key: tuple, items: list[UNetInputs], cancel: threading.Event | None) -> list[torch.Tensor]:
        """One UNet call over the evaluations of one bucket (the StepBatcher's RunCall): rows
        stacked in order, the prediction split back per evaluation."""
        adapters: AdapterSet = key[-1]
        added = None
        if items[0].added is not None:
            added = {name: _cat([item.added[name] for item in items]) for name in items[0].added}
        # Held per call, not per loop: with batching off, a concurrent loop with another adapter
        # set takes turns step by step instead of waiting for this whole loop.
        with self.adapter_switch.using(adapters, cancel, lambda: Cancelled("cancelled by the caller")):
            prediction = self.unet(_cat([item.sample for item in items]), _cat([item.timesteps for item in items]),
                                   encoder_hidden_states=_cat([item.embeds for item in items]),
                                   added_cond_kwargs=added, return_dict=False)[0]
        return list(prediction.split([item.rows for item in items])) if len(items) > 1 else [prediction]

    def _model_input(self, run: _Run) -> torch.Tensor:
        model_input = torch.cat([run.latents] * 2) if run.job.guided else run.latents
        return run.prepared.scheduler.scale_model_input(model_input, run.timestep)

    def _advance(self, run: _Run, model_input: torch.Tensor, prediction: torch.Tensor,
                 on_step: ProgressFn | None, on_preview: PreviewFn | None) -> None:
        """Guidance, the scheduler step, the progressive mask and the callbacks for one job."""
        job, scheduler, t = run.job, run.prepared.scheduler, run.timestep
        noise_pred = self._guide(job, prediction)
        output = scheduler.step(noise_pred, t, run.latents, **run.step_kwargs, return_dict=False)
        run.latents = output[0]
        run.position += 1
        step, total = run.position, run.total
        if run.mask is not None:
            following = run.prepared.timesteps[step] if step < total else None
            run.latents = run.mask.apply(scheduler, run.latents, following)
        if on_step is not None:
            on_step(run.index, step, total, float(t))
        if on_preview is not None and job.preview_every > 0 and step % job.preview_every == 0:
            x0 = predicted_x0(scheduler, output, model_input[-job.count:], noise_pred, t)
            if run.mask is not None:
                x0 = run.mask.composite(x0)
            on_preview(run.index, step, total, latents_to_rgb(x0, self.entry.family))
        if run.done and run.mask is not None and run.mask.completed != run.mask.steps:
            raise RuntimeError(f"progressive mask ran {run.mask.completed} of {run.mask.steps} steps")

    def _schedule(self, job: DenoiseJob) -> tuple[Any, torch.Tensor]:
        """A fresh scheduler with its timesteps set (custom ones as retrieve_timesteps passes them),
        and the timesteps this job runs (img2img: the tail that strength leaves, as get_timesteps)."""
        custom = job.timesteps is not None
        scheduler = build_scheduler(job.scheduler, self.scheduler_config, job.timestep_spacing,
                                    job.sigma_schedule, custom_timesteps=custom)
        try:
            if custom:
                scheduler.set_timesteps(timesteps=list(job.timesteps), device=self.device)
            else:
                scheduler.set_timesteps(job.steps, device=self.device)
        except ValueError as exc:  # the scheduler's own limits (LCM: at most 50 steps, ...)
            field_name, value = ("timesteps", job.timesteps) if custom else ("steps", job.steps)
            raise InvalidArgument(field_name, value,
                                  f"not accepted by scheduler {job.scheduler.name}: {exc}") from None
        timesteps = scheduler.timesteps
        begin = 0
        if job.init_latents is not None:
            begin = max(job.schedule_steps - job.run_steps, 0) * scheduler.order
            timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        return scheduler, timesteps

    def _initial_latents(self, job: DenoiseJob, scheduler: Any,
                         timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """txt2img: seeded noise scaled to the first sigma. img2img: init latents noised to the
        first timestep; that noise is returned too (progressive masks re-noise with it)."""
        n, generators = job.count, job.generators
        if job.init_latents is None:
            shape = (n, self.latent_channels, job.height // self.vae_scale_factor,
                     job.width // self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
            return latents * scheduler.init_noise_sigma, None
        init = job.init_latents.to(device=self.device, dtype=self.dtype)
        noise = randn_tensor(tuple(init.shape), generator=generators, device=self.device, dtype=self.dtype)
        return scheduler.add_noise(init, noise, timesteps[:1].repeat(n)), noise

    @staticmethod
    def _guide(job: DenoiseJob, noise_pred: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over one job's [negatives..., positives...] rows (only when
        guidance_scale > 1: otherwise the UNet ran on the positives alone), then guidance_rescale."""
        if not job.guided:
            return noise_pred
        uncond, text = noise_pred.chunk(2)
        guided = uncond + job.guidance_scale * (text - uncond)
        if job.guidance_rescale > 0.0:
            guided = rescale_guidance(guided, text, job.guidance_rescale)
        return guided

    def _conditioning(self, job: DenoiseJob, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor | None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """One job's conditioning rows in its UNet row order ([negatives, positives] when guided)
        with these positive rows (the text-only or the merged ones), a [1, ...] tensor repeated
        for every image as diffusers' num_images_per_prompt does."""
        cond, n = job.conditioning, job.count

        def per_image(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device=self.device, dtype=self.dtype)
            # repeat, not expand: the same contiguous rows diffusers gives the UNet.
            return x.repeat(n, *([1] * (x.ndim - 1))) if x.shape[0] == 1 else x

        embeds = per_image(prompt_embeds)
        if job.guided:
            embeds = torch.cat([per_image(cond.negative_prompt_embeds), embeds])
        if not self.is_sdxl:
            return embeds, None
        # SDXL micro-conditioning: original size, crop top-left, target size (diffusers' defaults).
        time_ids = torch.tensor([[job.height, job.width, 0, 0, job.height, job.width]], dtype=self.dtype)
        text_embeds = per_image(pooled_prompt_embeds)
        if job.guided:
            text_embeds = torch.cat([per_image(cond.negative_pooled_prompt_embeds), text_embeds])
        time_ids = time_ids.to(self.device).repeat(text_embeds.shape[0], 1)
        return embeds, {"text_embeds": text_embeds, "time_ids": time_ids}

    @staticmethod
    def _stack_conditioning(runs: Sequence[_Run]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """The batch's conditioning: each run's rows in run order (rebuilt only when a run leaves
        or switches to its merged rows)."""
        if not runs:
            return None, None
        embeds = _cat([run.embeds for run in runs])
        if runs[0].added is None:
            return embeds, None
        return embeds, {name: _cat([run.added[name] for run in runs]) for name in runs[0].added}

    @staticmethod
    def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
        # As diffusers' prepare_extra_step_kwargs: eta (0) and the generators, where step takes them.
        params = inspect.signature(scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = 0.0
        if "generator" in params:
            kwargs["generator"] = generators
        return kwargs


def _cancel_message(active: Sequence[_Run]) -> str:
    if len(active) == 1:
        return f"cancelled by the caller after {active[0].position} of {active[0].total} steps"
    done = ", ".join(f"job {run.index}: {run.position} of {run.total} steps" for run in active)
    return f"cancelled by the caller ({done})"
