"""A retried CheckImages opens no second review case: the safety engine names each REVIEW image's
case by a keyed hash of the request and the pixels, and the review store returns the case already
stored for that name. A real SQLite store throughout (its clock injected); the image policy's
detector is a double, and the marking parts open_case never touches are left out (None)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from services.safety.decisions import Decision, GalleryPolicy, ImageLabelRule, Outcome, Policy, Source, Thresholds
from services.safety.engine import SafetyEngine
from services.safety.image_policy import ImagePolicy
from services.safety.nsfw import NUDENET_LABELS, Detection
from services.safety.review_store import ReviewStore, SqliteReviewStore, Status, open_review_store
from tests.unit.test_review_store import together

POLICY = Policy(version="test-idem", prompt_categories=(),
                image_labels=(ImageLabelRule("FEMALE_GENITALIA_COVERED", "suggestive", Thresholds(0.60, 0.90)),),
                gallery=GalleryPolicy(path="", models={"arcface-512": Thresholds(0.5, 0.65)}), minor_age=0)
HASH = "cd" * 32
START = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
DECISION = Decision(Outcome.REVIEW, "suggestive", 0.65, 0.60, "test-idem", Source.IMAGE,
                    "FEMALE_GENITALIA_COVERED 0.65 >= review 0.6", "images[0]")


class AlwaysReview:
    """Detector double: every image carries a non-sexual label in its review band."""

    labels = NUDENET_LABELS

    def detect(self, image: np.ndarray) -> list[Detection]:
        return [Detection("FEMALE_GENITALIA_COVERED", 0.65, (0, 0, 4, 4))]


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def engine_on(store: ReviewStore, salt: bytes = b"deployment-secret") -> SafetyEngine:
    return SafetyEngine(policy=POLICY, prompts=None, images=ImagePolicy(POLICY, AlwaysReview(), None),
                        watermarker=None, signer=None, store=store, prompt_hash_salt=salt)


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    with open_review_store(f"sqlite://{tmp_path / 'review.db'}", retention=timedelta(days=7), clock=clock) as opened:
        yield opened


def test_the_same_image_of_the_same_request_opens_one_case(store: ReviewStore, clock: Clock):
    engine = engine_on(store)
    first = engine.open_case(pixels(), [DECISION], "req-1", "tiny", HASH)
    clock.now += timedelta(seconds=30)  # the retry comes later
    again = engine.open_case(pixels(), [DECISION], "req-1", "tiny", HASH)
    assert again.case_id == first.case_id and again.created_at == START
    assert store.counts()[Status.PENDING] == 1


def test_one_changed_pixel_or_another_request_is_another_case(store: ReviewStore):
    engine = engine_on(store)
    base = engine.open_case(pixels(), [DECISION], "req-1", "tiny", HASH)
    changed = pixels()
    changed[7, 5, 1] ^= 1
    ids = {base.case_id,
           engine.open_case(changed, [DECISION], "req-1", "tiny", HASH).case_id,
           engine.open_case(pixels(), [DECISION], "req-2", "tiny", HASH).case_id,
           engine.open_case(pixels(), [DECISION], "req-1", "other-model", HASH).case_id,
           engine.open_case(pixels(), [DECISION], "req-1", "tiny", "ef" * 32).case_id,
           # The same bytes in another shape are another image.
           engine.open_case(pixels().reshape(24, 16, 3), [DECISION], "req-1", "tiny", HASH).case_id}
    assert len(ids) == 6 and store.counts()[Status.PENDING] == 6


def test_the_case_id_depends_on_the_deployment_secret(tmp_path: Path):
    opened = [SqliteReviewStore(tmp_path / name / "review.db", timedelta(days=7), Clock()) for name in "ab"]
    try:
        one = engine_on(opened[0], b"secret-a").open_case(pixels(), [DECISION], "req-1", "tiny", HASH)
        other = engine_on(opened[1], b"secret-b").open_case(pixels(), [DECISION], "req-1", "tiny", HASH)
        assert one.case_id != other.case_id  # not computable from the request's public data alone
    finally:
        for store in opened:
            store.close()


def test_without_a_request_id_every_call_opens_its_own_case(store: ReviewStore):
    engine = engine_on(store)
    first = engine.open_case(pixels(), [DECISION], "", "tiny", HASH)
    second = engine.open_case(pixels(), [DECISION], "", "tiny", HASH)
    assert first.case_id != second.case_id


def test_a_retried_check_images_gets_the_first_replys_case_ids(store: ReviewStore, clock: Clock):
    engine = engine_on(store)
    batch = [pixels(1), pixels(2)]
    first = engine.check_images(batch, [[], []], None, "req-9", "tiny", HASH)
    assert [check.decision.outcome for check in first] == [Outcome.REVIEW, Outcome.REVIEW]
    clock.now += timedelta(seconds=5)
    retry = engine.check_images(batch, [[], []], None, "req-9", "tiny", HASH)
    assert [check.case_id for check in retry] == [check.case_id for check in first]
    assert len({check.case_id for check in first}) == 2 and store.counts()[Status.PENDING] == 2


def test_two_replicas_on_one_file_racing_one_image_make_one_case(tmp_path: Path):
    """Two stores on one SQLite file are two connections (two replicas): the conflict is settled by
    the database, not by one store's lock."""
    replicas = [SqliteReviewStore(tmp_path / "review.db", timedelta(days=7), Clock()) for _ in range(2)]
    engines = [engine_on(store) for store in replicas]
    ids: list[str] = []
    try:
        errors = together(8, lambda index: ids.append(
            engines[index % 2].open_case(pixels(), [DECISION], "req-race", "tiny", HASH).case_id))
        assert errors == [] and len(ids) == 8 and len(set(ids)) == 1
        assert replicas[0].counts()[Status.PENDING] == 1
    finally:
        for store in replicas:
            store.close()
