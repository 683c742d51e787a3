"""Scheduler names the mesh accepts, each mapped to a diffusers scheduler class plus the config
overrides that turn the model's own scheduler config into the named sampler.

Kept free of diffusers imports so the orchestrator can validate names without loading models; the
denoiser resolves the class with `build_scheduler`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


# Names follow the samplers users know from AUTOMATIC1111 / ComfyUI; diffusers class names are
# accepted as aliases (they use the class with the model's config unchanged).
SCHEDULERS: dict[str, SchedulerSpec] = {
    spec.name: spec
    for spec in [
        SchedulerSpec("ddim", "DDIMScheduler", {}, "DDIM (eta 0)"),
        SchedulerSpec("euler", "EulerDiscreteScheduler", {}, "Euler"),
        SchedulerSpec("euler_a", "EulerAncestralDiscreteScheduler", {}, "Euler ancestral"),
        SchedulerSpec("heun", "HeunDiscreteScheduler", {}, "Heun"),
        SchedulerSpec("dpmpp_2m", "DPMSolverMultistepScheduler",
                      {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
                      "DPM++ 2M"),
        SchedulerSpec("dpmpp_2m_karras", "DPMSolverMultistepScheduler",
                      {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                      "DPM++ 2M Karras"),
        SchedulerSpec("unipc", "UniPCMultistepScheduler", {}, "UniPC"),
        SchedulerSpec("pndm", "PNDMScheduler", {"skip_prk_steps": True}, "PNDM (PLMS)"),
    ]
}
_ALIASES = {spec.class_name: SchedulerSpec(spec.class_name, spec.class_name) for spec in SCHEDULERS.values()}


def scheduler_names() -> list[str]:
    return sorted(SCHEDULERS) + sorted(_ALIASES)


def lookup_scheduler(name: str) -> SchedulerSpec | None:
    return SCHEDULERS.get(name) or _ALIASES.get(name)


def build_scheduler(spec: SchedulerSpec, base_config: Mapping[str, Any]) -> Any:
    """A fresh scheduler (they are stateful: one per request) from the model's scheduler config."""
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(dict(base_config), **dict(spec.overrides))
