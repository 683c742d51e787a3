"""Caller admission primitives: a token bucket, a per-caller concurrency quota and a bounded
priority gate. Pure Python and asyncio (no grpc), with an injected clock, so that every rule is
tested without a server and without sleeping.

The gate (`PriorityGate`) bounds how many requests run at once (capacity) and how many may wait
for a slot (max_waiting; beyond it ResourceExhausted with a retry hint). Waiters are served by
priority class, then in arrival order, with one anti-starvation rule:

    Two classes, "interactive" and "batch". When a slot frees, the oldest interactive waiter gets
    it, except that after `batch_every` interactive grants in a row made while a batch request was
    waiting, the oldest batch waiter gets the next one. So an interactive request overtakes every
    waiting batch request (it is served next, or after at most one batch grant when batch is
    due), and while both classes wait batch still gets at least one grant in batch_every + 1.

The rule counts grants, not time: it holds whatever the requests' durations, and a test can
replay it exactly. `Ticket.position` is a waiter's place under that rule (1: served next if
nobody else arrives); `Ticket.positions()` yields it each time it changes, for GenerateStream's
queue-position events.
"""
from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from diffmesh import errors

Clock = Callable[[], float]  # seconds, monotonic

INTERACTIVE = "interactive"
BATCH = "batch"
PRIORITIES = (INTERACTIVE, BATCH)


def seconds_to_ms(seconds: float) -> int:
    """A retry hint in whole milliseconds, rounded up (never 0 for a wait that is not over)."""
    return max(int(math.ceil(seconds * 1000.0 - 1e-6)), 0)


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; starts full. `take` spends one token or
    says how long until one is there. Thread-unsafe: one event loop owns it."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got rate {rate}, burst {burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def take(self, tokens: float = 1.0) -> float:
        """0.0 when the tokens were taken; otherwise the seconds until they will be there (nothing
        is taken)."""
        self._refill()
        if self._tokens >= tokens:
            self._tokens -= tokens
            return 0.0
        return (tokens - self._tokens) / self.rate

    def reconfigure(self, rate: float, burst: float) -> None:
        """New limits (a reloaded callers file) keep the tokens saved up, clamped to the new burst."""
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got rate {rate}, burst {burst}")
        self._refill()
        self.rate, self.burst = float(rate), float(burst)
        self._tokens = min(self._tokens, self.burst)


class ConcurrencyQuota:
    """Requests each caller has inside the gate at once (waiting or running). `acquire` counts one
    or says no; `release` gives it back."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def held(self, caller: str) -> int:
        return self._held.get(caller, 0)

    def acquire(self, caller: str, limit: int | None) -> bool:
        count = self._held.get(caller, 0)
        if limit is not None and count >= limit:
            return False
        self._held[caller] = count + 1
        return True

    def release(self, caller: str) -> None:
        count = self._held.get(caller, 0) - 1
        if count > 0:
            self._held[caller] = count
        else:
            self._held.pop(caller, None)


@dataclass(frozen=True)
class Position:
    """A waiter's place: position 1 is served next; waiting counts every waiter."""

    position: int
    waiting: int
    priority: str


class Ticket:
    """One request's place at the gate: waiting until `wait()` returns, then holding a slot
    until `release()`. Made by PriorityGate.enter."""

    def __init__(self, gate: "PriorityGate", priority: str, caller: str, number: int, entered: float) -> None:
        self.gate = gate
        self.priority = priority
        self.caller = caller
        self.number = number          # arrival order
        self.entered = entered        # the gate's clock at arrival
        self.granted = False
        self.released = False
        self.had_to_wait = False      # False: a slot was free at arrival
        self.waited_s = 0.0           # the gate's clock from arrival to grant
        self.position = 0             # 0 once granted
        self.waiting = 0
        self._granted: asyncio.Future[None] | None = None
        self._changed = asyncio.Event()
        self._start = 0.0

    def snapshot(self) -> Position:
        return Position(self.position, self.waiting, self.priority)

    async def wait(self) -> None:
        """Returns once the ticket holds a slot. Cancelled while waiting, it leaves the queue."""
        if self.granted:
            return
        assert self._granted is not None
        try:
            await asyncio.shield(self._granted)
        except asyncio.CancelledError:
            if not self.granted:
                self.gate._leave(self)
            raise

    async def positions(self) -> AsyncIterator[Position]:
        """The ticket's place each time its position changes, the current one first, until it is
        granted (nothing at all when a slot was free at once)."""
        last: Position | None = None
        while not self.granted and not self.released:
            current = self.snapshot()
            if last is None or current.position != last.position:
                last = current
                yield current
                continue
            self._changed.clear()
            assert self._granted is not None
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({changed, self._granted}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                if not self.granted:
                    self.gate._leave(self)
                raise
            finally:
                changed.cancel()

    def release(self) -> None:
        """Gives the slot back (or leaves the queue); idempotent."""
        if self.released:
            return
        self.released = True
        if self.granted:
            self.gate._free(self)
        else:
            self.gate._leave(self)

    def _grant(self, now: float) -> None:
        self.granted = True
        self.position = 0
        self.waited_s = max(now - self.entered, 0.0)
        self._start = now
        if self._granted is not None and not self._granted.done():
            self._granted.set_result(None)
        self._changed.set()

    def _move(self, position: int, waiting: int) -> None:
        """Only a new position wakes positions(): the total alone changes with every arrival."""
        moved = position != self.position
        self.position, self.waiting = position, waiting
        if moved:
            self._changed.set()


class PriorityGate:
    """At most `capacity` tickets hold a slot; at most `max_waiting` wait for one (by priority
    class, see the module docstring); one more is refused with ResourceExhausted carrying a retry
    hint. Hooks (all optional) let the caller record metrics without this module knowing them:
    on_depth(waiting by class), on_grant(priority, waited seconds)."""

    _gates: "weakref.WeakSet[PriorityGate]" = weakref.WeakSet()

    def __init__(self, name: str, capacity: int, max_waiting: int, *, batch_every: int = 4,
                 clock: Clock = time.monotonic, min_retry_s: float = 0.05, max_retry_s: float = 30.0,
                 on_depth: Callable[[dict[str, int]], None] | None = None,
                 on_grant: Callable[[str, float], None] | None = None) -> None:
        if capacity < 1 or max_waiting < 0 or batch_every < 1:
            raise ValueError(f"{name}: capacity >= 1, max_waiting >= 0 and batch_every >= 1, got "
                             f"{capacity}, {max_waiting}, {batch_every}")
        self.name = name
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.batch_every = batch_every
        self._clock = clock
        self._min_retry_s, self._max_retry_s = min_retry_s, max_retry_s
        self._on_depth, self._on_grant = on_depth, on_grant
        self._queues: dict[str, deque[Ticket]] = {priority: deque() for priority in PRIORITIES}
        self._running = 0
        self._overtaken = 0           # interactive grants in a row while batch waited
        self._numbers = 0
        self._hold_s: float | None = None  # moving average of how long a slot is held
        self._shed: Callable[[], Exception] | None = None  # set by shed(): refuse with this error
        PriorityGate._gates.add(self)

    # -- reading ----------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def depth(self) -> dict[str, int]:
        return {priority: len(queue) for priority, queue in self._queues.items()}

    def order(self) -> list[Ticket]:
        """The waiters in the order they would be granted if nobody else arrived."""
        interactive, batch = list(self._queues[INTERACTIVE]), list(self._queues[BATCH])
        overtaken, order, i, b = self._overtaken, [], 0, 0
        while i < len(interactive) or b < len(batch):
            if b < len(batch) and (i >= len(interactive) or overtaken >= self.batch_every):
                order.append(batch[b])
                b += 1
                overtaken = 0
            else:
                order.append(interactive[i])
                i += 1
                overtaken = overtaken + 1 if b < len(batch) else 0
        return order

    def retry_after_s(self) -> float:
        """How long a refused request should wait: the time for the queue ahead of it to drain at
        the observed slot hold time, bounded to [min_retry_s, max_retry_s] (1 s before any
        request finished)."""
        if self._hold_s is None:
            estimate = 1.0
        else:
            estimate = self._hold_s * (self.waiting + 1) / self.capacity
        return min(max(estimate, self._min_retry_s), self._max_retry_s)

    # -- entering ---------------------------------------------------------------------------
    def enter(self, priority: str, caller: str = "") -> Ticket:
        """A ticket that holds a slot at once when one is free (and nobody waits), or waits in
        the queue; ResourceExhausted (mentioning max_queue, with a retry hint) when the queue is
        full."""
        if priority not in self._queues:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        if self._shed is not None:
            raise self._shed()
        now = self._clock()
        self._numbers += 1
        ticket = Ticket(self, priority, caller, self._numbers, now)
        if self._running < self.capacity and not self.waiting:
            self._running += 1
            ticket._grant(now)
            if self._on_grant is not None:
                self._on_grant(priority, 0.0)
            return ticket
        if self.waiting >= self.max_waiting:
            retry_s = self.retry_after_s()
            raise errors.ResourceExhausted(
                f"{self.name} at capacity: {self.waiting} requests already queued (max_queue {self.max_waiting}); "
                f"retry in {seconds_to_ms(retry_s)} ms", retry_after_ms=seconds_to_ms(retry_s))
        ticket._granted = asyncio.get_running_loop().create_future()
        ticket.had_to_wait = True
        self._queues[priority].append(ticket)
        self._changed()
        return ticket

    @asynccontextmanager
    async def slot(self, priority: str = INTERACTIVE, caller: str = "") -> AsyncIterator[Ticket]:
        """Waits for a slot and holds it for the block."""
        ticket = self.enter(priority, caller)
        try:
            await ticket.wait()
            yield ticket
        finally:
            ticket.release()

    @classmethod
    def shed_all(cls, error: Callable[[], Exception]) -> int:
        """shed() on every gate of the process (a draining server's queues, wherever they are)."""
        return sum(gate.shed(error) for gate in list(cls._gates))

    def shed(self, error: Callable[[], Exception]) -> int:
        """Ends every wait with error() and refuses later arrivals the same way; the slots held
        keep running. A draining server answers its queue UNAVAILABLE at once, so that those
        callers retry on another replica instead of waiting for this one's last calls. Returns
        how many waiters were shed."""
        self._shed = error
        shed = 0
        for queue in self._queues.values():
            while queue:
                ticket = queue.popleft()
                ticket.released = True
                if ticket._granted is not None and not ticket._granted.done():
                    ticket._granted.set_exception(error())
                ticket._changed.set()
                shed += 1
        self._changed()
        return shed

    # -- internals --------------------------------------------------------------------------
    def _changed(self) -> None:
        waiting = self.waiting
        for position, ticket in enumerate(self.order(), 1):
            ticket._move(position, waiting)
        if self._on_depth is not None:
            self._on_depth(self.depth())

    def _leave(self, ticket: Ticket) -> None:
        queue = self._queues[ticket.priority]
        if ticket in queue:
            queue.remove(ticket)
            self._changed()

    def _free(self, ticket: Ticket) -> None:
        now = self._clock()
        held = max(now - ticket._start, 0.0)
        self._hold_s = held if self._hold_s is None else 0.8 * self._hold_s + 0.2 * held
        self._running -= 1
        self._dispatch(now)

    def _next(self) -> Ticket:
        interactive, batch = self._queues[INTERACTIVE], self._queues[BATCH]
        if batch and (not interactive or self._overtaken >= self.batch_every):
            self._overtaken = 0
            return batch.popleft()
        self._overtaken = self._overtaken + 1 if batch else 0
        return interactive.popleft()

    def _dispatch(self, now: float) -> None:
        granted = []
        while self._running < self.capacity and self.waiting:
            ticket = self._next()
            self._running += 1
            ticket._grant(now)
            granted.append(ticket)
        if granted:
            self._changed()
            if self._on_grant is not None:
                for ticket in granted:
                    self._on_grant(ticket.priority, ticket.waited_s)
