"""Every flow the orchestrator runs, and which one a request gets.

The one-pass flows are steps.FLOWS. A request with face work (reference faces or detail_faces)
runs its one-pass flow up to the decoded base images (or starts from the caller's photo), then
stage 2 (face_steps), then the files:

    txt2img+faces:  (analyze_references | encode_prompt) -> denoise -> decode -> find_faces -> encode_files
    img2img+faces:  (analyze_references | encode_prompt | encode_init_image) -> denoise -> decode -> ...
    inpaint+faces:  as img2img+faces, denoising with progressive masks
    photo+faces:    analyze_references -> use_base_image -> find_faces -> encode_files

find_faces plans the rest of stage 2 from what it found.
"""
from __future__ import annotations

from services.orchestrator.face_steps import AnalyzeReferences, FindFaces, UseBaseImage
from services.orchestrator.plan import GenerationPlan
from services.orchestrator.steps import FLOWS as ONE_PASS_FLOWS
from services.orchestrator.steps import EncodeFiles, Flow, Together, choose_base_flow

FACE_SUFFIX = "+faces"


def _with_faces(base: Flow) -> Flow:
    first, *middle = base.steps[:-1]  # without encode_files
    parts = first.steps if isinstance(first, Together) else (first,)
    return Flow(base.name + FACE_SUFFIX, (Together(AnalyzeReferences(), *parts), *middle, FindFaces(), EncodeFiles()))


FLOWS: dict[str, Flow] = {
    **ONE_PASS_FLOWS,
    **{name + FACE_SUFFIX: _with_faces(flow) for name, flow in ONE_PASS_FLOWS.items()},
    "photo" + FACE_SUFFIX: Flow("photo" + FACE_SUFFIX, (AnalyzeReferences(), UseBaseImage(), FindFaces(), EncodeFiles())),
}
for _flow in FLOWS.values():
    _flow.check()


def choose_flow(plan: GenerationPlan) -> Flow:
    base = choose_base_flow(plan)
    if plan.faces is None:
        return base
    if plan.faces.base_pixels is not None:
        return FLOWS["photo" + FACE_SUFFIX]
    return FLOWS[base.name + FACE_SUFFIX]
