"""The human review queue's store: images the safety stage held for REVIEW, and what a reviewer decided.

`open_review_store(url)` picks the backend from the URL:
- `sqlite:///var/lib/diffmesh/review.db` (an absolute path; its folder is created): one file on a
  local volume, WAL journal mode so readers never wait for a writer, busy_timeout so replicas
  sharing the file queue instead of failing. WAL needs a local filesystem (not NFS/SMB).
- `postgresql://user:pass@host:port/db` (or `postgres://`): plain psycopg 3 with a small built-in
  pool (psycopg_pool is not a dependency).

Both create the same logical schema on open (idempotent, recorded in `review_schema_version`).
A case never holds prompt text: only `prompt_hash`, made by `hash_prompt`. Every case gets a
retention deadline at creation (`created_at + retention`); `purge_expired` deletes every case past
it, pending or decided, since keeping an image longer than promised is worse than losing a review.
SQLite zeroes deleted rows (secure_delete) and truncates the WAL after a purge so purged images are
gone from the file; PostgreSQL frees dead rows at its next (auto)vacuum.

Creating is idempotent when the caller names the case with `NewCase.idempotency_key`: the case id is
derived from the key (`case_id_for_key`), the insert is `ON CONFLICT (case_id) DO NOTHING`, and a
repeat returns the case already stored (a retried CheckImages gets the first reply's case back, not
a duplicate). The key is not stored: the id is all a repeat needs to find the case.

Plain Python and SQL: no gRPC here; the servicer maps these types to its messages.
"""
from __future__ import annotations

import abc
import enum
import hashlib
import hmac
import json
import re
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from services.safety.decisions import Decision, Outcome, Source

SCHEMA_VERSION = 1
MAX_LIST_LIMIT = 500
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PROMPT_HASH = re.compile(r"[0-9a-f]{64}")
# Domain separation: an id derived from a key can never equal another hash of the same key
# computed elsewhere in the mesh (the watermark payload, the prompt hash).
_CASE_ID_DOMAIN = b"diffmesh/review-case-id/v1\x00"
# An insert that conflicts and then finds no row lost a race with a purge; try again this often.
_CREATE_ATTEMPTS = 3

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def hash_prompt(text: str, salt: bytes = b"") -> str:
    """Hex SHA-256 of the prompt's UTF-8 bytes, exactly as given (no normalisation).

    With a salt it is HMAC-SHA256 keyed by the salt instead. Use a secret per-deployment salt: an
    unsalted hash of a short prompt can be confirmed by anyone who guesses the prompt, and the same
    prompt hashes alike in every deployment; a secret key makes hashes unguessable and unlinkable
    across deployments while one deployment can still match repeats of a prompt.
    """
    data = text.encode("utf-8")
    if salt:
        return hmac.new(salt, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


class Status(str, enum.Enum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"


class ReviewStoreError(Exception):
    """Base of the store's own errors."""


class CaseNotFound(ReviewStoreError, LookupError):
    def __init__(self, case_id: str):
        super().__init__(f"no review case {case_id!r}")
        self.case_id = case_id


class CaseStateError(ReviewStoreError):
    """A decision on a case that is no longer PENDING."""

    def __init__(self, case_id: str, status: Status):
        super().__init__(f"review case {case_id!r} is already {status.value}; only PENDING cases can be decided")
        self.case_id = case_id
        self.status = status


class CaseIdCollision(ReviewStoreError):
    """An idempotency key led to a case that belongs to another request: a key-building bug (or a
    hash collision). Refused rather than handing one request another request's case."""

    def __init__(self, case_id: str):
        super().__init__(f"review case {case_id!r} already exists for another request (different request_id, "
                         "model_id or prompt_hash): the idempotency key does not identify one request's image")
        self.case_id = case_id


class StoreUnavailable(ReviewStoreError, ConnectionError):
    """The database could not be reached (the message names the URL with its password redacted)."""


def decision_to_dict(decision: Decision) -> dict[str, Any]:
    return {"outcome": decision.outcome.name, "category": decision.category, "score": decision.score,
            "threshold": decision.threshold, "policy_version": decision.policy_version,
            "source": decision.source.value, "reason": decision.reason, "field": decision.field}


def decision_from_dict(data: Mapping[str, Any]) -> Decision:
    return Decision(outcome=Outcome[data["outcome"]], category=data["category"], score=float(data["score"]),
                    threshold=float(data["threshold"]), policy_version=data["policy_version"],
                    source=Source(data["source"]), reason=data.get("reason", ""), field=data.get("field", ""))


@dataclass(frozen=True)
class NewCase:
    """What the safety stage hands over when it holds an image for review."""

    request_id: str
    model_id: str
    prompt_hash: str                      # hash_prompt(prompt, salt): never the prompt itself
    decisions: Sequence[Decision]
    image: bytes = field(repr=False)      # PNG
    width: int
    height: int
    image_mime: str = "image/png"
    # Set: the case id is derived from it, and creating the same key again returns the stored case
    # (retries do not duplicate cases). Make it unguessable (keyed by a deployment secret), since
    # whoever knows a key knows its case id. "": a random id, every create is a new case.
    idempotency_key: str = ""


def case_id_for_key(idempotency_key: str) -> str:
    """The case id an idempotency key names: 32 lowercase hex characters, like uuid4().hex, so ids
    look the same either way (128 bits of SHA-256: collisions are not a practical concern)."""
    return hashlib.sha256(_CASE_ID_DOMAIN + idempotency_key.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class ReviewCaseSummary:
    """A case without its image: what a queue listing shows."""

    case_id: str
    status: Status
    created_at: datetime
    updated_at: datetime
    retention_deadline: datetime
    request_id: str
    model_id: str
    prompt_hash: str
    decisions: tuple[Decision, ...]
    image_mime: str
    width: int
    height: int
    reviewer: str                         # "" while PENDING
    review_note: str


@dataclass(frozen=True)
class ReviewCase(ReviewCaseSummary):
    image: bytes = field(kw_only=True, repr=False)


def redact_url(url: str) -> str:
    """The URL with any password (userinfo or `password=` query parameter) replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rpartition("@")[2]
            netloc = f"{user}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        # Unparseable: show only what precedes the netloc, never the rest.
        return url.split("//", 1)[0] + "//***"


def _as_utc(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {moment!r}")
    return moment.astimezone(timezone.utc)


class ReviewStore(abc.ABC):
    """Validation, ids, time and retention live here; backends only run SQL."""

    def __init__(self, retention: timedelta, clock: Clock):
        if retention <= timedelta(0):
            raise ValueError(f"retention must be positive, got {retention}")
        self.retention = retention
        self._clock = clock

    def _now(self) -> datetime:
        return _as_utc(self._clock(), "clock()")

    def create(self, case: NewCase) -> ReviewCase:
        """Store a new PENDING case, or with an idempotency key already stored, return that case as
        it is (its own created_at, status, decisions and image: the first create's, not this one's).

        Concurrent creates of one key (threads, replicas) make one row and all return it. A key whose
        case was purged after retention creates the case anew: nothing remembers a purged case (the key
        is not kept anywhere), and a retry that late is not a retry of a live request any more.
        """
        if not _PROMPT_HASH.fullmatch(case.prompt_hash):
            # Refuse anything but a hash so prompt text can never land in the store by mistake.
            raise ValueError("prompt_hash must be 64 lowercase hex characters (use hash_prompt)")
        if case.image_mime == "image/png" and not case.image.startswith(PNG_SIGNATURE):
            raise ValueError("image is not a PNG (no PNG signature) but image_mime says image/png")
        if case.width <= 0 or case.height <= 0:
            raise ValueError(f"image size must be positive, got {case.width}x{case.height}")
        now = self._now()
        case_id = case_id_for_key(case.idempotency_key) if case.idempotency_key else uuid.uuid4().hex
        stored = ReviewCase(
            case_id=case_id, status=Status.PENDING, created_at=now, updated_at=now,
            retention_deadline=now + self.retention, request_id=case.request_id, model_id=case.model_id,
            prompt_hash=case.prompt_hash, decisions=tuple(case.decisions), image_mime=case.image_mime,
            width=case.width, height=case.height, reviewer="", review_note="", image=bytes(case.image))
        for _ in range(_CREATE_ATTEMPTS):
            if self._insert(stored):
                return stored
            existing = self._select_case(case_id)
            if existing is not None:
                # Only what identifies the request is compared: the image bytes and decisions of a
                # genuine retry may differ (a replica with another PNG compress level or, mid-rollout,
                # another policy version), and the first stored case is the one reviewers see.
                if (existing.request_id, existing.model_id, existing.prompt_hash) != \
                        (stored.request_id, stored.model_id, stored.prompt_hash):
                    raise CaseIdCollision(case_id)
                return existing
            # The row that conflicted was purged before we could read it: insert again.
        raise ReviewStoreError(f"review case {case_id!r}: insert kept conflicting with a row that then vanished")

    def get(self, case_id: str) -> ReviewCase | None:
        return self._select_case(case_id)

    def list(self, status: Status | None = None, limit: int = 50, before: datetime | None = None,
             before_id: str | None = None) -> list[ReviewCaseSummary]:
        """Newest first. Page on with `before` = the last summary's created_at; pass its case_id as
        `before_id` too so cases sharing that timestamp are not skipped."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be in 1..{MAX_LIST_LIMIT}, got {limit}")
        if before_id is not None and before is None:
            raise ValueError("before_id needs before (the created_at of that case)")
        return self._select_summaries(None if status is None else Status(status), limit,
                                      None if before is None else _as_utc(before, "before"), before_id)

    def decide(self, case_id: str, status: Status, reviewer: str, note: str = "") -> ReviewCase:
        status = Status(status)
        if status is Status.PENDING:
            raise ValueError("a decision is APPROVED or REJECTED, not PENDING")
        if not reviewer.strip():
            raise ValueError("reviewer must name who decided")
        decided = self._update_pending(case_id, status, reviewer, note, self._now())
        if decided is not None:
            return decided
        # Nothing updated: tell an unknown id from a case already decided (or purged meanwhile).
        current = self._select_case(case_id)
        if current is None:
            raise CaseNotFound(case_id)
        raise CaseStateError(case_id, current.status)

    def purge_expired(self, now: datetime | None = None) -> int:
        """Delete every case whose retention deadline has been reached; returns how many."""
        return self._delete_expired(self._now() if now is None else _as_utc(now, "now"))

    def counts(self) -> dict[Status, int]:
        """Cases by status (every status, 0 where none): the queue's size for metrics."""
        found = self._count_by_status()
        return {status: int(found.get(status.value, 0)) for status in Status}

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the store is, for logs (the password redacted)."""

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _insert(self, case: ReviewCase) -> bool:
        """Insert unless a case with its id exists (ON CONFLICT DO NOTHING); True if inserted."""

    @abc.abstractmethod
    def _select_case(self, case_id: str) -> ReviewCase | None: ...

    @abc.abstractmethod
    def _select_summaries(self, status: Status | None, limit: int, before: datetime | None,
                          before_id: str | None) -> list[ReviewCaseSummary]: ...

    @abc.abstractmethod
    def _update_pending(self, case_id: str, status: Status, reviewer: str, note: str,
                        now: datetime) -> ReviewCase | None: ...

    @abc.abstractmethod
    def _delete_expired(self, now: datetime) -> int: ...

    @abc.abstractmethod
    def _count_by_status(self) -> dict[str, int]: ...


SUMMARY_COLUMNS = ("case_id, status, created_at, updated_at, retention_deadline, request_id, model_id, "
                   "prompt_hash, decisions, image_mime, width, height, reviewer, review_note")
CASE_COLUMNS = SUMMARY_COLUMNS + ", image"


def _summary_fields(row: Mapping[str, Any], to_datetime: Callable[[Any], datetime],
                    decisions: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(case_id=row["case_id"], status=Status(row["status"]), created_at=to_datetime(row["created_at"]),
                updated_at=to_datetime(row["updated_at"]),
                retention_deadline=to_datetime(row["retention_deadline"]), request_id=row["request_id"],
                model_id=row["model_id"], prompt_hash=row["prompt_hash"],
                decisions=tuple(decision_from_dict(item) for item in decisions), image_mime=row["image_mime"],
                width=row["width"], height=row["height"], reviewer=row["reviewer"],
                review_note=row["review_note"])


# ---------------------------------------------------------------- SQLite

# Times are integer microseconds since the epoch (UTC): exact, and they sort as numbers.
_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS review_cases (
    case_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('PENDING', 'APPROVED', 'REJECTED')),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    retention_deadline INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    prompt_hash TEXT NOT NULL CHECK (length(prompt_hash) = 64),
    decisions TEXT NOT NULL,
    image BLOB NOT NULL,
    image_mime TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    reviewer TEXT NOT NULL DEFAULT '',
    review_note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS review_cases_status_created ON review_cases (status, created_at DESC, case_id DESC);
CREATE INDEX IF NOT EXISTS review_cases_created ON review_cases (created_at DESC, case_id DESC);
CREATE INDEX IF NOT EXISTS review_cases_deadline ON review_cases (retention_deadline);
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _to_micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class SqliteReviewStore(ReviewStore):
    """One connection shared behind a lock: review traffic is light, and a single connection keeps
    every thread's writes ordered without SQLITE_BUSY between threads of one process."""

    def __init__(self, path: Path, retention: timedelta, clock: Clock, busy_timeout_ms: int = 5000):
        super().__init__(retention, clock)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit; multi-statement work opens its own transaction.
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise ReviewStoreError(f"{path}: SQLite refused WAL journal mode (got {mode!r}); "
                                       "use a local filesystem")
            self._conn.execute("PRAGMA secure_delete = ON")  # purged images are zeroed, not left in free pages
            self._create_schema()
        except BaseException:
            self._conn.close()
            raise

    def _create_schema(self) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")  # one opener at a time across processes
            try:
                for statement in _SQLITE_SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                rows = self._conn.execute("SELECT version FROM review_schema_version").fetchall()
                if not rows:
                    self._conn.execute("INSERT INTO review_schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                elif max(row[0] for row in rows) > SCHEMA_VERSION:
                    raise ReviewStoreError(f"{self.path}: schema version {max(row[0] for row in rows)} is newer "
                                           f"than this code's {SCHEMA_VERSION}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def journal_mode(self) -> str:
        with self._lock:
            return self._conn.execute("PRAGMA journal_mode").fetchone()[0]

    def describe(self) -> str:
        return f"sqlite://{self.path}"

    def _count_by_status(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM review_cases GROUP BY status").fetchall()
        return {row[0]: row[1] for row in rows}

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _row_to_case(self, row: sqlite3.Row) -> ReviewCase:
        return ReviewCase(**_summary_fields(row, _from_micros, json.loads(row["decisions"])), image=row["image"])

    def _insert(self, case: ReviewCase) -> bool:
        with self._lock:
            # rowcount is SQLite's changes(): 0 when DO NOTHING skipped the row.
            return self._conn.execute(
                f"INSERT INTO review_cases ({CASE_COLUMNS}) VALUES ({', '.join('?' * 15)}) "
                "ON CONFLICT (case_id) DO NOTHING",
                (case.case_id, case.status.value, _to_micros(case.created_at), _to_micros(case.updated_at),
                 _to_micros(case.retention_deadline), case.request_id, case.model_id, case.prompt_hash,
                 json.dumps([decision_to_dict(d) for d in case.decisions]), case.image_mime, case.width,
                 case.height, case.reviewer, case.review_note, sqlite3.Binary(case.image))).rowcount == 1

    def _select_case(self, case_id: str) -> ReviewCase | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {CASE_COLUMNS} FROM review_cases WHERE case_id = ?",
                                     (case_id,)).fetchone()
        return None if row is None else self._row_to_case(row)

    def _select_summaries(self, status: Status | None, limit: int, before: datetime | None,
                          before_id: str | None) -> list[ReviewCaseSummary]:
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        if before is not None and before_id is not None:
            where.append("(created_at < ? OR (created_at = ? AND case_id < ?))")
            params += [_to_micros(before), _to_micros(before), before_id]
        elif before is not None:
            where.append("created_at < ?")
            params.append(_to_micros(before))
        sql = (f"SELECT {SUMMARY_COLUMNS} FROM review_cases {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY created_at DESC, case_id DESC LIMIT ?")
        with self._lock:
            rows = self._conn.execute(sql, (*params, limit)).fetchall()
        return [ReviewCaseSummary(**_summary_fields(row, _from_micros, json.loads(row["decisions"]))) for row in rows]

    def _update_pending(self, case_id: str, status: Status, reviewer: str, note: str,
                        now: datetime) -> ReviewCase | None:
        # The WHERE on status makes check-and-set one atomic statement, also across processes.
        with self._lock:
            row = self._conn.execute(
                "UPDATE review_cases SET status = ?, reviewer = ?, review_note = ?, updated_at = ? "
                f"WHERE case_id = ? AND status = 'PENDING' RETURNING {CASE_COLUMNS}",
                (status.value, reviewer, note, _to_micros(now), case_id)).fetchone()
        return None if row is None else self._row_to_case(row)

    def _delete_expired(self, now: datetime) -> int:
        with self._lock:
            count = self._conn.execute("DELETE FROM review_cases WHERE retention_deadline <= ?",
                                       (_to_micros(now),)).rowcount
            if count:
                # Old page images stay in the WAL until a checkpoint: truncate it so they are gone.
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return count


# ---------------------------------------------------------------- PostgreSQL

_POSTGRES_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS review_schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS review_cases (
    case_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('PENDING', 'APPROVED', 'REJECTED')),
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    retention_deadline TIMESTAMPTZ NOT NULL,
    request_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    prompt_hash TEXT NOT NULL CHECK (length(prompt_hash) = 64),
    decisions JSONB NOT NULL,
    image BYTEA NOT NULL,
    image_mime TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    reviewer TEXT NOT NULL DEFAULT '',
    review_note TEXT NOT NULL DEFAULT ''
)""",
    "CREATE INDEX IF NOT EXISTS review_cases_status_created ON review_cases (status, created_at DESC, case_id DESC)",
    "CREATE INDEX IF NOT EXISTS review_cases_created ON review_cases (created_at DESC, case_id DESC)",
    "CREATE INDEX IF NOT EXISTS review_cases_deadline ON review_cases (retention_deadline)",
)
# Any constant works: replicas opening at once serialise their CREATE IF NOT EXISTS on it
# (concurrent CREATE TABLE IF NOT EXISTS can otherwise fail on a catalog unique index).
_SCHEMA_LOCK_KEY = 0x6469666D65736801


class _ConnectionPool:
    """At most `size` open connections, reused newest first; broken ones are dropped, not returned."""

    def __init__(self, url: str, size: int, connect_timeout_s: int, wait_s: float):
        import psycopg  # only the PostgreSQL backend needs it

        self._psycopg = psycopg
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._wait_s = wait_s
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> Any:
        from psycopg.rows import dict_row

        try:
            return self._psycopg.connect(self._url, autocommit=True, row_factory=dict_row,
                                         connect_timeout=self._connect_timeout_s)
        except self._psycopg.Error as exc:
            message = str(exc)
            password = urlsplit(self._url).password
            if password:
                message = message.replace(password, "***")
            raise StoreUnavailable(f"cannot connect to review store {redact_url(self._url)}: {message}") from None

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        if not self._slots.acquire(timeout=self._wait_s):
            raise StoreUnavailable(f"no review store connection free within {self._wait_s} s")
        conn = None
        try:
            with self._lock:
                if self._closed:
                    raise ReviewStoreError("review store is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._connect()
            with conn.transaction():
                yield conn
        finally:
            if conn is not None:
                with self._lock:
                    keep = not (self._closed or conn.closed or conn.broken)
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    conn.close()
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresReviewStore(ReviewStore):
    def __init__(self, url: str, retention: timedelta, clock: Clock, pool_size: int = 4,
                 connect_timeout_s: int = 10, pool_wait_s: float = 30.0):
        super().__init__(retention, clock)
        from psycopg.types.json import Jsonb

        self._jsonb = Jsonb
        self.url = redact_url(url)
        self._pool = _ConnectionPool(url, pool_size, connect_timeout_s, pool_wait_s)
        try:
            self._create_schema()
        except BaseException:
            self._pool.close()
            raise

    def _create_schema(self) -> None:
        with self._pool.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            for statement in _POSTGRES_SCHEMA:
                conn.execute(statement)
            version = conn.execute("SELECT max(version) AS version FROM review_schema_version").fetchone()["version"]
            if version is None:
                conn.execute("INSERT INTO review_schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise ReviewStoreError(f"{self.url}: schema version {version} is newer than this code's "
                                       f"{SCHEMA_VERSION}")

    def close(self) -> None:
        self._pool.close()

    def describe(self) -> str:
        return self.url  # redacted at construction

    def _count_by_status(self) -> dict[str, int]:
        with self._pool.transaction() as conn:
            rows = conn.execute("SELECT status, COUNT(*) AS n FROM review_cases GROUP BY status").fetchall()
        return {row["status"]: row["n"] for row in rows}

    @staticmethod
    def _to_datetime(value: datetime) -> datetime:
        return value.astimezone(timezone.utc)  # psycopg answers in the session's TimeZone

    def _row_to_case(self, row: Mapping[str, Any]) -> ReviewCase:
        return ReviewCase(**_summary_fields(row, self._to_datetime, row["decisions"]), image=bytes(row["image"]))

    def _insert(self, case: ReviewCase) -> bool:
        # A concurrent insert of the same id makes this one wait for it to commit, then do nothing;
        # the caller's SELECT is a new statement (READ COMMITTED), so it sees the winner's row.
        with self._pool.transaction() as conn:
            return conn.execute(
                f"INSERT INTO review_cases ({CASE_COLUMNS}) VALUES ({', '.join(['%s'] * 15)}) "
                "ON CONFLICT (case_id) DO NOTHING",
                (case.case_id, case.status.value, case.created_at, case.updated_at, case.retention_deadline,
                 case.request_id, case.model_id, case.prompt_hash,
                 self._jsonb([decision_to_dict(d) for d in case.decisions]), case.image_mime, case.width,
                 case.height, case.reviewer, case.review_note, case.image)).rowcount == 1

    def _select_case(self, case_id: str) -> ReviewCase | None:
        with self._pool.transaction() as conn:
            row = conn.execute(f"SELECT {CASE_COLUMNS} FROM review_cases WHERE case_id = %s", (case_id,)).fetchone()
        return None if row is None else self._row_to_case(row)

    def _select_summaries(self, status: Status | None, limit: int, before: datetime | None,
                          before_id: str | None) -> list[ReviewCaseSummary]:
        where, params = [], []
        if status is not None:
            where.append("status = %s")
            params.append(status.value)
        if before is not None and before_id is not None:
            where.append("(created_at, case_id) < (%s, %s)")
            params += [before, before_id]
        elif before is not None:
            where.append("created_at < %s")
            params.append(before)
        sql = (f"SELECT {SUMMARY_COLUMNS} FROM review_cases {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY created_at DESC, case_id DESC LIMIT %s")
        with self._pool.transaction() as conn:
            rows = conn.execute(sql, (*params, limit)).fetchall()
        return [ReviewCaseSummary(**_summary_fields(row, self._to_datetime, row["decisions"])) for row in rows]

    def _update_pending(self, case_id: str, status: Status, reviewer: str, note: str,
                        now: datetime) -> ReviewCase | None:
        with self._pool.transaction() as conn:
            row = conn.execute(
                "UPDATE review_cases SET status = %s, reviewer = %s, review_note = %s, updated_at = %s "
                f"WHERE case_id = %s AND status = 'PENDING' RETURNING {CASE_COLUMNS}",
                (status.value, reviewer, note, now, case_id)).fetchone()
        return None if row is None else self._row_to_case(row)

    def _delete_expired(self, now: datetime) -> int:
        with self._pool.transaction() as conn:
            return conn.execute("DELETE FROM review_cases WHERE retention_deadline <= %s", (now,)).rowcount


def _sqlite_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/") or parts.query:
        raise ValueError(f"a SQLite review store URL is sqlite:///absolute/path.db, got {redact_url(url)}")
    return Path(unquote(parts.path))


def open_review_store(url: str, retention: timedelta = timedelta(days=30), clock: Clock = utc_now,
                      **backend_options: Any) -> ReviewStore:
    """The store `url` names, its schema created if missing. `backend_options` go to the backend
    (SQLite: busy_timeout_ms; PostgreSQL: pool_size, connect_timeout_s, pool_wait_s)."""
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "sqlite":
        return SqliteReviewStore(_sqlite_path(url), retention, clock, **backend_options)
    if scheme in ("postgresql", "postgres"):
        return PostgresReviewStore(url, retention, clock, **backend_options)
    raise ValueError(f"unsupported review store URL scheme {scheme!r} in {redact_url(url)}: "
                     "use sqlite:///path/to/file.db or postgresql://user:pass@host:port/db")
