"""Scheduler names the mesh accepts, each mapped to a diffusers scheduler class plus the config
overrides that turn the model's own scheduler config into the named sampler, and the per-request
options (timestep spacing, sigma schedule, custom timesteps) each one supports.

Kept free of diffusers imports so the orchestrator can validate names and options without loading
models; the denoiser resolves the class with `build_scheduler`. A test checks the capability flags
below against the diffusers classes' own signatures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from diffmesh.errors import InvalidArgument

# `timestep_spacing` values (diffusers' names, Table 2 of arXiv:2305.08891).
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# Sigma schedules offered as options. diffusers' "beta" sigmas need scipy, which the mesh does not
# ship, so they are not offered.
SIGMA_SCHEDULES = ("karras", "exponential")
_SIGMA_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    # What the diffusers class honours (checked against its signatures by the unit tests):
    spacing: bool = False  # set_timesteps follows config.timestep_spacing
    sigma_schedules: tuple[str, ...] = ()  # sigma schedules the class can switch to
    custom_timesteps: bool = False  # set_timesteps(timesteps=[...])
    stochastic: bool = False  # step() draws noise (from the per-image generators: seeded)

    @property
    def accepts_timesteps(self) -> bool:
        """Custom timesteps work: the class takes them and no sigma schedule is fixed by the name."""
        return self.custom_timesteps and self.fixed_sigma_schedule is None

    @property
    def fixed_sigma_schedule(self) -> str | None:
        """The sigma schedule the name itself implies (dpmpp_2m_karras: karras), if any."""
        for schedule, flag in _SIGMA_FLAGS.items():
            if self.overrides.get(flag):
                return schedule
        return None

    def summary(self) -> str:
        """One line for listings: description, then the options it takes."""
        options = []
        if self.spacing:
            options.append("spacing " + "/".join(TIMESTEP_SPACINGS))
        if self.sigma_schedules:
            options.append("sigmas " + "/".join(self.sigma_schedules))
        if self.accepts_timesteps:
            options.append("custom timesteps")
        if self.stochastic:
            options.append("stochastic (seeded)")
        return f"{self.description} [{'; '.join(options) or 'no options'}]"


_SPACED = dict(spacing=True)
_SIGMAS = dict(sigma_schedules=SIGMA_SCHEDULES)

# Names follow the samplers users know from AUTOMATIC1111 / ComfyUI; diffusers class names are
# accepted as aliases (they use the class with the model's config unchanged).
SCHEDULERS: dict[str, SchedulerSpec] = {
    spec.name: spec
    for spec in [
        SchedulerSpec("ddim", "DDIMScheduler", {}, "DDIM (eta 0), deterministic", **_SPACED),
        SchedulerSpec("euler", "EulerDiscreteScheduler", {}, "Euler", **_SPACED, **_SIGMAS, custom_timesteps=True),
        SchedulerSpec("euler_a", "EulerAncestralDiscreteScheduler", {}, "Euler ancestral", **_SPACED,
                      stochastic=True),
        SchedulerSpec("heun", "HeunDiscreteScheduler", {}, "Heun (2 UNet evaluations per step)", **_SPACED,
                      **_SIGMAS, custom_timesteps=True),
        SchedulerSpec("dpmpp_2m", "DPMSolverMultistepScheduler",
                      {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
                      "DPM++ 2M", **_SPACED, **_SIGMAS, custom_timesteps=True),
        SchedulerSpec("dpmpp_2m_karras", "DPMSolverMultistepScheduler",
                      {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                      "DPM++ 2M Karras", **_SPACED, **_SIGMAS, custom_timesteps=True),
        # diffusers' DPMSolverSDEScheduler (A1111's "DPM++ SDE Karras") needs torchsde, which the
        # mesh does not ship; this is DPM++ 2M SDE Karras, whose step noise comes from the
        # per-image generators (seeded, device-independent).
        SchedulerSpec("dpmpp_sde_karras", "DPMSolverMultistepScheduler",
                      {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                      "DPM++ 2M SDE Karras (sde-dpmsolver++)", **_SPACED, **_SIGMAS, custom_timesteps=True,
                      stochastic=True),
        SchedulerSpec("unipc", "UniPCMultistepScheduler", {}, "UniPC", **_SPACED, **_SIGMAS),
        SchedulerSpec("lcm", "LCMScheduler", {}, "LCM (for LCM-distilled weights; at most 50 steps)",
                      custom_timesteps=True, stochastic=True),
        SchedulerSpec("pndm", "PNDMScheduler", {"skip_prk_steps": True}, "PNDM (PLMS)", **_SPACED),
    ]
}


def _alias(spec: SchedulerSpec) -> SchedulerSpec:
    return SchedulerSpec(spec.class_name, spec.class_name, {},
                         f"diffusers {spec.class_name} with the model's scheduler config unchanged",
                         spacing=spec.spacing, sigma_schedules=spec.sigma_schedules,
                         custom_timesteps=spec.custom_timesteps, stochastic=spec.stochastic)


_ALIASES: dict[str, SchedulerSpec] = {}
for _spec in SCHEDULERS.values():
    _ALIASES.setdefault(_spec.class_name, _alias(_spec))


def scheduler_names() -> list[str]:
    return sorted(SCHEDULERS) + sorted(_ALIASES)


def list_schedulers(aliases: bool = False) -> list[SchedulerSpec]:
    """The schedulers in table order (for `diffmesh schedulers`); `summary()` gives one line each."""
    return list(SCHEDULERS.values()) + (list(_ALIASES.values()) if aliases else [])


def lookup_scheduler(name: str) -> SchedulerSpec | None:
    return SCHEDULERS.get(name) or _ALIASES.get(name)


def require_scheduler(name: str, field_name: str = "scheduler") -> SchedulerSpec:
    """The spec for `name`, or InvalidArgument naming the field and listing the known names."""
    spec = lookup_scheduler(name)
    if spec is None:
        raise InvalidArgument(field_name, name, f"unknown scheduler; known: {', '.join(scheduler_names())}")
    return spec


def scheduler_overrides(spec: SchedulerSpec, timestep_spacing: str | None = None,
                        sigma_schedule: str | None = None, custom_timesteps: bool = False) -> dict[str, Any]:
    """The config overrides for `spec` plus the request's options; InvalidArgument (naming
    `timestep_spacing`, `sigma_schedule` or `timesteps`) where the scheduler does not support one.
    Empty strings mean "not set" (proto3 defaults)."""
    overrides = dict(spec.overrides)
    if timestep_spacing:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise InvalidArgument("timestep_spacing", timestep_spacing, f"must be one of {', '.join(TIMESTEP_SPACINGS)}")
        if not spec.spacing:
            raise InvalidArgument("timestep_spacing", timestep_spacing,
                                  f"scheduler {spec.name} has a fixed timestep schedule")
        if custom_timesteps:
            raise InvalidArgument("timestep_spacing", timestep_spacing, "has no effect with custom timesteps")
        overrides["timestep_spacing"] = timestep_spacing
    if sigma_schedule:
        if sigma_schedule not in SIGMA_SCHEDULES:
            raise InvalidArgument("sigma_schedule", sigma_schedule, f"must be one of {', '.join(SIGMA_SCHEDULES)}")
        if sigma_schedule not in spec.sigma_schedules:
            supported = [s.name for s in SCHEDULERS.values() if sigma_schedule in s.sigma_schedules]
            raise InvalidArgument("sigma_schedule", sigma_schedule,
                                  f"scheduler {spec.name} has no sigma schedule option; use one of {', '.join(supported)}")
        fixed = spec.fixed_sigma_schedule
        if fixed is not None and fixed != sigma_schedule:
            raise InvalidArgument("sigma_schedule", sigma_schedule,
                                  f"scheduler {spec.name} always uses {fixed} sigmas")
        overrides.update({flag: schedule == sigma_schedule for schedule, flag in _SIGMA_FLAGS.items()})
    if custom_timesteps:
        if not spec.custom_timesteps:
            supported = [s.name for s in SCHEDULERS.values() if s.accepts_timesteps]
            raise InvalidArgument("timesteps", "[...]", f"scheduler {spec.name} cannot take custom timesteps; "
                                  f"use one of {', '.join(supported)}")
        schedule = sigma_schedule or spec.fixed_sigma_schedule
        if schedule:
            raise InvalidArgument("timesteps", "[...]",
                                  f"custom timesteps cannot be combined with {schedule} sigmas ({spec.name})")
    return overrides


def build_scheduler(spec: SchedulerSpec, base_config: Mapping[str, Any], timestep_spacing: str | None = None,
                    sigma_schedule: str | None = None, custom_timesteps: bool = False) -> Any:
    """A fresh scheduler (they are stateful: one per request) from the model's scheduler config."""
    import diffusers

    overrides = scheduler_overrides(spec, timestep_spacing, sigma_schedule, custom_timesteps)
    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(dict(base_config), **overrides)
