"""The safety stage's compute, no gRPC: the checks, the review queue, and marking.

`SafetyEngine` ties the parts together the way the stage serves them:

- check_prompt: every asked-for text through the prompt policy; the most severe decision and a
  salted hash of the texts (what a review case keeps instead of them).
- check_images: each image through the image policy (NSFW labels, gallery, minors). A prompt sent
  to REVIEW holds every image for review. An image decided REVIEW is stored as a review case
  (its PNG, the decisions, the ids and the prompt hash) and gets the case's id.
- mark: each image watermarked (payload tied to the request id), encoded in the asked format
  and signed (C2PA manifest embedded) where the format carries one.
- release: an approved case's image, marked like any other.

Order matters for the marks: the watermark goes into the pixels, then the file is encoded, then
the manifest signs the file's bytes (so it also covers the watermarked pixels).
"""
from __future__ import annotations

import hashlib
import hmac
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from diffmesh.imaging import encode_image
from diffmesh.proto.v1 import common_pb2
from services.safety.decisions import Decision, Outcome, Policy, Source, worst
from services.safety.image_policy import FaceInfo, ImagePolicy
from services.safety.prompt_policy import PromptPolicy
from services.safety.provenance import ProvenanceFacts, ProvenanceSigner
from services.safety.review_store import CaseNotFound, NewCase, ReviewCase, ReviewStore, Status
from services.safety.watermark import Watermarker

# Formats a C2PA manifest is embedded in (c2pa-python signs these in place).
SIGNED_MIME = {"image/png", "image/jpeg"}


class NotReleasable(ValueError):
    """A case that is not APPROVED (pending or rejected): its image does not leave."""


@dataclass(frozen=True)
class ImageCheck:
    decision: Decision                     # the most severe
    decisions: list[Decision]
    case_id: str = ""                      # REVIEW: the case holding the image
    needs_faces: bool = False              # undecided until the caller sends the image's faces


@dataclass(frozen=True)
class MarkedFile:
    data: bytes
    mime_type: str
    width: int
    height: int
    watermarked: bool
    watermark_payload: str                 # hex
    watermark_skipped_reason: str
    manifest: bool
    manifest_skipped_reason: str


@dataclass
class SafetyEngine:
    policy: Policy
    prompts: PromptPolicy
    images: ImagePolicy
    watermarker: Watermarker
    signer: ProvenanceSigner
    store: ReviewStore
    prompt_hash_salt: bytes = b""
    png_compress_level: int = 4

    @property
    def version(self) -> str:
        return self.policy.version

    # --- prompts ---------------------------------------------------------------------------
    def check_prompt(self, texts: Sequence[tuple[str, str]]) -> tuple[Decision, list[Decision], str]:
        """(the most severe decision, one per text, the salted hash of the texts)."""
        decisions = self.prompts.check(list(texts)) if texts else []
        return worst(decisions, self.version), decisions, self.hash_texts(texts)

    def hash_texts(self, texts: Sequence[tuple[str, str]]) -> str:
        """HMAC-SHA-256 of the asked-for texts under the deployment's salt: the same request
        hashes the same within a deployment (reviewers can group repeats), and hashes are not
        comparable across deployments or against a dictionary without the salt."""
        digest = hmac.new(self.prompt_hash_salt, digestmod=hashlib.sha256)
        for name, text in texts:
            for part in (name, text):
                encoded = part.encode("utf-8")
                digest.update(len(encoded).to_bytes(8, "big") + encoded)
        return digest.hexdigest()

    # --- images ----------------------------------------------------------------------------
    def check_images(self, images: Sequence[np.ndarray], faces: Sequence[Sequence[FaceInfo]],
                     prompt_decision: Decision | None, request_id: str, model_id: str,
                     prompt_hash: str, faces_pending: Sequence[bool] = ()) -> list[ImageCheck]:
        """faces_pending[i]: image i came without faces and the caller sends them on request; if
        they could change its decision it is returned undecided (needs_faces), with no case opened."""
        checks = []
        for index, (image, image_faces) in enumerate(zip(images, faces)):
            verdict = self.images.check(image, image_faces, field=f"images[{index}]")
            pending = index < len(faces_pending) and faces_pending[index]
            decisions = [d for d in verdict.decisions if d.outcome is not Outcome.ALLOW] or [verdict.decision]
            if prompt_decision is not None and prompt_decision.outcome is Outcome.REVIEW:
                decisions = [prompt_decision, *[d for d in decisions if d.outcome is not Outcome.ALLOW]]
            decision = worst(decisions, self.version, Source.IMAGE)
            if pending and verdict.ages_matter:
                checks.append(ImageCheck(decision, decisions, needs_faces=True))
                continue
            case_id = ""
            if decision.outcome is Outcome.REVIEW:
                case_id = self.open_case(image, decisions, request_id, model_id, prompt_hash).case_id
            checks.append(ImageCheck(decision, decisions, case_id))
        return checks

    def open_case(self, image: np.ndarray, decisions: Sequence[Decision], request_id: str, model_id: str,
                  prompt_hash: str) -> ReviewCase:
        """The image as a review case: an unmarked PNG (reviewers see what was generated; the
        marks are added when an approved image is released).

        Idempotent per image of a request: the orchestrator retries CheckImages on UNAVAILABLE
        (a lost reply, a replica gone mid-reply), and the retry gets the case the first call opened
        instead of a duplicate. The key is an HMAC under the deployment secret over what identifies
        this image of this request (ids, prompt hash, shape and dtype, a SHA-256 of the raw pixels),
        each part length-prefixed like hash_texts so parts cannot run into each other; keyed, so a
        case id cannot be computed from public data. Same request and pixels: the same case; another
        request id or one changed pixel: another case. No request id: nothing says two calls are the
        same request, so every call opens its own case (a random id), as before."""
        pixels = np.ascontiguousarray(image)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=self.png_compress_level)
        height, width = image.shape[:2]
        key = ""
        if request_id:
            digest = hmac.new(self.prompt_hash_salt, digestmod=hashlib.sha256)
            for part in (b"diffmesh/review-case/v1", request_id.encode("utf-8"), model_id.encode("utf-8"),
                         prompt_hash.encode("utf-8"), f"{pixels.dtype.str}{pixels.shape}".encode("ascii"),
                         hashlib.sha256(pixels.tobytes()).digest()):
                digest.update(len(part).to_bytes(8, "big") + part)
            key = digest.hexdigest()
        return self.store.create(NewCase(
            request_id=request_id, model_id=model_id, prompt_hash=prompt_hash,
            decisions=list(decisions), image=buffer.getvalue(), image_mime="image/png", width=width, height=height,
            idempotency_key=key))

    # --- marking ---------------------------------------------------------------------------
    def mark(self, images: Sequence[np.ndarray], fmt: int, quality: int, request_id: str,
             model_id: str, watermark_key: str = "") -> list[MarkedFile]:
        """watermark_key (default: the request id) is what the payload is derived from."""
        payload = self.watermarker.payload_for(watermark_key or request_id)
        return [self._mark_one(image, fmt, quality, request_id, model_id, payload) for image in images]

    def _mark_one(self, image: np.ndarray, fmt: int, quality: int, request_id: str, model_id: str,
                  payload: bytes) -> MarkedFile:
        height, width = image.shape[:2]
        marked = self.watermarker.embed(np.ascontiguousarray(image), payload)
        encoded = encode_image(marked.image, fmt, quality, self.png_compress_level)
        data, manifest, manifest_reason = encoded.data, False, ""
        if encoded.mime_type in SIGNED_MIME:
            facts = ProvenanceFacts(
                model_id=model_id, policy_version=self.version, request_id=request_id, width=width, height=height,
                watermark_method=self.watermarker.method, watermark_bits=self.watermarker.bits,
                watermark_payload=payload.hex(), watermarked=marked.marked)
            data, manifest = self.signer.sign(encoded.data, encoded.mime_type, facts), True
        else:
            manifest_reason = f"{encoded.mime_type}: no C2PA manifest is embedded in this format (use PNG or JPEG)"
        return MarkedFile(data=data, mime_type=encoded.mime_type, width=width, height=height,
                          watermarked=marked.marked, watermark_payload=payload.hex() if marked.marked else "",
                          watermark_skipped_reason=marked.reason if not marked.marked else "",
                          manifest=manifest, manifest_skipped_reason=manifest_reason)

    # --- review ----------------------------------------------------------------------------
    def release(self, case_id: str, fmt: int, quality: int) -> tuple[ReviewCase, MarkedFile]:
        """An approved case's image, marked and signed. CaseNotFound / CaseStateError otherwise."""
        case = self.store.get(case_id)
        if case is None:
            raise CaseNotFound(case_id)
        if case.status is not Status.APPROVED:
            raise NotReleasable(f"review case {case_id} is {case.status.name}, not APPROVED: only an approved "
                                f"case's image is released")
        pixels = np.asarray(Image.open(io.BytesIO(case.image)).convert("RGB"))
        [marked] = self.mark([pixels], fmt or common_pb2.PNG, quality, case.request_id, case.model_id)
        return case, marked
