"""The orchestrator's safety steps over stand-in stage clients (no processes): the prompt gate
halts the flow before any GPU step, REVIEW and BLOCK images are withheld, a failing safety stage
fails the request (fail closed), only asked-for texts are checked, and the reply reports it all."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from diffmesh.errors import FailedPrecondition, Unavailable
from diffmesh.proto.v1 import common_pb2, safety_pb2
from services.orchestrator.clients import CallContext, Deadline
from services.orchestrator.flows import FLOWS
from services.orchestrator.safety_steps import ALLOW, BLOCK, REVIEW, asked_texts
from services.orchestrator.steps import FlowRun, RequestState, Step, execute, generated_images, response


def decision(outcome: int, category: str = "", field: str = "prompt") -> safety_pb2.SafetyDecision:
    return safety_pb2.SafetyDecision(outcome=outcome, category=category, score=0.9 if outcome != ALLOW else 0.1,
                                     threshold=0.5, policy_version="test-1", field=field)


class FakeSafety:
    def __init__(self, prompt=ALLOW, images=(ALLOW,), fail: Exception | None = None, needs_faces=False):
        self.prompt, self.images, self.fail, self.needs_faces = prompt, list(images), fail, needs_faces
        self.calls: list[str] = []
        self.texts: list[str] = []
        self.marked = 0

    async def check_prompt(self, ctx, request, phase):
        self.calls.append("check_prompt")
        self.texts = [(t.field, t.text) for t in request.texts]
        return safety_pb2.CheckPromptResponse(decision=decision(self.prompt, "hate" if self.prompt else ""),
                                              prompt_hash="ab" * 32)

    async def describe_policy(self, ctx):
        return safety_pb2.DescribePolicyResponse(policy_version="test-1", needs_faces=self.needs_faces)

    async def check_images(self, ctx, request, phase):
        self.calls.append("check_images")
        if self.fail is not None:
            raise self.fail
        verdicts = []
        for outcome in self.images:
            verdicts.append(safety_pb2.ImageSafetyVerdict(
                decision=decision(outcome, "sexual_explicit" if outcome != ALLOW else "", "images[0]"),
                case_id="case-1" if outcome == REVIEW else ""))
        return safety_pb2.CheckImagesResponse(images=verdicts, policy_version="test-1")

    async def mark_images(self, ctx, request, phase):
        self.calls.append("mark_images")
        self.marked = len(request.images)
        return safety_pb2.MarkImagesResponse(images=[
            safety_pb2.MarkedImage(image=common_pb2.EncodedImage(data=b"signed", mime_type="image/png"),
                                   marking=safety_pb2.Marking(watermarked=True, manifest=True))
            for _ in request.images])


class FakeClients:
    def __init__(self, safety: FakeSafety, face: bool = False):
        self.safety = safety
        self._face = face

    def configured(self, stage: str) -> bool:
        return stage != "face" or self._face


class GpuWork(Step):
    """Stands for every stage-1 step: records that it ran and writes the pixels."""

    name, reads, writes, stages = "gpu_work", ("plan",), ("pixels",), ("denoiser",)

    def __init__(self, log: list[str], count: int) -> None:
        self.log, self.count = log, count

    async def run(self, state, run):
        self.log.append("denoiser")
        state.pixels = np.zeros((self.count, 8, 8, 3), np.uint8)


def plan(count: int = 1, **fields):
    base = dict(request_id="r1", model=SimpleNamespace(entry=SimpleNamespace(id="tiny")), scheduler="euler",
                steps=2, guidance_scale=1.0, strength=0.0, width=8, height=8, seeds=list(range(7, 7 + count)),
                prompt="a cat", prompt_2=None, faces=None, output_format=common_pb2.PNG, quality=0)
    return SimpleNamespace(**{**base, **fields})


def run_guarded(safety: FakeSafety, count: int = 1):
    """txt2img's guarded steps with stage 1 replaced by GpuWork."""
    flow = FLOWS["txt2img"]
    gpu_log: list[str] = []
    steps = [flow.steps[0], GpuWork(gpu_log, count), *flow.steps[-2:]]
    state = RequestState(plan(count))
    run = FlowRun(FakeClients(safety), CallContext("r1", "k", Deadline(30)), progress=False)
    asyncio.run(execute(steps, state, run))
    return state, run, gpu_log


def test_a_blocked_prompt_halts_before_any_gpu_step_and_the_reply_says_why():
    safety = FakeSafety(prompt=BLOCK)
    state, run, gpu_log = run_guarded(safety)
    assert gpu_log == [] and safety.calls == ["check_prompt"]
    reply = response(state, run)
    assert list(reply.images) == []
    assert reply.info.safety.prompt.outcome == BLOCK and reply.info.safety.prompt.category == "hate"
    assert reply.info.safety.policy_version == "test-1"
    assert state.safety.trailer() == "BLOCK hate test-1"


def test_review_and_block_images_are_withheld_and_only_allowed_ones_are_marked():
    safety = FakeSafety(images=(ALLOW, REVIEW, BLOCK))
    state, run, gpu_log = run_guarded(safety, count=3)
    assert gpu_log == ["denoiser"] and safety.marked == 1
    images = generated_images(state)
    assert [image.index for image in images] == [0] and images[0].image.data == b"signed"
    assert images[0].marking.watermarked and images[0].marking.manifest
    report = response(state, run).info.safety
    assert [(i.index, i.returned, i.case_id) for i in report.images] == [(0, True, ""), (1, False, "case-1"),
                                                                         (2, False, "")]
    assert [i.decision.outcome for i in report.images] == [ALLOW, REVIEW, BLOCK]


def test_nothing_is_marked_when_every_image_is_withheld():
    safety = FakeSafety(images=(REVIEW,))
    state, _, _ = run_guarded(safety)
    assert "mark_images" not in safety.calls and generated_images(state) == []


def test_a_failing_image_check_fails_the_request_and_returns_nothing():
    safety = FakeSafety(fail=Unavailable("safety: none of its replicas is reachable"))
    with pytest.raises(Unavailable):
        run_guarded(safety)
    assert "mark_images" not in safety.calls


def test_a_gallery_policy_without_a_face_stage_is_a_precondition_failure():
    with pytest.raises(FailedPrecondition, match="face stage"):
        run_guarded(FakeSafety(needs_faces=True))


def test_only_what_is_asked_for_is_checked_never_the_negative_prompts():
    faces = SimpleNamespace(options=SimpleNamespace(prompt="a smiling face [SEP] [SKIP] [SEP] [PROMPT], older"))
    texts = asked_texts(plan(prompt="a cat", prompt_2="a dog", negative_prompt="gore", faces=faces))
    assert [(t.field, t.text) for t in texts] == [
        ("prompt", "a cat"), ("prompt_2", "a dog"), ("face_detailing.prompt[0]", "a smiling face"),
        ("face_detailing.prompt[2]", "a cat, older")]
