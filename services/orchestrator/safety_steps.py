"""The safety steps every flow runs: the prompt gate first, the image check after the last
pixel work, and marking (watermark, encode, sign) as the files the caller gets.

    check_prompt -> ... the flow's GPU steps ... -> check_images -> mark_files

Fail closed: each step's stage call either answers or fails the request (UNAVAILABLE when the
safety stage cannot be reached, its error otherwise); no path returns an image the safety stage
did not check and mark. A blocked prompt halts the flow before any GPU stage is called and the
reply carries the decision and no images. Images decided BLOCK or REVIEW are withheld (REVIEW:
the safety stage queued them, and the reply names the case).

Only categories and outcomes go into spans and metrics; the prompt text goes to the safety stage
and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffmesh.errors import FailedPrecondition
from diffmesh.proto.v1 import face_pb2, orchestrator_pb2, safety_pb2
from diffmesh.runtime import codec, metrics, telemetry
from services.orchestrator.face_detailing import PROMPT, SEP, SKIP
from services.orchestrator.plan import GenerationPlan
from services.orchestrator.steps import FlowRun, RequestState, Step

SAFETY = "safety"  # the stage, and the phase its calls report in timings
ALLOW, REVIEW, BLOCK = safety_pb2.SAFETY_OUTCOME_ALLOW, safety_pb2.SAFETY_OUTCOME_REVIEW, safety_pb2.SAFETY_OUTCOME_BLOCK


def outcome_name(outcome: int) -> str:
    return safety_pb2.SafetyOutcome.Name(outcome).removeprefix("SAFETY_OUTCOME_")


@dataclass
class SafetyState:
    """What the safety steps learned about one request."""

    prompt: safety_pb2.CheckPromptResponse
    verdicts: list[safety_pb2.ImageSafetyVerdict] = field(default_factory=list)
    markings: dict[int, safety_pb2.Marking] = field(default_factory=dict)  # by image index

    @property
    def returned(self) -> list[int]:
        """Indices of the images the caller gets: those decided ALLOW."""
        return [i for i, verdict in enumerate(self.verdicts) if verdict.decision.outcome == ALLOW]

    def report(self) -> orchestrator_pb2.SafetyReport:
        report = orchestrator_pb2.SafetyReport(policy_version=self.prompt.decision.policy_version,
                                               prompt=self.prompt.decision)
        returned = set(self.returned)
        for index, verdict in enumerate(self.verdicts):
            report.images.add(index=index, decision=verdict.decision, decisions=verdict.decisions,
                              returned=index in returned, case_id=verdict.case_id)
        return report

    def trailer(self) -> str:
        """The most severe decision, for the `diffmesh-safety` trailing metadata."""
        worst = max([self.prompt.decision, *(v.decision for v in self.verdicts)], key=lambda d: d.outcome)
        return f"{outcome_name(worst.outcome)} {worst.category or '-'} {worst.policy_version}"


def asked_texts(plan: GenerationPlan) -> list[safety_pb2.PromptText]:
    """What the request asks for: the prompt, prompt_2 and each distinct per-face prompt
    segment; never the negative prompts."""
    texts = [safety_pb2.PromptText(field="prompt", text=plan.prompt)]
    if plan.prompt_2:
        texts.append(safety_pb2.PromptText(field="prompt_2", text=plan.prompt_2))
    if plan.faces is not None and plan.faces.options.prompt:
        for i, segment in enumerate(plan.faces.options.prompt.split(SEP)):
            segment = segment.strip()
            if segment and segment != SKIP:
                texts.append(safety_pb2.PromptText(field=f"face_detailing.prompt[{i}]",
                                                   text=segment.replace(PROMPT, plan.prompt)))
    return texts


def _record(check: str, decisions: list[safety_pb2.SafetyDecision]) -> None:
    for decision in decisions:
        metrics.SAFETY_DECISIONS.labels("orchestrator", check, decision.category or "none",
                                        outcome_name(decision.outcome)).inc()


class CheckPrompt(Step):
    """The gate before any GPU work. BLOCK halts the flow: the reply has the decision, no images."""

    name, reads, writes, stages, phase = "check_prompt", ("plan",), ("safety",), (SAFETY,), SAFETY

    async def run(self, state: RequestState, run: FlowRun) -> None:
        request = safety_pb2.CheckPromptRequest(texts=asked_texts(state.plan), request_id=state.plan.request_id)
        reply = await run.clients.safety.check_prompt(run.call, request, self.phase)
        state.safety = SafetyState(reply)
        decision = reply.decision
        _record("prompt", [decision])
        telemetry.annotate(**{"diffmesh.safety.prompt.outcome": outcome_name(decision.outcome),
                              "diffmesh.safety.prompt.category": decision.category or "none",
                              "diffmesh.safety.policy_version": decision.policy_version})
        if decision.outcome == BLOCK:
            state.halted = True


def _face_signals(image: face_pb2.ImageFaces) -> list[safety_pb2.FaceSignal]:
    signals = []
    for face in image.faces:
        signal = safety_pb2.FaceSignal(embedding_model=face.embedding_model, box=face.box)
        if face.HasField("normed_embedding"):
            signal.normed_embedding.CopyFrom(face.normed_embedding)
        if face.HasField("age"):
            signal.age = face.age
        signals.append(signal)
    return signals


class CheckImages(Step):
    """The image policy over the final pixels, with the faces the face stage finds on them.

    - A policy with a gallery needs every image's face embeddings: the face stage is required
      and analyses every image first.
    - A policy whose only use of faces is the minor rule (ages) asks for them on demand: the
      first check goes without faces, and only images where an age could change the decision (a
      sexual label at its review threshold) are analysed and checked again. Clean images, nearly
      all of them, cost no face analysis. Without a face stage there is nothing to ask, and the
      rule has no ages to use (as with packs that estimate none, like the dlib default).
    """

    name, reads, writes, stages, phase = "check_images", ("plan", "pixels", "safety"), ("safety",), (SAFETY,), SAFETY

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan, pixels, safety = state.plan, state.require("pixels"), state.require("safety")
        policy = await run.clients.safety.describe_policy(run.call)
        if policy.needs_faces and not run.clients.configured("face"):
            raise FailedPrecondition("the safety policy compares faces with a protected-identity gallery, which "
                                     "needs the face stage: set face_address on the orchestrator")
        on_demand = not policy.needs_faces and policy.uses_ages and run.clients.configured("face")
        indices = list(range(len(pixels)))
        faces = await self._faces(run, pixels, indices, embeddings=True) if policy.needs_faces else None
        verdicts = await self._check(run, state, indices, faces, on_demand)
        again = [i for i in indices if verdicts[i].needs_faces]
        if again:
            faces = await self._faces(run, pixels, again, embeddings=False)
            for position, (index, verdict) in enumerate(zip(again, await self._check(run, state, again, faces, False))):
                verdicts[index] = _renumbered(verdict, position, index)
        if any(verdict.needs_faces for verdict in verdicts):
            raise RuntimeError("safety left an image undecided after its faces were sent")
        safety.verdicts = verdicts
        _record("image", [verdict.decision for verdict in verdicts])
        withheld = [verdict.decision.outcome for verdict in verdicts if verdict.decision.outcome != ALLOW]
        for outcome in withheld:
            metrics.IMAGES_WITHHELD.labels(outcome_name(outcome)).inc()
        worst = max(verdicts, key=lambda verdict: verdict.decision.outcome).decision
        telemetry.annotate(**{"diffmesh.safety.image.outcome": outcome_name(worst.outcome),
                              "diffmesh.safety.image.category": worst.category or "none",
                              "diffmesh.safety.images_withheld": len(withheld),
                              "diffmesh.safety.faces_analyzed": len(pixels) if policy.needs_faces else len(again)})

    async def _faces(self, run: FlowRun, pixels: list, indices: list[int],
                     embeddings: bool) -> dict[int, list[safety_pb2.FaceSignal]]:
        analyzed = await run.clients.face.analyze(
            run.call, face_pb2.AnalyzeRequest(images=[codec.from_numpy(np.ascontiguousarray(pixels[i]))
                                                      for i in indices],
                                              skip_embeddings=not embeddings), self.phase)
        if len(analyzed.images) != len(indices):
            raise RuntimeError(f"face returned {len(analyzed.images)} results for {len(indices)} images")
        return {index: _face_signals(image) for index, image in zip(indices, analyzed.images)}

    async def _check(self, run: FlowRun, state: RequestState, indices: list[int],
                     faces: dict[int, list[safety_pb2.FaceSignal]] | None,
                     on_demand: bool) -> list[safety_pb2.ImageSafetyVerdict]:
        plan, pixels, safety = state.plan, state.require("pixels"), state.require("safety")
        request = safety_pb2.CheckImagesRequest(request_id=plan.request_id, model_id=plan.model.entry.id,
                                                prompt_hash=safety.prompt.prompt_hash,
                                                prompt_decision=safety.prompt.decision, faces_on_demand=on_demand)
        for index in indices:
            item = request.images.add(image=codec.from_numpy(np.ascontiguousarray(pixels[index])))
            if faces is not None:
                item.faces.extend(faces[index])
                item.faces_analyzed = True
        reply = await run.clients.safety.check_images(run.call, request, self.phase)
        if len(reply.images) != len(indices):
            raise RuntimeError(f"safety returned {len(reply.images)} verdicts for {len(indices)} images")
        return list(reply.images)


def _renumbered(verdict: safety_pb2.ImageSafetyVerdict, position: int,
                index: int) -> safety_pb2.ImageSafetyVerdict:
    """A re-check sends a subset of the images: its decisions name images by their position in
    that call; the caller knows them by their index in the request."""
    sent, meant = f"images[{position}]", f"images[{index}]"
    for decision in (verdict.decision, *verdict.decisions):
        if decision.field == sent:
            decision.field = meant
    return verdict


class MarkFiles(Step):
    """The flow's last step: the allowed images watermarked, encoded and signed by the safety
    stage; withheld ones get no file."""

    name, reads, writes, stages, phase = "mark_files", ("plan", "pixels", "safety"), ("files",), (SAFETY,), SAFETY

    async def run(self, state: RequestState, run: FlowRun) -> None:
        plan, pixels, safety = state.plan, state.require("pixels"), state.require("safety")
        returned = safety.returned
        files: list = [None] * len(pixels)
        if returned:
            request = safety_pb2.MarkImagesRequest(
                images=[codec.from_numpy(np.ascontiguousarray(pixels[i])) for i in returned],
                format=plan.output_format, quality=plan.quality, request_id=plan.request_id,
                model_id=plan.model.entry.id, watermark_key=run.call.request_key)
            reply = await run.clients.safety.mark_images(run.call, request, self.phase)
            if len(reply.images) != len(returned):
                raise RuntimeError(f"safety marked {len(reply.images)} of {len(returned)} images")
            for index, marked in zip(returned, reply.images):
                files[index] = marked.image
                safety.markings[index] = marked.marking
        state.files = files
