"""Stage 2's steps with a stand-in face stage (no process): what they make of the face stage's
replies. References: the best face's raw embedding, repeated face_weight times, and the class
word from their gender; the identity similarity of each re-rendered face; identity prompts."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from diffmesh.errors import InvalidArgument
from diffmesh.proto.v1 import face_pb2, orchestrator_pb2
from diffmesh.runtime import codec
from services.orchestrator.face_steps import (AnalyzeReferences, MeasureIdentity, ReferenceIdentity, face_prompt)


def face(embedding, gender=face_pb2.GENDER_UNSPECIFIED, score=0.9):
    vector = np.asarray(embedding, np.float32)
    return face_pb2.DetectedFace(score=score, gender=gender, embedding=codec.from_numpy(vector),
                                 normed_embedding=codec.from_numpy(vector / np.linalg.norm(vector)),
                                 embedding_model="test-3")


class FakeFace:
    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []

    async def analyze(self, ctx, request, phase):
        self.requests.append(request)
        return self.replies.pop(0)


def run_with(face_client):
    return SimpleNamespace(clients=SimpleNamespace(face=face_client), call=None)


def plan(references, weight=1):
    options = SimpleNamespace(face_model="")
    return SimpleNamespace(faces=SimpleNamespace(with_identity=bool(references), options=options,
                                                 references=references, face_weight=weight))


def test_references_give_raw_embeddings_repeated_by_weight_and_the_majority_class_word():
    images = [np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 3), np.uint8)]
    reply = face_pb2.AnalyzeResponse(images=[
        face_pb2.ImageFaces(faces=[face([3, 0, 4], face_pb2.GENDER_FEMALE)]),
        face_pb2.ImageFaces(faces=[face([0, 2, 0], face_pb2.GENDER_FEMALE)])])
    fake = FakeFace([reply])
    state = SimpleNamespace(plan=plan(images, weight=2), references=None)
    asyncio.run(AnalyzeReferences().run(state, run_with(fake)))
    identity = state.references
    assert fake.requests[0].max_faces == 1 and len(fake.requests[0].images) == 2
    assert identity.embeddings.tolist() == [[3, 0, 4], [3, 0, 4], [0, 2, 0], [0, 2, 0]]  # raw, not normalised
    assert identity.class_word == "woman" and len(identity.images) == 4
    assert np.linalg.norm(identity.mean_direction) == pytest.approx(1.0)


def test_unknown_gender_gives_a_neutral_class_word_and_a_faceless_reference_is_named():
    reply = face_pb2.AnalyzeResponse(images=[face_pb2.ImageFaces(faces=[face([1, 0, 0])])])
    state = SimpleNamespace(plan=plan([np.zeros((8, 8, 3), np.uint8)]), references=None)
    asyncio.run(AnalyzeReferences().run(state, run_with(FakeFace([reply]))))
    assert state.references.class_word == "person"
    empty = face_pb2.AnalyzeResponse(images=[face_pb2.ImageFaces(faces=[face([1, 0, 0])]), face_pb2.ImageFaces()])
    state = SimpleNamespace(plan=plan([np.zeros((8, 8, 3), np.uint8)] * 2), references=None)
    with pytest.raises(InvalidArgument) as err:
        asyncio.run(AnalyzeReferences().run(state, run_with(FakeFace([empty]))))
    assert err.value.violations[0].field == "reference_faces[1]"


def test_identity_similarity_is_the_cosine_to_the_references_mean_direction():
    identity = ReferenceIdentity(embeddings=np.array([[1, 0, 0]], np.float32),
                                 mean_direction=np.array([1, 0, 0], np.float32), class_word="man",
                                 embedding_model="test-3", images=[])
    report = orchestrator_pb2.FaceDetailingReport(detailed=True, faces=[
        orchestrator_pb2.DetailedFace(index=0), orchestrator_pb2.DetailedFace(index=1, skipped=True),
        orchestrator_pb2.DetailedFace(index=2), orchestrator_pb2.DetailedFace(index=3)])
    work = SimpleNamespace(reports=[report], crops=np.zeros((3, 8, 8, 3), np.uint8))
    reply = face_pb2.AnalyzeResponse(images=[face_pb2.ImageFaces(faces=[face([1, 1, 0])]),
                                             face_pb2.ImageFaces(faces=[face([0, 0, 5])]),
                                             face_pb2.ImageFaces()])  # the third crop shows no face
    state = SimpleNamespace(plan=plan([np.zeros((8, 8, 3), np.uint8)]), face_work=work, references=identity)
    asyncio.run(MeasureIdentity().run(state, run_with(FakeFace([reply]))))
    faces = report.faces
    assert faces[0].identity_similarity == pytest.approx(2 ** -0.5)
    assert not faces[1].HasField("identity_similarity")  # [SKIP]
    assert faces[2].identity_similarity == pytest.approx(0.0)
    assert not faces[3].HasField("identity_similarity")  # nothing found to measure


def test_identity_prompts_lead_with_the_class_word_and_trigger_unless_placed():
    identity = SimpleNamespace(class_word="woman")
    assert face_prompt("smiling, freckles", identity, "img") == "woman img, smiling, freckles"
    assert face_prompt("a photo of a man img smiling", identity, "img") == "a photo of a man img smiling"
    assert face_prompt("smiling", None, "img") == "smiling"
