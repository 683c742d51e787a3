"""What every safety check returns, and the policy's typed form: plain Python, no gRPC.

A decision is ALLOW, REVIEW or BLOCK with the policy category it concerns, the score that
decided it, the threshold that score crossed (or the nearest one it stayed under, for ALLOW) and
the policy version, so a caller can tell why and under which rules. Decisions carry no prompt
text, face crop or embedding: only categories, labels and numbers.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence


class Outcome(enum.IntEnum):
    """Ordered by severity: the worst of several decisions is the max."""

    ALLOW = 0
    REVIEW = 1
    BLOCK = 2


class Source(str, enum.Enum):
    PROMPT = "prompt"        # prompt policy (lexical rules or semantic similarity)
    IMAGE = "image"          # NSFW detector labels
    GALLERY = "gallery"      # protected-identity gallery match
    MINOR = "minor"          # sexual-content label with a face estimated under the minor age


@dataclass(frozen=True)
class Thresholds:
    """A score >= review is REVIEW, >= block is BLOCK (review <= block; review == block: no review band)."""

    review: float
    block: float

    def outcome(self, score: float) -> tuple[Outcome, float]:
        """The outcome for `score` and the threshold that decided it (for ALLOW: review, the one not reached)."""
        if score >= self.block:
            return Outcome.BLOCK, self.block
        if score >= self.review:
            return Outcome.REVIEW, self.review
        return Outcome.ALLOW, self.review


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    category: str            # policy category or detector label ("" for a plain ALLOW of nothing)
    score: float
    threshold: float
    policy_version: str
    source: Source = Source.PROMPT
    reason: str = ""         # why, for people: names rules and labels, never the prompt's words
    field: str = ""          # which input it concerns: "prompt", "prompt_2", "face_prompts[1]", "images[0]"

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW


def worst(decisions: Iterable[Decision], policy_version: str, source: Source = Source.PROMPT) -> Decision:
    """The most severe decision (ties: the higher score relative to its threshold, then the
    first); an ALLOW with no category when there are none."""
    best: Decision | None = None
    for decision in decisions:
        if best is None or (decision.outcome, decision.score - decision.threshold) > \
                (best.outcome, best.score - best.threshold):
            best = decision
    return best or Decision(Outcome.ALLOW, "", 0.0, 0.0, policy_version, source)


@dataclass(frozen=True)
class PromptCategory:
    """One prompt-policy category: semantic example phrases (compared with the prompt by a
    sentence encoder, cosine similarity in [-1, 1] against `semantic`), and lexical terms
    (matched on the normalised prompt: a term match scores 1.0 against `lexical`)."""

    name: str
    description: str
    semantic: Thresholds
    examples: tuple[str, ...]
    lexical: Thresholds = Thresholds(1.0, 1.0)
    terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageLabelRule:
    """One NSFW detector label (nudenet's class names, e.g. FEMALE_GENITALIA_EXPOSED) with its
    thresholds on the detector score; `sexual` labels combine with an under-age face into BLOCK."""

    label: str
    category: str            # the policy category it reports under (e.g. "sexual_explicit")
    thresholds: Thresholds
    sexual: bool = False


def embedding_family(embedding_model: str) -> str:
    """The model an embedding_model string names without its weights' label: "arcface-512
    (antelopev2)" -> "arcface-512". Thresholds belong to the network (its loss, its dimension), so
    one entry covers every pack of it."""
    return embedding_model.split(" (", 1)[0].strip()


@dataclass(frozen=True)
class GalleryPolicy:
    """Protected identities: cosine similarity of normalised face embeddings against the gallery
    file's entries (made by `embedding_model`; faces from another model are not comparable).

    Thresholds are per embedding model because similarities are not comparable across models:
    dlib's 128-d ResNet puts two different people at cosine 0.81-0.91 (measured, 192 pairs) where
    ArcFace puts them near 0; one threshold for both blocks every dlib face or misses every ArcFace
    match. Keys are an exact embedding_model ("arcface-512 (antelopev2)") or its family
    ("arcface-512"); the exact key wins."""

    path: str                # the gallery file ("" : no gallery configured)
    models: Mapping[str, Thresholds]
    category: str = "protected_identity"

    def thresholds_for(self, embedding_model: str) -> Thresholds | None:
        """The thresholds that decide faces of `embedding_model`; None when the policy has none."""
        found = self.models.get(embedding_model)
        return found if found is not None else self.models.get(embedding_family(embedding_model))


@dataclass(frozen=True)
class Policy:
    version: str
    prompt_categories: tuple[PromptCategory, ...]
    image_labels: tuple[ImageLabelRule, ...]
    gallery: GalleryPolicy
    minor_age: int = 18
    minor_category: str = "sexual_minors"
    # Labels the detector reports that are not in image_labels are ignored (covered body parts, faces).
    categories: Sequence[str] = field(default=())

    def prompt_category(self, name: str) -> PromptCategory:
        for category in self.prompt_categories:
            if category.name == name:
                return category
        raise KeyError(name)
