"""FaceService gRPC servicer: Analyze (images -> faces) and EncodeIdentity (references + prompt
embeddings -> identity-fused prompt embeddings). Validation and the wire format live here; the
compute is services.face.analysis (face packs) and diffmesh.models.photomaker (the identity
encoder), plain numpy / onnxruntime / torch.

Faces are personal data: no image, crop, embedding or landmark goes into a log line, a span
attribute or a metric; spans carry counts, sizes and model ids only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np
import torch

from diffmesh.errors import InvalidArgument
from diffmesh.proto.v1 import face_pb2, face_pb2_grpc
from diffmesh.runtime import codec, metrics
from diffmesh.runtime.server import Admission
from diffmesh.runtime.telemetry import annotate, traced
from services.face.analysis import DetectedFace, FaceAnalyzer

if TYPE_CHECKING:
    from diffmesh.models.photomaker import IdentityEncoder

_GENDER = {"female": face_pb2.GENDER_FEMALE, "male": face_pb2.GENDER_MALE, None: face_pb2.GENDER_UNSPECIFIED}


@dataclass(frozen=True)
class FaceModels:
    """What the face stage loaded: its face packs and identity encoders, by registry id."""

    packs: dict[str, FaceAnalyzer]
    encoders: dict[str, "IdentityEncoder"]
    default_pack: str

    def pack(self, model_id: str, field: str = "model_id") -> FaceAnalyzer:
        model_id = model_id or self.default_pack
        pack = self.packs.get(model_id)
        if pack is None:
            raise InvalidArgument(field, model_id, f"unknown face_analysis pack; loaded: {', '.join(sorted(self.packs))}")
        return pack

    def encoder(self, model_id: str, field: str = "model_id") -> "IdentityEncoder":
        encoder = self.encoders.get(model_id)
        if encoder is None:
            known = ", ".join(sorted(self.encoders)) or "(none)"
            raise InvalidArgument(field, model_id, f"unknown identity_encoder; loaded: {known}")
        return encoder


def detected_face_message(face: DetectedFace, with_embedding: bool = True) -> face_pb2.DetectedFace:
    x1, y1, x2, y2 = (float(v) for v in face.box)
    message = face_pb2.DetectedFace(
        box=face_pb2.FaceBox(x1=x1, y1=y1, x2=x2, y2=y2),
        landmarks=[face_pb2.Point(x=float(x), y=float(y)) for x, y in np.asarray(face.landmarks)],
        score=float(face.score), gender=_GENDER.get(face.gender, face_pb2.GENDER_UNSPECIFIED),
        embedding_model=face.embedding_model)
    if face.age is not None:
        message.age = float(face.age)
    if with_embedding and face.embedding is not None:
        message.embedding.CopyFrom(codec.from_numpy(np.asarray(face.embedding, dtype=np.float32)))
        message.normed_embedding.CopyFrom(codec.from_numpy(np.asarray(face.normed_embedding, dtype=np.float32)))
    return message


class FaceServicer(face_pb2_grpc.FaceServiceServicer):
    """Every request is checked against the stage's limits before it waits for a compute slot:
    images per call, the memory each image takes, faces per image, references per identity."""

    def __init__(self, models: FaceModels, admission: Admission, max_batch: int, max_image_bytes: int,
                 max_detected_faces: int, max_reference_faces: int) -> None:
        self._models = models
        self._admission = admission
        self._max_batch = max_batch
        self._max_image_bytes = max_image_bytes
        self._max_faces = max_detected_faces
        self._max_references = max_reference_faces

    def _images(self, tensors, field: str) -> list[np.ndarray]:
        return codec.rgb_images(tensors, field, self._max_batch, self._max_image_bytes)

    async def Analyze(self, request: face_pb2.AnalyzeRequest,
                      context: grpc.aio.ServicerContext) -> face_pb2.AnalyzeResponse:
        pack = self._models.pack(request.model_id)
        images = self._images(request.images, "images")
        if not 0.0 <= request.min_score <= 1.0:
            raise InvalidArgument("min_score", request.min_score, "must be in [0, 1]")
        if not 0 <= request.max_faces <= self._max_faces:
            raise InvalidArgument("max_faces", request.max_faces, f"must be in [0, {self._max_faces}] (0: up to "
                                                                   f"{self._max_faces})")
        max_faces = request.max_faces or self._max_faces
        embeddings = not request.skip_embeddings
        annotate(**{"diffmesh.model": pack.model_id, "diffmesh.batch_size": len(images)})
        metrics.BATCH_SIZE.labels("face").observe(len(images))

        def run() -> list[list[DetectedFace]]:
            return [pack.analyze(image, min_score=request.min_score, max_faces=max_faces, embeddings=embeddings)
                    for image in images]

        async with self._admission.slot() as usage:
            found = await self._admission.submit(usage, traced("face.analyze", run))
        annotate(**{"diffmesh.faces": sum(len(faces) for faces in found)})
        return face_pb2.AnalyzeResponse(
            images=[face_pb2.ImageFaces(faces=[detected_face_message(f, embeddings) for f in faces]) for faces in found],
            model_id=pack.model_id, embedding_dim=pack.embedding_dim, usage=self._admission.report(usage))

    async def EncodeIdentity(self, request: face_pb2.EncodeIdentityRequest,
                             context: grpc.aio.ServicerContext) -> face_pb2.EncodeIdentityResponse:
        encoder = self._models.encoder(request.model_id)
        references = self._images(request.reference_images, "reference_images")
        if len(references) > self._max_references:
            raise InvalidArgument("reference_images", len(references), f"at most {self._max_references} references")
        given = None
        if request.HasField("id_embeddings"):
            given = codec.to_torch(request.id_embeddings, "id_embeddings", dtypes=codec.FLOAT_DTYPES, rank=2,
                                   finite=True, nonempty=True)
            if given.shape[0] != len(references):
                raise InvalidArgument("id_embeddings.shape", list(given.shape),
                                      f"expected one row per reference image ({len(references)})")
            pack = None
        else:
            pack = self._models.pack(request.face_model_id, "face_model_id")
        if given is not None and given.shape[1] != encoder.id_embeddings_dim:
            raise InvalidArgument("id_embeddings.shape", list(given.shape),
                                  f"{request.model_id} takes {encoder.id_embeddings_dim}-d identity embeddings")
        if pack is not None and pack.embedding_dim != encoder.id_embeddings_dim:
            raise InvalidArgument("face_model_id", pack.model_id,
                                  f"makes {pack.embedding_dim}-d embeddings ({pack.embedding_model}); "
                                  f"{request.model_id} takes {encoder.id_embeddings_dim}-d")
        prompt = codec.to_torch(request.prompt_embeds, "prompt_embeds", dtypes=codec.FLOAT_DTYPES, rank=3,
                                finite=True, nonempty=True)
        positions = list(request.class_token_positions)
        annotate(**{"diffmesh.model": request.model_id, "diffmesh.references": len(references)})

        def run() -> torch.Tensor:
            embeddings = given
            if embeddings is None:
                rows = []
                for i, image in enumerate(references):
                    faces = pack.analyze(image, max_faces=1)
                    if not faces:
                        raise InvalidArgument(f"reference_images[{i}]", f"{image.shape[1]}x{image.shape[0]}",
                                              "no face found in this reference photo")
                    rows.append(torch.from_numpy(np.asarray(faces[0].embedding, dtype=np.float32)))
                embeddings = torch.stack(rows)
            return encoder.encode(references, embeddings, prompt, positions)

        async with self._admission.slot() as usage:
            fused = await self._admission.submit(usage, traced("face.encode_identity", run))
        return face_pb2.EncodeIdentityResponse(prompt_embeds=codec.from_torch(fused), references_used=len(references),
                                               usage=self._admission.report(usage))
