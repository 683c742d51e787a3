"""Batching shared by stages that run several callers' work in one model call.

Pure Python (threads, no torch). A stage that batches still reports each caller's own
StageUsage: the time of a shared call is split by how much of the batch each caller's work was
(`apportion`), and work that cannot share a call is kept apart by a compatibility key
(`group_indices`, and a StepBatcher's bucket keys).
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from diffmesh.runtime.admission import PRIORITIES


def apportion(total: float, sizes: Sequence[int]) -> list[float]:
    """`total` (e.g. compute milliseconds of one batched call) split in proportion to `sizes`
    (e.g. each caller's image count). The shares add up to `total` up to float rounding: the
    last share takes the remainder, so no rounding error accumulates across callers.

    ValueError for an empty `sizes`, a negative size, all sizes zero, or a negative or
    non-finite total: a share of nothing, or of a measurement that went wrong, is a bug upstream.
    """
    if not sizes:
        raise ValueError("apportion needs at least one size")
    if any(size < 0 for size in sizes):
        raise ValueError(f"sizes must be >= 0, got {list(sizes)}")
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"total must be finite and >= 0, got {total}")
    whole = sum(sizes)
    if whole == 0:
        raise ValueError("sizes must not all be zero")
    shares = [total * size / whole for size in sizes[:-1]]
    shares.append(max(total - math.fsum(shares), 0.0))
    return shares


def group_indices(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices of `keys` grouped by equal key: groups in order of first appearance, indices
    ascending within each (so results can be written back in the callers' order)."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


# --- continuous, step-level batching ------------------------------------------------------------
#
# A StepBatcher owns one model. Every request runs its own loop in its own thread and hands the
# batcher one model evaluation at a time (`Member.evaluate`); evaluations with the same bucket key
# (rows that can be stacked: same latent size, text length, adapters) are stacked into one model
# call. A request that joins while others are mid-loop is in the next call; one that leaves is
# not waited for. There is no batcher thread: whichever waiting request finds a call ready runs it
# (the "leader"), so a lone request pays no hand-off between threads.

PRIORITY_CLASSES = PRIORITIES  # best first


@dataclass(frozen=True)
class BatchPolicy:
    """How a StepBatcher forms calls.

    max_rows: the most rows in one call (CFG's negative rows count); one evaluation bigger than
      that still runs, alone. max_wait_ms: the longest an evaluation waits for the other requests
      of its bucket to hand theirs in (0: never wait; a call runs as soon as every request of the
      bucket is waiting, or the rows are full, whichever is first, so a lone request never waits).
    max_skips: anti-starvation: an evaluation left out of this many calls (the rows were full of
      better-ranked work) ranks first from then on, whatever its priority class.
    """

    enabled: bool = True
    max_rows: int = 16
    max_wait_ms: float = 2.0
    max_skips: int = 4

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")
        if not math.isfinite(self.max_wait_ms) or self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be finite and >= 0, got {self.max_wait_ms}")
        if self.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {self.max_skips}")


@dataclass
class SharedCalls:
    """What one request's evaluations cost inside a StepBatcher.

    device_ms charges the request its share of every call it was in: the call's time x the
    request's rows / the call's rows (apportion). blocked_ms is the whole time its thread spent
    inside `evaluate` (waiting for company, for other calls, and the full shared calls), so
    `wall - blocked_ms + device_ms` is the request's honest device time. wait_ms is the part of
    blocked_ms spent before its calls started (waiting to join)."""

    calls: int = 0
    device_ms: float = 0.0
    blocked_ms: float = 0.0
    wait_ms: float = 0.0
    rows: list[int] = field(default_factory=list)  # rows of each call it was in
    requests: list[int] = field(default_factory=list)  # requests in each call it was in

    def add(self, other: "SharedCalls") -> None:
        self.calls += other.calls
        self.device_ms += other.device_ms
        self.blocked_ms += other.blocked_ms
        self.wait_ms += other.wait_ms
        self.rows.extend(other.rows)
        self.requests.extend(other.requests)


class _AllCancelled:
    """Set once every one of the events is: a shared call is given up only when nobody wants it."""

    def __init__(self, events: Sequence[threading.Event]) -> None:
        self._events = events

    def is_set(self) -> bool:
        return all(event.is_set() for event in self._events)


@dataclass(eq=False)
class _Entry:
    member: "Member"
    item: Any
    rows: int
    cancel: threading.Event | None
    submitted: float
    skipped: int = 0
    taken: bool = False
    done: bool = False
    result: Any = None
    error: BaseException | None = None


# run(key, items, cancel) -> one output per item, in order. `cancel.is_set()` is true once every
# item's caller has cancelled (run may stop a wait on it); None when some caller cannot cancel.
RunCall = Callable[[Hashable, list[Any], "threading.Event | None"], list[Any]]
OnCancel = Callable[[], BaseException]
# on_call(rows, requests, max_rows, waits_s): a call ran (metrics).
OnCall = Callable[[int, int, int, list[float]], None]


class Member:
    """One request's place in a StepBatcher for one bucket: `evaluate` once per model call of its
    loop, then `leave` (or use it as a context manager). Not shared between threads."""

    def __init__(self, batcher: "StepBatcher", key: Hashable, priority: str, stats: SharedCalls) -> None:
        self._batcher = batcher
        self.key = key
        self.rank = PRIORITY_CLASSES.index(priority)
        self.stats = stats
        self._left = False

    def __enter__(self) -> "Member":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.leave()

    def leave(self) -> None:
        if not self._left:
            self._left = True
            self._batcher._leave(self)

    def evaluate(self, item: Any, rows: int, cancel: threading.Event | None = None,
                 on_cancel: OnCancel | None = None) -> Any:
        """The model's output for `item` (`rows` rows), computed in a call shared with other
        requests of this bucket when batching is on. A set `cancel` raises on_cancel() (or
        RuntimeError) while the item still waits; once its call runs, the call finishes first."""
        if self._left:
            raise RuntimeError("evaluate after leave")
        return self._batcher._evaluate(self, item, rows, cancel, on_cancel)


class StepBatcher:
    """Continuous batching of one model's evaluations across requests (see the section comment).

    Ordering: when an engine holds more rows than a call takes, evaluations go in by priority
    class (interactive before batch), then by the time they were handed in; one left out of
    `max_skips` calls goes first from then on. Calls run one at a time (a model runs one call
    at a time well; two would split the device). A call that raises is retried once per item
    alone, so only the items that fail on their own get the error."""

    CANCEL_POLL_S = 0.05

    def __init__(self, run: RunCall, policy: BatchPolicy = BatchPolicy(), on_call: OnCall | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.policy = policy
        self._run = run
        self._on_call = on_call
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: list[_Entry] = []
        self._members: Counter[tuple[Hashable, int]] = Counter()  # (bucket, priority rank) -> requests
        self._busy = False
        # When the last call ended: the wait for company counts from here, not from when a step was
        # handed in. Steps that queued behind a running call would otherwise run as soon as it ends,
        # without the requests that were in it, and the two halves would alternate for good.
        self._idle_since = clock()
        self.calls = 0  # calls run (tests and metrics)

    @property
    def members(self) -> int:
        """Requests inside the batcher right now."""
        with self._cond:
            return sum(self._members.values())

    def join(self, key: Hashable, priority: str = "interactive", stats: SharedCalls | None = None) -> Member:
        """A request's place for one bucket. ValueError for an unknown priority class."""
        if priority not in PRIORITY_CLASSES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITY_CLASSES)}, got {priority!r}")
        member = Member(self, key, priority, stats if stats is not None else SharedCalls())
        with self._cond:
            self._members[key, member.rank] += 1
        return member

    def _leave(self, member: Member) -> None:
        with self._cond:
            self._members[member.key, member.rank] -= 1
            if self._members[member.key, member.rank] <= 0:
                del self._members[member.key, member.rank]
            self._cond.notify_all()  # the others of its bucket may be all waiting now

    # --- one evaluation -----------------------------------------------------------------------
    def _evaluate(self, member: Member, item: Any, rows: int, cancel: threading.Event | None,
                  on_cancel: OnCancel | None) -> Any:
        if not self.policy.enabled:
            return self._alone(member, item, rows, cancel)
        entry = _Entry(member, item, rows, cancel, self._clock())
        with self._cond:
            self._pending.append(entry)
            self._cond.notify_all()
            while not entry.done:
                if not entry.taken and cancel is not None and cancel.is_set():
                    self._pending.remove(entry)
                    self._cond.notify_all()
                    raise on_cancel() if on_cancel is not None else RuntimeError("cancelled")
                if not self._busy:
                    chosen = self._choose(self._clock())
                    if chosen is not None:
                        self._lead(*chosen)
                        continue
                self._cond.wait(self._wait_s(cancel))
        member.stats.blocked_ms += (self._clock() - entry.submitted) * 1000.0
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _alone(self, member: Member, item: Any, rows: int, cancel: threading.Event | None) -> Any:
        start = self._clock()
        try:
            [output] = self._run(member.key, [item], cancel)
        finally:
            elapsed_ms = (self._clock() - start) * 1000.0
            stats = member.stats
            stats.calls += 1
            stats.device_ms += elapsed_ms
            stats.blocked_ms += elapsed_ms
            stats.rows.append(rows)
            stats.requests.append(1)
        if self._on_call is not None:
            self._on_call(rows, 1, self.policy.max_rows, [0.0])
        return output

    def _wait_s(self, cancel: threading.Event | None) -> float | None:
        """How long to sleep before looking again: until the oldest pending item has waited its
        max_wait (a notify comes sooner when anything changes), polling for a cancel."""
        timeout = None
        if not self._busy and self._pending:
            oldest = max(min(entry.submitted for entry in self._pending), self._idle_since)
            timeout = max(oldest + self.policy.max_wait_ms / 1000.0 - self._clock(), 0.0) + 1e-4
        if cancel is not None:
            timeout = self.CANCEL_POLL_S if timeout is None else min(timeout, self.CANCEL_POLL_S)
        return timeout

    def _order(self, entry: _Entry) -> tuple[int, float]:
        rank = -1 if entry.skipped >= self.policy.max_skips else entry.member.rank
        return rank, entry.submitted

    def _select(self, entries: list[_Entry]) -> list[_Entry]:
        """The entries one call takes from a bucket: best order first, while the rows fit."""
        chosen, rows = [], 0
        for entry in sorted(entries, key=self._order):
            if not chosen or rows + entry.rows <= self.policy.max_rows:
                chosen.append(entry)
                rows += entry.rows
        return chosen

    def _ready(self, key: Hashable, entries: list[_Entry], chosen: list[_Entry], now: float) -> bool:
        """Whether a bucket's call should run now: every request in it has handed in its step;
        or its oldest step has waited max_wait_ms (counted while no call ran); or its rows are
        full and no request of a
        better class than those chosen is still to hand in (it would take a seat)."""
        waiting_since = max(min(entry.submitted for entry in entries), self._idle_since)
        if (now - waiting_since) * 1000.0 >= self.policy.max_wait_ms:
            return True
        handed_in = Counter(entry.member.rank for entry in entries)
        missing = [rank for (bucket, rank), count in self._members.items() if bucket == key and count > handed_in[rank]]
        if not missing:
            return True
        if sum(entry.rows for entry in entries) < self.policy.max_rows:
            return False
        return min(missing) >= max(self._order(entry)[0] for entry in chosen)

    def _choose(self, now: float) -> tuple[Hashable, list[_Entry]] | None:
        """The next call, or None while every bucket still waits for company (`_ready`); among
        ready buckets, the one holding the best-ordered step."""
        buckets: dict[Hashable, list[_Entry]] = {}
        for entry in self._pending:
            buckets.setdefault(entry.member.key, []).append(entry)
        ready = []
        for key, entries in buckets.items():
            chosen = self._select(entries)
            if self._ready(key, entries, chosen, now):
                ready.append((min(self._order(entry) for entry in entries), key, chosen))
        if not ready:
            return None
        _, key, chosen = min(ready, key=lambda candidate: candidate[0])
        for entry in self._pending:
            if entry not in chosen:
                entry.skipped += 1
        return key, chosen

    def _lead(self, key: Hashable, chosen: list[_Entry]) -> None:
        """Runs one call for `chosen` (the lock is held on entry and exit, released meanwhile)."""
        self._busy = True
        for entry in chosen:
            entry.taken = True
            self._pending.remove(entry)
        start = self._clock()
        self._cond.release()
        try:
            self._call(key, chosen, start)
        finally:
            self._cond.acquire()
            self._busy = False
            self._idle_since = self._clock()
            self.calls += 1
            for entry in chosen:
                entry.done = True
            self._cond.notify_all()

    def _call(self, key: Hashable, chosen: list[_Entry], start: float) -> None:
        items = [entry.item for entry in chosen]
        events = [entry.cancel for entry in chosen]
        cancel = None if any(event is None for event in events) else _AllCancelled(events)  # type: ignore[arg-type]
        try:
            outputs = self._run(key, items, cancel)  # type: ignore[arg-type]
            if len(outputs) != len(items):
                raise RuntimeError(f"a batched call returned {len(outputs)} outputs for {len(items)} items")
            for entry, output in zip(chosen, outputs):
                entry.result = output
        except Exception as exc:  # noqa: BLE001 - an item's error goes to its own request
            if len(chosen) == 1:
                chosen[0].error = exc
            else:
                for entry in chosen:  # who broke the call? each alone: only they fail
                    try:
                        [entry.result] = self._run(key, [entry.item], entry.cancel)
                    except Exception as alone:  # noqa: BLE001
                        entry.error = alone
        elapsed_ms = (self._clock() - start) * 1000.0
        rows = [entry.rows for entry in chosen]
        total = sum(rows)
        for entry, share in zip(chosen, apportion(elapsed_ms, rows)):
            stats = entry.member.stats
            stats.calls += 1
            stats.device_ms += share
            stats.wait_ms += (start - entry.submitted) * 1000.0
            stats.rows.append(total)
            stats.requests.append(len(chosen))
        if self._on_call is not None:
            self._on_call(total, len(chosen), self.policy.max_rows, [start - entry.submitted for entry in chosen])
