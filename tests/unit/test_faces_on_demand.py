"""Faces only when they can matter: a policy whose only use of faces is the minor rule (ages)
checks images without faces first, and the face stage analyses only the images where an age could
change the decision (a sexual label at its review threshold). A gallery policy still analyses every
image, with embeddings.

Two layers: the safety engine (real ImagePolicy rules and a real SQLite review store, a detector
double) and the orchestrator's CheckImages step (stand-in stage clients that record their calls).
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from diffmesh.proto.v1 import face_pb2, safety_pb2
from services.orchestrator.clients import CallContext, Deadline
from services.orchestrator.safety_steps import ALLOW, BLOCK, REVIEW, CheckImages, SafetyState
from services.orchestrator.steps import FlowRun, RequestState
from services.safety.decisions import GalleryPolicy, ImageLabelRule, Outcome, Policy, Source, Thresholds
from services.safety.engine import SafetyEngine
from services.safety.image_policy import FaceInfo, ImagePolicy
from services.safety.nsfw import NUDENET_LABELS, Detection
from services.safety.review_store import open_review_store, Status

POLICY = Policy(version="test-9", prompt_categories=(),
                image_labels=(ImageLabelRule("FEMALE_BREAST_EXPOSED", "nudity", Thresholds(0.45, 0.70), sexual=True),
                              ImageLabelRule("FEMALE_GENITALIA_COVERED", "suggestive", Thresholds(0.60, 0.90))),
                gallery=GalleryPolicy(path="", models={"arcface-512": Thresholds(0.5, 0.65)}), minor_age=18)
HASH = "ab" * 32


class ScoreByBrightness:
    """Detector double: an image's first pixel says what it 'contains' (0: nothing, 1: a sexual
    label in the review band, 2: a non-sexual label in its review band)."""

    labels = NUDENET_LABELS

    def detect(self, image: np.ndarray) -> list[Detection]:
        kind = int(image[0, 0, 0])
        if kind == 1:
            return [Detection("FEMALE_BREAST_EXPOSED", 0.5, (0, 0, 4, 4))]
        if kind == 2:
            return [Detection("FEMALE_GENITALIA_COVERED", 0.65, (0, 0, 4, 4))]
        return []


def image(kind: int) -> np.ndarray:
    pixels = np.full((32, 32, 3), 90, np.uint8)
    pixels[0, 0, 0] = kind
    return pixels


@pytest.fixture
def engine(tmp_path):
    store = open_review_store(f"sqlite:///{tmp_path / 'review.db'}")
    yield SafetyEngine(policy=POLICY, prompts=None, images=ImagePolicy(POLICY, ScoreByBrightness(), None),
                       watermarker=None, signer=None, store=store)
    store.close()


def test_only_an_image_an_age_could_change_is_left_undecided_and_no_case_is_opened(engine):
    images = [image(0), image(1), image(2)]
    checks = engine.check_images(images, [[], [], []], None, "r1", "tiny", HASH, faces_pending=[True] * 3)
    assert [check.needs_faces for check in checks] == [False, True, False]
    assert checks[0].decision.outcome is Outcome.ALLOW
    # The undecided image is not queued for review: it may be a minor's, which is never queued.
    assert checks[1].decision.outcome is Outcome.REVIEW and checks[1].case_id == ""
    # A non-sexual review label does not involve the minor rule: decided and queued now.
    assert checks[2].decision.outcome is Outcome.REVIEW and checks[2].case_id
    assert engine.store.counts()[Status.PENDING] == 1


def test_sent_again_with_faces_the_image_is_decided(engine):
    minor = [FaceInfo(age=12.0)]
    [blocked] = engine.check_images([image(1)], [minor], None, "r1", "tiny", HASH, faces_pending=[False])
    assert not blocked.needs_faces and blocked.decision.outcome is Outcome.BLOCK
    assert blocked.decision.source is Source.MINOR and blocked.case_id == ""
    [adult] = engine.check_images([image(1)], [[FaceInfo(age=35.0)]], None, "r1", "tiny", HASH)
    assert adult.decision.outcome is Outcome.REVIEW and adult.case_id
    # Without on-demand faces nothing is left undecided (the rule uses the faces it was sent).
    [plain] = engine.check_images([image(1)], [[]], None, "r1", "tiny", HASH)
    assert not plain.needs_faces and plain.case_id


def test_with_the_minor_rule_off_nothing_waits_for_faces(engine):
    off = Policy(**{**POLICY.__dict__, "minor_age": 0})
    engine.images = ImagePolicy(off, ScoreByBrightness(), None)
    [check] = engine.check_images([image(1)], [[]], None, "r1", "tiny", HASH, faces_pending=[True])
    assert not check.needs_faces and check.case_id


# --- the orchestrator's step --------------------------------------------------------------------
def verdict(outcome: int, needs_faces: bool = False, position: int = 0) -> safety_pb2.ImageSafetyVerdict:
    decision = safety_pb2.SafetyDecision(outcome=outcome, category="nudity" if outcome else "",
                                         policy_version="test-9", field=f"images[{position}]")
    return safety_pb2.ImageSafetyVerdict(decision=decision, decisions=[decision], needs_faces=needs_faces)


class RecordingSafety:
    """Answers like the stage: on demand, images whose first pixel is 1 need faces; with faces, an
    image with a face under 18 is BLOCK."""

    def __init__(self, needs_faces: bool = False, uses_ages: bool = True) -> None:
        self.policy = safety_pb2.DescribePolicyResponse(policy_version="test-9", needs_faces=needs_faces,
                                                        uses_ages=uses_ages)
        self.requests: list[safety_pb2.CheckImagesRequest] = []

    async def describe_policy(self, ctx):
        return self.policy

    async def check_images(self, ctx, request, phase):
        self.requests.append(request)
        verdicts = []
        for position, item in enumerate(request.images):  # fields name positions in this call
            flagged = item.image.data[0] == 1
            if flagged and request.faces_on_demand and not item.faces_analyzed:
                verdicts.append(verdict(REVIEW, needs_faces=True, position=position))
            elif flagged and any(face.HasField("age") and face.age < 18 for face in item.faces):
                verdicts.append(verdict(BLOCK, position=position))
            else:
                verdicts.append(verdict(REVIEW if flagged else ALLOW, position=position))
        return safety_pb2.CheckImagesResponse(images=verdicts, policy_version="test-9")


class RecordingFace:
    def __init__(self) -> None:
        self.requests: list[face_pb2.AnalyzeRequest] = []

    async def analyze(self, ctx, request, phase):
        self.requests.append(request)
        return face_pb2.AnalyzeResponse(images=[face_pb2.ImageFaces(faces=[face_pb2.DetectedFace(age=9.0)])
                                                for _ in request.images])


class Clients:
    def __init__(self, safety, face) -> None:
        self.safety, self.face = safety, face

    def configured(self, stage: str) -> bool:
        return stage != "face" or self.face is not None


def run_check(safety: RecordingSafety, face: RecordingFace | None, kinds: list[int]) -> RequestState:
    plan = SimpleNamespace(request_id="r1", model=SimpleNamespace(entry=SimpleNamespace(id="tiny")))
    state = RequestState(plan)
    state.pixels = np.stack([image(kind) for kind in kinds])
    state.safety = SafetyState(safety_pb2.CheckPromptResponse(
        decision=safety_pb2.SafetyDecision(outcome=ALLOW, policy_version="test-9"), prompt_hash=HASH))
    run = FlowRun(Clients(safety, face), CallContext("r1", "k", Deadline(30)), progress=False)
    asyncio.run(CheckImages().run(state, run))
    return state


def test_clean_images_cost_no_face_analysis():
    safety, face = RecordingSafety(), RecordingFace()
    state = run_check(safety, face, [0, 0, 0])
    assert face.requests == []
    assert len(safety.requests) == 1 and safety.requests[0].faces_on_demand
    assert [v.decision.outcome for v in state.safety.verdicts] == [ALLOW] * 3


def test_only_the_flagged_image_is_analysed_and_checked_again():
    safety, face = RecordingSafety(), RecordingFace()
    state = run_check(safety, face, [0, 1, 0])
    [analyzed] = face.requests
    assert len(analyzed.images) == 1 and analyzed.skip_embeddings
    first, second = safety.requests
    assert len(first.images) == 3 and not any(item.faces_analyzed for item in first.images)
    assert len(second.images) == 1 and second.images[0].faces_analyzed and not second.faces_on_demand
    assert second.images[0].image.data[0] == 1
    assert [v.decision.outcome for v in state.safety.verdicts] == [ALLOW, BLOCK, ALLOW]
    assert not any(v.needs_faces for v in state.safety.verdicts)
    # The re-check saw the image as images[0]; the reply names it by its index in the request.
    blocked = state.safety.verdicts[1]
    assert blocked.decision.field == "images[1]" and [d.field for d in blocked.decisions] == ["images[1]"]
    assert [v.decision.field for v in state.safety.verdicts] == ["images[0]", "images[1]", "images[2]"]


def test_a_gallery_policy_analyses_every_image_with_embeddings_up_front():
    safety, face = RecordingSafety(needs_faces=True), RecordingFace()
    run_check(safety, face, [0, 1])
    [analyzed] = face.requests
    assert len(analyzed.images) == 2 and not analyzed.skip_embeddings
    [request] = safety.requests
    assert not request.faces_on_demand and all(item.faces_analyzed for item in request.images)


def test_without_a_face_stage_or_the_minor_rule_images_are_decided_in_one_call():
    for safety, face in ((RecordingSafety(), None), (RecordingSafety(uses_ages=False), RecordingFace())):
        state = run_check(safety, face, [1])
        assert len(safety.requests) == 1 and not safety.requests[0].faces_on_demand
        assert face is None or face.requests == []
        assert state.safety.verdicts[0].decision.outcome == REVIEW


def test_an_image_left_undecided_after_its_faces_fails_the_request():
    class Stubborn(RecordingSafety):
        async def check_images(self, ctx, request, phase):
            self.requests.append(request)
            return safety_pb2.CheckImagesResponse(images=[verdict(REVIEW, needs_faces=True) for _ in request.images])

    with pytest.raises(RuntimeError, match="undecided"):
        run_check(Stubborn(), RecordingFace(), [1])
