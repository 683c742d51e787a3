"""Every flow the orchestrator serves, and which one a request gets.

Every flow is its stage 1 (steps.BASE_FLOWS: up to the decoded pixels) with the safety steps
around it: the prompt gate before any GPU work, the image check and marking at the end
(safety_steps). A request with face work (reference faces or detail_faces) runs stage 2
(face_steps) between its pixels and the image check:

    txt2img:        check_prompt -> encode_prompt -> denoise -> decode -> check_images -> mark_files
    img2img:        check_prompt -> (encode_prompt | encode_init_image) -> denoise -> decode -> ...
    inpaint:        as img2img, denoising with progressive masks
    txt2img+faces:  check_prompt -> (analyze_references | encode_prompt) -> denoise -> decode
                    -> find_faces -> check_images -> mark_files
    img2img+faces, inpaint+faces: likewise
    photo+faces:    check_prompt -> analyze_references -> use_base_image -> find_faces -> ...

find_faces plans the rest of stage 2 from what it found.
"""
from __future__ import annotations

from services.orchestrator.face_steps import AnalyzeReferences, FindFaces, UseBaseImage
from services.orchestrator.plan import GenerationPlan
from services.orchestrator.safety_steps import CheckImages, CheckPrompt, MarkFiles
from services.orchestrator.steps import BASE_FLOWS, Flow, Step, Together, choose_base_flow

FACE_SUFFIX = "+faces"


def _with_faces(base: Flow) -> tuple[Step, ...]:
    first, *rest = base.steps
    parts = first.steps if isinstance(first, Together) else (first,)
    return (Together(AnalyzeReferences(), *parts), *rest, FindFaces())


def _served(name: str, work: tuple[Step, ...]) -> Flow:
    return Flow(name, (CheckPrompt(), *work, CheckImages(), MarkFiles()))


FLOWS: dict[str, Flow] = {
    **{name: _served(name, flow.steps) for name, flow in BASE_FLOWS.items()},
    **{name + FACE_SUFFIX: _served(name + FACE_SUFFIX, _with_faces(flow)) for name, flow in BASE_FLOWS.items()},
    "photo" + FACE_SUFFIX: _served("photo" + FACE_SUFFIX, (AnalyzeReferences(), UseBaseImage(), FindFaces())),
}
for _flow in FLOWS.values():
    _flow.check()


def choose_flow(plan: GenerationPlan) -> Flow:
    base = choose_base_flow(plan)
    if plan.faces is None:
        return FLOWS[base.name]
    if plan.faces.base_pixels is not None:
        return FLOWS["photo" + FACE_SUFFIX]
    return FLOWS[base.name + FACE_SUFFIX]
