"""The review store on both databases: SQLite always, PostgreSQL against a real server the test
session starts (tests/postgres.py; those cases skip with the reason where it cannot start)."""
from __future__ import annotations

import hashlib
import io
import sqlite3
import threading
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.safety.decisions import Decision, Outcome, Source
from services.safety.review_store import (CaseIdCollision, CaseNotFound, CaseStateError, NewCase, ReviewCase,
                                          ReviewCaseSummary, ReviewStore, ReviewStoreError, SqliteReviewStore,
                                          Status, StoreUnavailable, case_id_for_key, hash_prompt,
                                          open_review_store, redact_url)
from tests.postgres import postgres_database_url, postgres_server_url  # noqa: F401  (fixtures)

PROMPT = "a very particular prompt about a lighthouse keeper"
SALT = b"deployment-secret"
START = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
RETENTION = timedelta(days=7)
DECISIONS = (
    Decision(Outcome.REVIEW, "sexual_suggestive", 0.71, 0.6, "policy-3", Source.IMAGE,
             "FEMALE_BREAST_EXPOSED 0.71 >= review 0.6", "images[0]"),
    Decision(Outcome.ALLOW, "violence", 0.12, 0.5, "policy-3", Source.PROMPT, "", "prompt"),
)


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def png(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    # Noise does not compress, so each image's bytes are distinctive enough to search a file for.
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def new_case(index: int = 0, key: str = "", request_id: str = "") -> NewCase:
    return NewCase(request_id=request_id or f"req-{index}", model_id="tiny-sdxl",
                   prompt_hash=hash_prompt(PROMPT, SALT), decisions=DECISIONS, image=png(index), width=24,
                   height=16, idempotency_key=key)


def together(count: int, work) -> list[BaseException]:
    """work(0..count-1), each in its own thread, all released at once; what they raised."""
    start, errors = threading.Barrier(count), []

    def run(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as exc:  # noqa: BLE001 - returned to the test's assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'volume' / 'queue' / 'review.db'}"
    return request.getfixturevalue("postgres_database_url")  # only postgres cases start the server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(store_url: str, clock: FakeClock):
    with open_review_store(store_url, retention=RETENTION, clock=clock) as opened:
        yield opened


def test_a_case_round_trips_every_field(store: ReviewStore):
    case = new_case(3)
    created = store.create(case)
    got = store.get(created.case_id)
    assert got == created
    assert (got.status, got.created_at, got.updated_at, got.retention_deadline) == \
        (Status.PENDING, START, START, START + RETENTION)
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
    assert (got.request_id, got.model_id, got.prompt_hash) == ("req-3", "tiny-sdxl", case.prompt_hash)
    assert got.decisions == DECISIONS
    assert got.image == png(3) and (got.image_mime, got.width, got.height) == ("image/png", 24, 16)
    assert (got.reviewer, got.review_note) == ("", "")


def test_case_ids_are_random_and_unknown_ids_are_none(store: ReviewStore):
    first, second = store.create(new_case()), store.create(new_case())
    assert first.case_id != second.case_id
    assert len(first.case_id) == 32 and int(first.case_id, 16) >= 0
    assert store.get("0" * 32) is None


def test_listing_is_newest_first_filtered_and_paged(store: ReviewStore, clock: FakeClock):
    ids = []
    for index in range(5):
        ids.append(store.create(new_case(index)).case_id)
        clock.advance(seconds=1)
    newest_first = ids[::-1]
    listed = store.list()
    assert [summary.case_id for summary in listed] == newest_first
    assert all(type(summary) is ReviewCaseSummary for summary in listed)
    assert "image" not in {f.name for f in fields(ReviewCaseSummary)}
    assert listed[0].decisions == DECISIONS and listed[0].width == 24

    store.decide(ids[1], Status.APPROVED, "alice")
    store.decide(ids[2], Status.REJECTED, "bob")
    assert [s.case_id for s in store.list(status=Status.APPROVED)] == [ids[1]]
    assert [s.case_id for s in store.list(status=Status.PENDING)] == [ids[4], ids[3], ids[0]]

    page = store.list(limit=2)
    assert [s.case_id for s in page] == newest_first[:2]
    rest = store.list(limit=2, before=page[-1].created_at)
    assert [s.case_id for s in rest] == newest_first[2:4]
    last = store.list(limit=2, before=rest[-1].created_at)
    assert [s.case_id for s in last] == newest_first[4:]
    with pytest.raises(ValueError):
        store.list(limit=0)


def test_paging_does_not_skip_cases_sharing_a_timestamp(store: ReviewStore):
    ids = {store.create(new_case(index)).case_id for index in range(5)}  # the clock stands still
    seen: list[str] = []
    page = store.list(limit=2)
    while page:
        seen += [s.case_id for s in page]
        page = store.list(limit=2, before=page[-1].created_at, before_id=page[-1].case_id)
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert store.list(before=START) == []  # created_at is strictly before START for none of them


def test_a_case_is_approved_or_rejected_once(store: ReviewStore, clock: FakeClock):
    approved_case, rejected_case = store.create(new_case(1)), store.create(new_case(2))
    clock.advance(minutes=5)
    approved = store.decide(approved_case.case_id, Status.APPROVED, "alice", "a film still")
    assert (approved.status, approved.reviewer, approved.review_note) == (Status.APPROVED, "alice", "a film still")
    assert approved.updated_at == START + timedelta(minutes=5) and approved.created_at == START
    assert store.get(approved_case.case_id) == approved
    rejected = store.decide(rejected_case.case_id, Status.REJECTED, "bob", "explicit")
    assert store.get(rejected_case.case_id).status is Status.REJECTED and rejected.reviewer == "bob"

    with pytest.raises(CaseStateError, match="already APPROVED") as twice:
        store.decide(approved_case.case_id, Status.REJECTED, "bob")
    assert twice.value.status is Status.APPROVED
    assert store.get(approved_case.case_id).reviewer == "alice"  # the second decision changed nothing
    with pytest.raises(CaseNotFound):
        store.decide("f" * 32, Status.REJECTED, "bob")
    pending = store.create(new_case(3))
    with pytest.raises(ValueError):
        store.decide(pending.case_id, Status.PENDING, "bob")
    with pytest.raises(ValueError):
        store.decide(pending.case_id, Status.APPROVED, "  ")


def test_cases_past_retention_are_purged_whatever_their_status(store: ReviewStore, clock: FakeClock):
    old_approved = store.create(new_case(1))
    store.decide(old_approved.case_id, Status.APPROVED, "alice")
    old_pending = store.create(new_case(2))
    clock.advance(days=3)
    young = store.create(new_case(3))
    clock.advance(days=4)  # the old ones are exactly at their deadline, young is 4 days old
    assert store.purge_expired(now=START + RETENTION - timedelta(microseconds=1)) == 0
    assert store.purge_expired() == 2
    assert store.get(old_approved.case_id) is None and store.get(old_pending.case_id) is None
    assert store.get(young.case_id) is not None and store.purge_expired() == 0
    assert store.purge_expired(now=young.retention_deadline + timedelta(seconds=1)) == 1
    assert store.list() == []


def test_concurrent_creates_from_eight_threads_all_land(store: ReviewStore):
    created: list[str] = []

    def work(offset: int) -> None:
        for index in range(5):
            created.append(store.create(new_case(offset * 10 + index)).case_id)

    assert together(8, work) == []
    assert sorted(s.case_id for s in store.list(limit=100)) == sorted(created) and len(created) == 40


def test_racing_reviewers_decide_a_case_once(store: ReviewStore):
    case = store.create(new_case())
    outcomes: list[str] = []

    def decide(n: int) -> None:
        try:
            store.decide(case.case_id, Status.APPROVED, f"reviewer-{n}")
            outcomes.append(f"reviewer-{n}")
        except CaseStateError:
            outcomes.append("refused")

    assert together(8, decide) == []
    winners = [outcome for outcome in outcomes if outcome != "refused"]
    assert len(outcomes) == 8 and len(winners) == 1
    assert store.get(case.case_id).reviewer == winners[0]


def test_a_repeated_idempotency_key_returns_the_stored_case(store: ReviewStore, clock: FakeClock):
    first = store.create(new_case(1, key="retry-me"))
    assert first.case_id == case_id_for_key("retry-me")
    assert len(first.case_id) == 32 and first.case_id == first.case_id.lower() and int(first.case_id, 16) >= 0
    clock.advance(minutes=3)
    # A retry of the same request: its PNG bytes may differ (another replica's compress level).
    again = store.create(new_case(2, key="retry-me", request_id="req-1"))
    assert again == first and again.created_at == START and again.image == png(1)
    assert store.counts()[Status.PENDING] == 1 and len(store.list()) == 1
    # Decided meanwhile: the repeat returns the case as it stands now, and does not reopen it.
    store.decide(first.case_id, Status.APPROVED, "alice")
    clock.advance(minutes=3)
    decided = store.create(new_case(1, key="retry-me"))
    assert (decided.case_id, decided.status, decided.reviewer, decided.created_at) == \
        (first.case_id, Status.APPROVED, "alice", START)
    assert store.counts() == {Status.PENDING: 0, Status.APPROVED: 1, Status.REJECTED: 0}


def test_other_keys_and_no_key_make_new_cases(store: ReviewStore):
    one, other = store.create(new_case(1, key="image-a")), store.create(new_case(1, key="image-b"))
    assert one.case_id != other.case_id
    plain = [store.create(new_case(1)), store.create(new_case(1))]  # no key: a random id each time
    assert len({one.case_id, other.case_id, *(case.case_id for case in plain)}) == 4
    assert store.counts()[Status.PENDING] == 4


def test_a_key_colliding_with_another_requests_case_is_refused(store: ReviewStore):
    mine = store.create(new_case(1, key="shared"))
    with pytest.raises(CaseIdCollision, match=mine.case_id) as refused:
        store.create(new_case(1, key="shared", request_id="someone-else"))
    assert isinstance(refused.value, ReviewStoreError)
    other_prompt = NewCase(request_id="req-1", model_id="tiny-sdxl", prompt_hash=hash_prompt("other", SALT),
                           decisions=DECISIONS, image=png(1), width=24, height=16, idempotency_key="shared")
    with pytest.raises(CaseIdCollision):
        store.create(other_prompt)
    assert store.get(mine.case_id) == mine and store.counts()[Status.PENDING] == 1


def test_a_purged_keyed_case_is_created_anew(store: ReviewStore, clock: FakeClock):
    first = store.create(new_case(1, key="late"))
    clock.advance(days=8)
    assert store.purge_expired() == 1
    # Nothing remembers a purged case: the same key opens it again, with a fresh deadline.
    again = store.create(new_case(1, key="late"))
    assert again.case_id == first.case_id and again.created_at == START + timedelta(days=8)
    assert store.get(again.case_id) == again and store.counts()[Status.PENDING] == 1


def test_eight_threads_creating_one_key_make_one_case(store: ReviewStore, clock: FakeClock):
    returned: list[ReviewCase] = []
    errors = together(8, lambda index: returned.append(
        store.create(new_case(index, key="racing", request_id="req-racing"))))
    assert errors == [] and len(returned) == 8
    [stored] = store.list()
    assert all(case == store.get(stored.case_id) for case in returned)  # all got the one winner's case
    assert store.counts()[Status.PENDING] == 1


class PurgedMidCreate(SqliteReviewStore):
    """Another replica purges the conflicting row between this create's INSERT and its SELECT."""

    def _insert(self, case: ReviewCase) -> bool:
        inserted = super()._insert(case)
        if not inserted and not getattr(self, "purged", False):
            self.purged = True
            self.purge_expired(now=case.created_at)
        return inserted


def test_a_row_purged_between_insert_and_select_is_inserted_again(tmp_path: Path):
    clock = FakeClock()
    with PurgedMidCreate(tmp_path / "review.db", RETENTION, clock) as store:
        store.create(new_case(1, key="gone"))
        clock.advance(days=8)
        again = store.create(new_case(1, key="gone"))
        assert store.purged and again.created_at == clock.now and store.get(again.case_id) == again


def test_reopening_keeps_the_cases_and_the_schema(store_url: str, clock: FakeClock):
    with open_review_store(store_url, retention=RETENTION, clock=clock) as first:
        case = first.create(new_case(7))
    with open_review_store(store_url, retention=RETENTION, clock=clock) as again:
        assert again.get(case.case_id) == case


def test_sqlite_is_in_wal_mode_in_a_created_folder(tmp_path: Path):
    path = tmp_path / "not" / "yet" / "review.db"
    with open_review_store(f"sqlite://{path}") as store:
        assert isinstance(store, SqliteReviewStore) and store.journal_mode() == "wal"
        store.create(new_case())
        # WAL is a property of the file: another connection sees it too.
        other = sqlite3.connect(path)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            other.close()


def database_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("review.db"))


def test_the_sqlite_file_never_holds_the_prompt(tmp_path: Path):
    with open_review_store(f"sqlite://{tmp_path / 'review.db'}") as store:
        for index in range(3):
            store.create(new_case(index))
        stored = database_bytes(tmp_path)  # the open database, WAL included
    assert hash_prompt(PROMPT, SALT).encode() in stored  # the search does find what was stored
    assert PROMPT.encode() not in stored and b"lighthouse" not in stored


def test_prompt_text_is_refused_as_a_hash(tmp_path: Path):
    with open_review_store(f"sqlite://{tmp_path / 'review.db'}") as store:
        mistaken = NewCase(request_id="r", model_id="m", prompt_hash=PROMPT, decisions=(), image=png(0),
                           width=24, height=16)
        with pytest.raises(ValueError, match="hash_prompt"):
            store.create(mistaken)
        with pytest.raises(ValueError, match="PNG"):
            store.create(NewCase("r", "m", hash_prompt(PROMPT), (), b"GIF89a", 24, 16))
    assert PROMPT.encode() not in database_bytes(tmp_path)


def test_purged_images_are_gone_from_the_sqlite_file(tmp_path: Path):
    clock = FakeClock()
    with open_review_store(f"sqlite://{tmp_path / 'review.db'}", retention=RETENTION, clock=clock) as store:
        store.create(new_case(42))
        clock.advance(days=3)
        store.create(new_case(43))
        purged, kept = png(42)[-200:-20], png(43)[-200:-20]  # compressed pixel data, unique to each image
        assert purged in database_bytes(tmp_path) and kept in database_bytes(tmp_path)
        clock.advance(days=5)
        assert store.purge_expired() == 1
        stored = database_bytes(tmp_path)
        assert purged not in stored and kept in stored  # neither left in a free page nor in the WAL


def test_prompt_hash_is_sha256_and_the_salt_unlinks_deployments():
    assert hash_prompt(PROMPT) == hashlib.sha256(PROMPT.encode()).hexdigest()
    salted = hash_prompt(PROMPT, b"deployment-a")
    assert salted == hash_prompt(PROMPT, b"deployment-a") != hash_prompt(PROMPT, b"deployment-b")
    assert salted != hash_prompt(PROMPT) and len(salted) == 64


def test_a_naive_clock_is_refused(tmp_path: Path):
    with open_review_store(f"sqlite://{tmp_path / 'review.db'}", clock=lambda: datetime(2026, 1, 1)) as store:
        with pytest.raises(ValueError, match="timezone-aware"):
            store.create(new_case())


def test_bad_urls_are_refused_without_their_password(tmp_path: Path):
    with pytest.raises(ValueError, match="scheme 'mysql'") as unsupported:
        open_review_store("mysql://admin:hunter2@db.internal/reviews")
    assert "hunter2" not in str(unsupported.value) and "admin:***@db.internal" in str(unsupported.value)
    with pytest.raises(ValueError, match="absolute"):
        open_review_store("sqlite://relative/review.db")
    assert redact_url("postgresql://u:hunter2@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert "hunter2" not in redact_url("postgresql://db/x?user=u&password=hunter2")
    assert redact_url("postgresql://u@db/x") == "postgresql://u@db/x"


def test_an_unreachable_postgres_is_reported_without_its_password():
    from diffmesh.mesh import free_port

    url = f"postgresql://reviewer:hunter2@127.0.0.1:{free_port()}/reviews"
    with pytest.raises(StoreUnavailable) as refused:
        open_review_store(url, connect_timeout_s=2)
    message = str(refused.value)
    assert "hunter2" not in message and "reviewer:***@127.0.0.1" in message
    assert refused.value.__cause__ is None  # psycopg's own error (and its conninfo) is not chained
