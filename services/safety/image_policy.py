"""The image policy: NSFW detector labels, protected-identity gallery matches, and minors.

Three rules, each giving Decisions (services.safety.decisions):

- IMAGE: each detection whose label has an ImageLabelRule is decided by that rule's thresholds
  under its category. Labels without a rule are ignored (the detector also reports faces, feet,
  covered body parts).
- GALLERY: each face whose embedding comes from a model the gallery has entries of is decided by
  its best cosine similarity against those entries, under policy.gallery's thresholds for that
  embedding model (a gallery model without thresholds is a start-up error). Faces of other models
  are not comparable and give no decision; faces without an embedding neither.
- MINOR: a `sexual` label scoring at least its rule's REVIEW threshold, in an image with a face
  whose estimated age is under policy.minor_age, is a BLOCK under policy.minor_category,
  whatever the block threshold says. Why the review threshold triggers it:
    * not the block threshold: the review band is where the policy says "a person must look".
      For adults that is a cost worth paying; with a probable minor it would mean queueing
      possible child sexual abuse material for human reviewers and storing it in the review
      store. Blocking outright is the only acceptable outcome of that band.
    * not "any detection": the detector reports everything scoring >= 0.2, and ordinary photos
      produce sexual labels there (the coffee photo in skimage.data gives BUTTOCKS_EXPOSED 0.30).
      Photos of children are common and benign and age estimates are noisy; "any detection" would
      block family photos on detector noise. The review threshold is the policy's own statement
      of where a score starts to mean something.
  Faces without an age (the face pack estimates none) never trigger it; minor_age <= 0 turns it off.

Reasons name rules, labels, face indices and gallery entry ids (the operator's own labels for
protected people), never embeddings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from services.safety.decisions import Decision, ImageLabelRule, Outcome, Policy, Source, Thresholds, worst
from services.safety.gallery import Gallery
from services.safety.nsfw import Detection


class Detector(Protocol):
    @property
    def labels(self) -> Sequence[str]: ...

    def detect(self, image: np.ndarray) -> list[Detection]: ...


@dataclass(frozen=True, eq=False)
class FaceInfo:
    """One face of the image, as the face stage described it."""

    embedding: np.ndarray | None = field(default=None, repr=False)  # L2-normalised; None: not computed
    embedding_model: str = ""                                      # the face pack's embedding_model
    age: float | None = None                                       # years; None: the pack estimates none
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # x1, y1, x2, y2 in pixels


@dataclass(frozen=True)
class ImageVerdict:
    decision: Decision               # the most severe
    decisions: list[Decision]        # every non-ALLOW decision, or just the (ALLOW) worst when none
    detections: int                  # how many detections the detector reported (all labels)
    # Whether the image's face ages could change the decision: the minor rule is on and a sexual
    # label reached its review threshold. Callers that analyse faces on demand do so only then.
    ages_matter: bool = False


class ImagePolicy:
    def __init__(self, policy: Policy, detector: Detector, gallery: Gallery | None) -> None:
        unknown = sorted({rule.label for rule in policy.image_labels} - set(detector.labels))
        if unknown:
            # A misspelt label would never match and silently allow everything it was meant to catch.
            raise ValueError(f"policy {policy.version}: image labels {unknown} are not labels of the NSFW "
                             f"detector (it has {sorted(detector.labels)})")
        # The thresholds deciding each model's faces, resolved once (exact key, else family).
        self._gallery_thresholds: dict[str, Thresholds] = {}
        if gallery is not None:
            found = {model: policy.gallery.thresholds_for(model) for model in gallery.models}
            unthresholded = sorted(model for model, thresholds in found.items() if thresholds is None)
            if unthresholded:
                # Deciding those faces with another model's numbers would block strangers or miss matches.
                raise ValueError(f"policy {policy.version}: the gallery {gallery.source} has entries of embedding "
                                 f"model(s) {unthresholded} with no thresholds under gallery.models (it has "
                                 f"{sorted(policy.gallery.models)}; a key is an embedding model or its family, "
                                 "the part before ' (')")
            self._gallery_thresholds = {model: thresholds for model, thresholds in found.items()
                                        if thresholds is not None}
        self.policy = policy
        self.detector = detector
        self.gallery = gallery
        self._rules: dict[str, ImageLabelRule] = {rule.label: rule for rule in policy.image_labels}

    @property
    def gallery_size(self) -> int:
        return len(self.gallery) if self.gallery is not None else 0

    @property
    def needs_faces(self) -> bool:
        """Whether a check is incomplete without the image's face embeddings (a gallery is set)."""
        return self.gallery_size > 0

    def check(self, image: np.ndarray, faces: Sequence[FaceInfo] = (), field: str = "images[0]") -> ImageVerdict:
        detections = self.detector.detect(image)
        decisions = [*self._label_decisions(detections, field), *self._gallery_decisions(faces, field)]
        minor = self._minor_decision(detections, faces, field)
        if minor is not None:
            decisions.append(minor)
        decision = worst(decisions, self.policy.version, Source.IMAGE)
        if not decision.field:
            decision = dataclasses.replace(decision, field=field)
        flagged = [d for d in decisions if d.outcome is not Outcome.ALLOW]
        return ImageVerdict(decision=decision, decisions=flagged or [decision], detections=len(detections),
                            ages_matter=self.policy.minor_age > 0 and bool(self._sexual_at_review(detections)))

    def _label_decisions(self, detections: Sequence[Detection], field: str) -> list[Decision]:
        decisions = []
        for detection in detections:
            rule = self._rules.get(detection.label)
            if rule is None:
                continue
            outcome, threshold = rule.thresholds.outcome(detection.score)
            decisions.append(Decision(
                outcome, rule.category, detection.score, threshold, self.policy.version, Source.IMAGE,
                reason=f"detector label {detection.label} scored {detection.score:.3f} (review at "
                       f"{rule.thresholds.review}, block at {rule.thresholds.block})",
                field=field))
        return decisions

    def _gallery_decisions(self, faces: Sequence[FaceInfo], field: str) -> list[Decision]:
        if self.gallery is None:
            return []
        rules = self.policy.gallery
        decisions = []
        for index, face in enumerate(faces):
            if face.embedding is None or face.embedding_model not in self.gallery.models:
                continue
            entry_id, similarity = self.gallery.match(face.embedding, face.embedding_model)
            thresholds = self._gallery_thresholds[face.embedding_model]
            outcome, threshold = thresholds.outcome(similarity)
            decisions.append(Decision(
                outcome, rules.category, similarity, threshold, self.policy.version, Source.GALLERY,
                reason=f"face {index} is most similar to protected identity {entry_id} (cosine similarity "
                       f"{similarity:.3f}; {face.embedding_model} thresholds: review at {thresholds.review}, "
                       f"block at {thresholds.block})",
                field=field))
        return decisions

    def _sexual_at_review(self, detections: Sequence[Detection]) -> list[tuple[Detection, ImageLabelRule]]:
        return [(d, self._rules[d.label]) for d in detections
                if d.label in self._rules and self._rules[d.label].sexual
                and d.score >= self._rules[d.label].thresholds.review]

    def _minor_decision(self, detections: Sequence[Detection], faces: Sequence[FaceInfo],
                        field: str) -> Decision | None:
        minor_age = self.policy.minor_age
        if minor_age <= 0:
            return None
        minors = [i for i, face in enumerate(faces) if face.age is not None and face.age < minor_age]
        if not minors:
            return None
        sexual = self._sexual_at_review(detections)
        if not sexual:
            return None
        detection, rule = max(sexual, key=lambda pair: pair[0].score - pair[1].thresholds.review)
        faces_named = ", ".join(str(i) for i in minors)
        return Decision(
            Outcome.BLOCK, self.policy.minor_category, detection.score, rule.thresholds.review,
            self.policy.version, Source.MINOR,
            reason=f"sexual label {detection.label} scored {detection.score:.3f} (>= its review threshold "
                   f"{rule.thresholds.review}) together with a face estimated under {minor_age} "
                   f"(face {faces_named})",
            field=field)

    def __repr__(self) -> str:
        return (f"ImagePolicy(version={self.policy.version!r}, labels={len(self._rules)}, "
                f"gallery_entries={self.gallery_size}, detector={self.detector!r})")
