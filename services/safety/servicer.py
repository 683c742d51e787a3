"""SafetyService gRPC servicer: messages <-> the engine (services.safety.engine). Nothing more.

Prompt text, images and face embeddings are used for the call only: spans and metrics get
outcomes, categories, counts and the policy version; no log line names a prompt.
"""
from __future__ import annotations

import asyncio
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable, Iterator, Sequence, TypeVar

import grpc
import numpy as np

from diffmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from diffmesh.proto.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from diffmesh.runtime import codec, metrics
from diffmesh.runtime.server import Admission
from diffmesh.runtime.telemetry import annotate, traced
from services.safety.decisions import Decision, Outcome, Source
from services.safety.engine import ImageCheck, MarkedFile, NotReleasable, SafetyEngine
from services.safety.image_policy import FaceInfo
from services.safety.review_store import CaseNotFound, CaseStateError, ReviewCase, Status

T = TypeVar("T")

_OUTCOME = {Outcome.ALLOW: safety_pb2.SAFETY_OUTCOME_ALLOW, Outcome.REVIEW: safety_pb2.SAFETY_OUTCOME_REVIEW,
            Outcome.BLOCK: safety_pb2.SAFETY_OUTCOME_BLOCK}
_OUTCOME_BACK = {value: key for key, value in _OUTCOME.items()}
_SOURCE = {Source.PROMPT: safety_pb2.DECISION_SOURCE_PROMPT, Source.IMAGE: safety_pb2.DECISION_SOURCE_IMAGE,
           Source.GALLERY: safety_pb2.DECISION_SOURCE_GALLERY, Source.MINOR: safety_pb2.DECISION_SOURCE_MINOR}
_SOURCE_BACK = {value: key for key, value in _SOURCE.items()}
_STATUS = {Status.PENDING: safety_pb2.REVIEW_STATUS_PENDING, Status.APPROVED: safety_pb2.REVIEW_STATUS_APPROVED,
           Status.REJECTED: safety_pb2.REVIEW_STATUS_REJECTED}
_STATUS_BACK = {value: key for key, value in _STATUS.items()}
MAX_QUALITY = 100  # JPEG / WebP quality, as GenerateRequest.quality
_FORMATS = (common_pb2.IMAGE_FORMAT_UNSPECIFIED, common_pb2.PNG, common_pb2.JPEG, common_pb2.WEBP)


def decision_message(decision: Decision) -> safety_pb2.SafetyDecision:
    return safety_pb2.SafetyDecision(
        outcome=_OUTCOME[decision.outcome], category=decision.category, score=float(decision.score),
        threshold=float(decision.threshold), policy_version=decision.policy_version,
        source=_SOURCE[decision.source], reason=decision.reason, field=decision.field)


def decision_from_message(message: safety_pb2.SafetyDecision) -> Decision | None:
    if message.outcome not in _OUTCOME_BACK:
        return None
    return Decision(_OUTCOME_BACK[message.outcome], message.category, message.score, message.threshold,
                    message.policy_version, _SOURCE_BACK.get(message.source, Source.PROMPT), message.reason,
                    message.field)


def _timestamp(value: datetime | None):
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    if value is not None:
        stamp.FromDatetime(value.astimezone(timezone.utc))
    return stamp


def case_message(case, with_image: bool = False) -> safety_pb2.ReviewCase:
    message = safety_pb2.ReviewCase(
        case_id=case.case_id, status=_STATUS[case.status], created_at=_timestamp(case.created_at),
        updated_at=_timestamp(case.updated_at), retention_deadline=_timestamp(case.retention_deadline),
        request_id=case.request_id, model_id=case.model_id, prompt_hash=case.prompt_hash,
        decisions=[decision_message(decision) for decision in case.decisions],
        width=case.width, height=case.height, reviewer=case.reviewer or "", review_note=case.review_note or "")
    if with_image:
        message.image.CopyFrom(common_pb2.EncodedImage(data=case.image, mime_type=case.image_mime,
                                                       width=case.width, height=case.height))
    return message


def marked_message(marked: MarkedFile, engine: SafetyEngine) -> safety_pb2.MarkedImage:
    return safety_pb2.MarkedImage(
        image=common_pb2.EncodedImage(data=marked.data, mime_type=marked.mime_type, width=marked.width,
                                      height=marked.height),
        marking=safety_pb2.Marking(
            watermarked=marked.watermarked, watermark_method=engine.watermarker.method,
            watermark_bits=engine.watermarker.bits, watermark_payload=marked.watermark_payload,
            watermark_skipped_reason=marked.watermark_skipped_reason, manifest=marked.manifest,
            manifest_skipped_reason=marked.manifest_skipped_reason, policy_version=engine.version))


def _record(check: str, decisions: Sequence[Decision]) -> None:
    for decision in decisions:
        metrics.SAFETY_DECISIONS.labels("safety", check, decision.category or "none", decision.outcome.name).inc()


class SafetyServicer(safety_pb2_grpc.SafetyServiceServicer):
    def __init__(self, engine: SafetyEngine, admission: Admission, max_batch: int, max_image_bytes: int,
                 max_prompt_chars: int, max_texts: int = 64) -> None:
        self._engine = engine
        self._admission = admission
        self._max_batch = max_batch
        self._max_image_bytes = max_image_bytes
        self._max_prompt_chars = max_prompt_chars
        self._max_texts = max_texts

    async def _compute(self, name: str, fn: Callable[[], T]) -> tuple[T, common_pb2.StageUsage]:
        async with self._admission.slot() as usage:
            result = await self._admission.submit(usage, traced(name, fn))
        return result, self._admission.report(usage)

    async def _store(self, fn: Callable[[], T]) -> T:
        """A review-store call: off the event loop (the database may block)."""
        with _case_errors():
            return await asyncio.to_thread(fn)

    # --- checks ----------------------------------------------------------------------------
    async def CheckPrompt(self, request: safety_pb2.CheckPromptRequest,
                          context: grpc.aio.ServicerContext) -> safety_pb2.CheckPromptResponse:
        if len(request.texts) > self._max_texts:
            raise InvalidArgument("texts", len(request.texts), f"at most {self._max_texts} texts per call")
        texts = []
        for i, item in enumerate(request.texts):
            if len(item.text) > self._max_prompt_chars:
                raise InvalidArgument(f"texts[{i}].text", f"{len(item.text)} characters",
                                      f"at most {self._max_prompt_chars}")
            texts.append((item.field or f"texts[{i}]", item.text))
        (decision, decisions, digest), usage = await self._compute(
            "safety.check_prompt", lambda: self._engine.check_prompt(texts))
        _record("prompt", [decision])
        annotate(**{"diffmesh.safety.outcome": decision.outcome.name, "diffmesh.safety.category": decision.category,
                    "diffmesh.safety.policy_version": decision.policy_version, "diffmesh.safety.texts": len(texts)})
        return safety_pb2.CheckPromptResponse(decision=decision_message(decision),
                                              decisions=[decision_message(d) for d in decisions],
                                              prompt_hash=digest, usage=usage)

    def _faces(self, item: safety_pb2.ImageToCheck, index: int) -> list[FaceInfo]:
        faces = []
        for j, face in enumerate(item.faces):
            embedding = None
            if face.HasField("normed_embedding"):
                embedding = codec.to_numpy(face.normed_embedding, f"images[{index}].faces[{j}].normed_embedding",
                                           dtypes=codec.FLOAT_DTYPES, rank=1, finite=True, nonempty=True)
                embedding = np.asarray(embedding, dtype=np.float32)
            age = face.age if face.HasField("age") else None
            box = (face.box.x1, face.box.y1, face.box.x2, face.box.y2)
            faces.append(FaceInfo(embedding=embedding, embedding_model=face.embedding_model, age=age, box=box))
        return faces

    async def CheckImages(self, request: safety_pb2.CheckImagesRequest,
                          context: grpc.aio.ServicerContext) -> safety_pb2.CheckImagesResponse:
        images = codec.rgb_images((item.image for item in request.images), "images", self._max_batch,
                                  self._max_image_bytes)
        if self._engine.images.needs_faces and not all(item.faces_analyzed for item in request.images):
            raise FailedPrecondition("this safety policy compares faces with a protected-identity gallery: "
                                     "every image needs its faces (faces_analyzed) from the face stage")
        faces = [self._faces(item, i) for i, item in enumerate(request.images)]
        prompt_decision = decision_from_message(request.prompt_decision) if request.HasField("prompt_decision") \
            else None

        pending = [request.faces_on_demand and not item.faces_analyzed for item in request.images]

        def run() -> list[ImageCheck]:
            return self._engine.check_images(images, faces, prompt_decision, request.request_id,
                                             request.model_id, request.prompt_hash, faces_pending=pending)
        checks, usage = await self._compute("safety.check_images", run)
        _record("image", [check.decision for check in checks if not check.needs_faces])  # the rest come back
        worst = max(checks, key=lambda check: check.decision.outcome).decision
        annotate(**{"diffmesh.safety.outcome": worst.outcome.name, "diffmesh.safety.category": worst.category,
                    "diffmesh.safety.policy_version": self._engine.version, "diffmesh.batch_size": len(images),
                    "diffmesh.safety.review_cases": sum(1 for check in checks if check.case_id),
                    "diffmesh.safety.needs_faces": sum(1 for check in checks if check.needs_faces)})
        metrics.BATCH_SIZE.labels("safety").observe(len(images))
        return safety_pb2.CheckImagesResponse(
            images=[safety_pb2.ImageSafetyVerdict(decision=decision_message(check.decision),
                                                  decisions=[decision_message(d) for d in check.decisions],
                                                  case_id=check.case_id, needs_faces=check.needs_faces)
                    for check in checks],
            policy_version=self._engine.version, usage=usage)

    def _format(self, fmt: int, quality: int) -> None:
        if fmt not in _FORMATS:
            raise InvalidArgument("format", fmt, "must be PNG, JPEG or WEBP")
        if not 0 <= quality <= MAX_QUALITY:
            raise InvalidArgument("quality", quality, f"must be in [0, {MAX_QUALITY}] (0: default)")

    async def MarkImages(self, request: safety_pb2.MarkImagesRequest,
                         context: grpc.aio.ServicerContext) -> safety_pb2.MarkImagesResponse:
        images = codec.rgb_images(request.images, "images", self._max_batch, self._max_image_bytes)
        self._format(request.format, request.quality)
        if not request.request_id:
            raise InvalidArgument("request_id", "", "required: the manifest records it")

        def run() -> list[MarkedFile]:
            return self._engine.mark(images, request.format, request.quality, request.request_id, request.model_id,
                                     request.watermark_key or request.request_id)
        marked, usage = await self._compute("safety.mark_images", run)
        annotate(**{"diffmesh.batch_size": len(images),
                    "diffmesh.safety.watermarked": sum(1 for m in marked if m.watermarked),
                    "diffmesh.safety.manifests": sum(1 for m in marked if m.manifest)})
        return safety_pb2.MarkImagesResponse(images=[marked_message(m, self._engine) for m in marked], usage=usage)

    async def DescribePolicy(self, request: safety_pb2.DescribePolicyRequest,
                             context: grpc.aio.ServicerContext) -> safety_pb2.DescribePolicyResponse:
        policy = self._engine.policy
        return safety_pb2.DescribePolicyResponse(
            policy_version=policy.version, prompt_categories=[c.name for c in policy.prompt_categories],
            image_labels=[rule.label for rule in policy.image_labels], needs_faces=self._engine.images.needs_faces,
            gallery_size=self._engine.images.gallery_size, watermark_method=self._engine.watermarker.method,
            uses_ages=policy.minor_age > 0)

    # --- review queue ----------------------------------------------------------------------
    async def ListCases(self, request: safety_pb2.ListCasesRequest,
                        context: grpc.aio.ServicerContext) -> safety_pb2.ListCasesResponse:
        if not 0 <= request.limit <= 500:
            raise InvalidArgument("limit", request.limit, "must be in [0, 500] (0: 50)")
        if request.status and request.status not in _STATUS_BACK:
            raise InvalidArgument("status", request.status, "unknown review status")
        status = _STATUS_BACK.get(request.status)
        before = request.before.ToDatetime(tzinfo=timezone.utc) if request.HasField("before") else None
        cases = await self._store(lambda: self._engine.store.list(status=status, limit=request.limit or 50,
                                                                  before=before))
        return safety_pb2.ListCasesResponse(cases=[case_message(case) for case in cases])

    def _case_id(self, case_id: str) -> str:
        if not case_id:
            raise InvalidArgument("case_id", "", "required")
        return case_id

    async def GetCase(self, request: safety_pb2.GetCaseRequest,
                      context: grpc.aio.ServicerContext) -> safety_pb2.GetCaseResponse:
        case_id = self._case_id(request.case_id)
        case = await self._store(lambda: self._engine.store.get(case_id))
        if case is None:
            raise NotFound(f"review case {case_id} not found (unknown, or purged after its retention)")
        return safety_pb2.GetCaseResponse(case=case_message(case, request.include_image))

    async def DecideCase(self, request: safety_pb2.DecideCaseRequest,
                         context: grpc.aio.ServicerContext) -> safety_pb2.DecideCaseResponse:
        case_id = self._case_id(request.case_id)
        if request.decision not in (safety_pb2.REVIEW_STATUS_APPROVED, safety_pb2.REVIEW_STATUS_REJECTED):
            raise InvalidArgument("decision", request.decision, "must be REVIEW_STATUS_APPROVED or REVIEW_STATUS_REJECTED")
        if not request.reviewer.strip():
            raise InvalidArgument("reviewer", request.reviewer, "required: who decided")
        case: ReviewCase = await self._store(lambda: self._engine.store.decide(
            case_id, _STATUS_BACK[request.decision], request.reviewer.strip(), request.note))
        metrics.SAFETY_DECISIONS.labels("safety", "review", "review", case.status.name).inc()
        return safety_pb2.DecideCaseResponse(case=case_message(case))

    async def PurgeExpiredCases(self, request: safety_pb2.PurgeExpiredCasesRequest,
                                context: grpc.aio.ServicerContext) -> safety_pb2.PurgeExpiredCasesResponse:
        purged = await self._store(self._engine.store.purge_expired)
        return safety_pb2.PurgeExpiredCasesResponse(purged=purged)

    async def ReleaseCase(self, request: safety_pb2.ReleaseCaseRequest,
                          context: grpc.aio.ServicerContext) -> safety_pb2.ReleaseCaseResponse:
        case_id = self._case_id(request.case_id)
        self._format(request.format, request.quality)
        with _case_errors():
            (case, marked), usage = await self._compute(
                "safety.release_case", lambda: self._engine.release(case_id, request.format, request.quality))
        return safety_pb2.ReleaseCaseResponse(image=marked_message(marked, self._engine), case=case_message(case),
                                              usage=usage)


@contextmanager
def _case_errors() -> Iterator[None]:
    """The review store's errors as status codes: NOT_FOUND, FAILED_PRECONDITION."""
    try:
        yield
    except CaseNotFound as exc:
        raise NotFound(f"review case {exc.case_id} not found (unknown, or purged after its retention)") from None
    except (CaseStateError, NotReleasable) as exc:
        raise FailedPrecondition(str(exc)) from None
