"""The StepBatcher on its own (a recording fake model): who shares a call, in what order, what
each request is charged, and that one request's failure or cancellation stays its own."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffmesh.runtime.batching import BatchPolicy, SharedCalls, StepBatcher

LONG_WAIT = BatchPolicy(max_rows=16, max_wait_ms=5000.0)  # only "everyone is waiting" starts a call


class FakeModel:
    """Items are (tag, value); the output is value * 10. Records each call's tags; a value of
    None makes the call raise (a bad row); `gate` holds calls until set."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.cancels: list[object] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.delay_s = delay_s

    def __call__(self, key, items, cancel):
        self.started.set()
        self.gate.wait(10)
        self.calls.append([tag for tag, _ in items])
        self.cancels.append(cancel)
        if self.delay_s:
            time.sleep(self.delay_s)
        if any(value is None for _, value in items):
            raise ValueError("a bad row")
        return [value * 10 for _, value in items]


def loop(batcher: StepBatcher, tag: str, steps: int, rows: int = 2, key="a", priority="interactive",
         start: threading.Barrier | None = None, stats: SharedCalls | None = None) -> list[int]:
    with batcher.join(key, priority, stats) as member:
        if start is not None:
            start.wait(10)
        return [member.evaluate((tag, step), rows) for step in range(steps)]


def test_a_lone_request_runs_at_once_one_call_per_step():
    model = FakeModel()
    batcher = StepBatcher(model, LONG_WAIT)
    stats = SharedCalls()
    started = time.perf_counter()
    assert loop(batcher, "solo", 5, stats=stats) == [0, 10, 20, 30, 40]
    assert time.perf_counter() - started < 1.0  # never waited the 5 s max_wait for company
    assert model.calls == [["solo"]] * 5
    assert stats.calls == 5 and stats.rows == [2] * 5 and stats.requests == [1] * 5


def test_requests_of_one_bucket_share_every_call_and_leave_when_done():
    model = FakeModel()
    batcher = StepBatcher(model, LONG_WAIT)
    barrier = threading.Barrier(3)
    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(loop, batcher, tag, steps, start=barrier) for tag, steps in (("a", 3), ("b", 5), ("c", 4))]
        results = [run.result(10) for run in runs]
    assert results == [[0, 10, 20], [0, 10, 20, 30, 40], [0, 10, 20, 30]]
    assert [sorted(call) for call in model.calls] == [["a", "b", "c"]] * 3 + [["b", "c"], ["b"]]


def test_other_buckets_never_share_a_call():
    model = FakeModel()
    batcher = StepBatcher(model, LONG_WAIT)
    barrier = threading.Barrier(3)
    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(loop, batcher, tag, 3, key=key, start=barrier)
                for tag, key in (("x1", "x"), ("y1", "y"), ("x2", "x"))]
        [run.result(10) for run in runs]
    assert sorted(map(sorted, model.calls)) == [["x1", "x2"]] * 3 + [["y1"]] * 3


def test_a_request_joining_mid_loop_is_in_the_next_call():
    model = FakeModel()
    batcher = StepBatcher(model, LONG_WAIT)
    first, late = SharedCalls(), SharedCalls()
    with batcher.join("a", stats=first) as member:
        assert member.evaluate(("first", 0), 2) == 0
        joined = batcher.join("a", stats=late)  # from now on the next call waits for its first step

        def run_late() -> list[int]:
            with joined:
                return [joined.evaluate(("late", s), 2) for s in range(2)]

        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(run_late)
            assert [member.evaluate(("first", s), 2) for s in (1, 2, 3)] == [10, 20, 30]
            assert other.result(10) == [0, 10]
    assert [sorted(call) for call in model.calls] == [["first"], ["first", "late"], ["first", "late"], ["first"]]
    assert first.requests == [1, 2, 2, 1] and late.requests == [2, 2]


def test_max_wait_bounds_the_wait_for_a_straggler():
    model = FakeModel()
    batcher = StepBatcher(model, BatchPolicy(max_rows=16, max_wait_ms=20.0))
    with batcher.join("a") as member, batcher.join("a"):  # the second never hands anything in
        started = time.perf_counter()
        assert member.evaluate(("waiting", 1), 2) == 10
        waited = time.perf_counter() - started
    assert 0.015 <= waited < 2.0
    assert model.calls == [["waiting"]]


def test_a_zero_wait_never_waits_for_company():
    model = FakeModel()
    batcher = StepBatcher(model, BatchPolicy(max_rows=16, max_wait_ms=0.0))
    with batcher.join("a") as member, batcher.join("a"):
        started = time.perf_counter()
        member.evaluate(("alone", 1), 2)
        assert time.perf_counter() - started < 0.5


def test_the_row_budget_splits_calls_and_interactive_rows_go_first():
    model = FakeModel()
    model.gate.clear()
    batcher = StepBatcher(model, BatchPolicy(max_rows=4, max_wait_ms=5000.0))
    with ThreadPoolExecutor(5) as pool:
        batch_members = [batcher.join("a", "batch") for _ in range(4)]
        runs = [pool.submit(lambda m=m, i=i: [m.evaluate((f"batch{i}", s), 2) for s in range(2)])
                for i, m in enumerate(batch_members)]
        assert model.started.wait(10)  # the first call (two of the batch flood) is in the model
        interactive = batcher.join("a", "interactive")
        asked = pool.submit(lambda: interactive.evaluate(("interactive", 0), 2))
        deadline = time.monotonic() + 10
        while len(batcher._pending) < 3 and time.monotonic() < deadline:  # the rest and the newcomer wait
            time.sleep(0.005)
        model.gate.set()
        assert asked.result(10) == 0
        interactive.leave()
        for run, member in zip(runs, batch_members):
            assert run.result(10) == [0, 10]
            member.leave()
    assert len(model.calls[0]) == 2 and all(tag.startswith("batch") for tag in model.calls[0])
    assert "interactive" in model.calls[1]  # overtook the batch flood: the very next call
    assert all(len(call) <= 2 for call in model.calls)  # 2 rows each, 4 per call


def test_a_skipped_batch_row_goes_first_after_max_skips():
    model = FakeModel()
    policy = BatchPolicy(max_rows=2, max_wait_ms=5000.0, max_skips=3)
    batcher = StepBatcher(model, policy)
    barrier = threading.Barrier(3)
    with ThreadPoolExecutor(3) as pool:
        fast = [pool.submit(loop, batcher, f"i{n}", 12, start=barrier) for n in range(2)]
        slow = pool.submit(loop, batcher, "batch", 1, priority="batch", start=barrier)
        assert slow.result(10) == [0]
        [run.result(10) for run in fast]
    position = next(index for index, call in enumerate(model.calls) if "batch" in call)
    assert position <= policy.max_skips  # skipped at most max_skips calls, then first


def test_a_call_that_fails_is_retried_per_item_and_only_the_bad_one_fails():
    model = FakeModel()
    batcher = StepBatcher(model, LONG_WAIT)
    barrier = threading.Barrier(2)

    def bad() -> None:
        with batcher.join("a") as member:
            barrier.wait(10)
            member.evaluate(("bad", None), 2)

    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(loop, batcher, "good", 1, start=barrier)
        failing = pool.submit(bad)
        assert good.result(10) == [0]
        with pytest.raises(ValueError, match="a bad row"):
            failing.result(10)
    assert sorted(model.calls[0]) == ["bad", "good"]  # the shared call broke...
    assert sorted(map(tuple, model.calls[1:])) == [("bad",), ("good",)]  # ...each alone: only "bad" fails


def test_a_cancelled_request_leaves_before_its_call_and_the_others_go_on():
    model = FakeModel()
    batcher = StepBatcher(model, BatchPolicy(max_wait_ms=0.0))
    cancel = threading.Event()
    model.gate.clear()
    with ThreadPoolExecutor(2) as pool, batcher.join("a") as waiting, batcher.join("a") as running:
        first = pool.submit(running.evaluate, ("running", 1), 2)
        assert model.started.wait(10)  # its call is in the model; "waiting" hands its item in now
        cancelled = pool.submit(waiting.evaluate, ("waiting", 1), 2, cancel, lambda: RuntimeError("gone"))
        cancel.set()
        with pytest.raises(RuntimeError, match="gone"):
            cancelled.result(10)
        model.gate.set()
        assert first.result(10) == 10
        assert running.evaluate(("running", 2), 2) == 20
    assert model.calls == [["running"], ["running"]]


def test_a_shared_call_is_given_up_only_when_every_caller_cancelled():
    model = FakeModel()
    batcher = StepBatcher(model, LONG_WAIT)
    events = [threading.Event(), threading.Event()]
    barrier = threading.Barrier(2)

    def run(index: int) -> int:
        with batcher.join("a") as member:
            barrier.wait(10)
            return member.evaluate((f"r{index}", 1), 2, events[index])

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run, i) for i in range(2)]
        assert [future.result(10) for future in runs] == [10, 10]
    [cancel] = model.cancels
    assert not cancel.is_set()
    events[0].set()
    assert not cancel.is_set()
    events[1].set()
    assert cancel.is_set()


def test_each_request_is_charged_its_rows_share_of_every_shared_call():
    model = FakeModel(delay_s=0.05)
    batcher = StepBatcher(model, LONG_WAIT)
    barrier = threading.Barrier(2)
    small, large = SharedCalls(), SharedCalls()
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(loop, batcher, "small", 2, rows=1, start=barrier, stats=small),
                pool.submit(loop, batcher, "large", 2, rows=3, start=barrier, stats=large)]
        [run.result(10) for run in runs]
    assert small.rows == large.rows == [4, 4]
    # The calls took ~100 ms in all: a quarter to the 1-row request, three quarters to the other.
    assert large.device_ms == pytest.approx(3 * small.device_ms, rel=1e-9)
    assert 90 <= small.device_ms + large.device_ms <= 1000
    assert small.blocked_ms >= 90 and large.blocked_ms >= 90  # both sat through the whole calls


def test_batching_off_runs_each_evaluation_alone_in_its_own_thread():
    model = FakeModel()
    batcher = StepBatcher(model, BatchPolicy(enabled=False))
    cancel = threading.Event()
    with batcher.join("a") as member, batcher.join("a"):
        assert member.evaluate(("off", 2), 2, cancel) == 20  # no waiting for the idle second member
    assert model.calls == [["off"]] and model.cancels == [cancel]


def test_bad_settings_and_priorities_are_refused():
    with pytest.raises(ValueError, match="max_rows"):
        BatchPolicy(max_rows=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        BatchPolicy(max_wait_ms=-1)
    with pytest.raises(ValueError, match="priority"):
        StepBatcher(FakeModel()).join("a", "urgent")
