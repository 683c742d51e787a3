"""A stage's admission (runtime.server.Admission): its queue is priority-ordered, and a draining
server sheds it with UNAVAILABLE while the calls already computing go on."""
from __future__ import annotations

import asyncio

import pytest

from diffmesh import errors
from diffmesh.runtime.admission import PriorityGate
from diffmesh.runtime.server import Admission


def test_a_waiting_interactive_call_overtakes_waiting_batch_calls():
    async def scenario() -> list[str]:
        admission = Admission("prio-test", 1, 8)
        order: list[str] = []
        release = asyncio.Event()

        async def call(name: str, priority: str) -> None:
            async with admission.slot(priority):
                order.append(name)
                if name == "running":
                    await release.wait()

        running = asyncio.ensure_future(call("running", "batch"))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(call(f"batch{i}", "batch")) for i in range(3)]
        await asyncio.sleep(0)
        waiting.append(asyncio.ensure_future(call("interactive", "interactive")))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(running, *waiting)
        return order

    assert asyncio.run(scenario()) == ["running", "interactive", "batch0", "batch1", "batch2"]


def test_a_full_queue_is_refused_with_a_retry_hint():
    async def scenario() -> errors.ResourceExhausted:
        admission = Admission("full-test", 1, 0)
        async with admission.slot():
            with pytest.raises(errors.ResourceExhausted) as refused:
                async with admission.slot():
                    pass
        return refused.value

    refused = asyncio.run(scenario())
    assert "max_queue" in str(refused) and refused.retry_after_ms and refused.retry_after_ms > 0


def test_draining_sheds_the_queue_with_unavailable_and_lets_running_calls_finish():
    async def scenario() -> tuple[str, list[str], int]:
        admission = Admission("drain-test", 1, 8)
        release, outcomes = asyncio.Event(), []

        async def running() -> str:
            async with admission.slot():
                await release.wait()
                return "finished"

        async def queued(priority: str) -> None:
            try:
                async with admission.slot(priority):
                    outcomes.append("ran")
            except errors.Unavailable as exc:
                outcomes.append(f"{exc.code}: {exc}")

        first = asyncio.ensure_future(running())
        await asyncio.sleep(0)
        waiters = [asyncio.ensure_future(queued(p)) for p in ("interactive", "batch")]
        await asyncio.sleep(0)
        shed = admission.shed_queue()
        await asyncio.gather(*waiters)
        with pytest.raises(errors.Unavailable):  # later arrivals too
            async with admission.slot():
                pass
        release.set()
        return await first, outcomes, shed

    result, outcomes, shed = asyncio.run(scenario())
    assert result == "finished" and shed >= 2
    assert outcomes == ["UNAVAILABLE: drain-test is shutting down: not started here; retry on another replica"] * 2


def test_shedding_ends_a_waiters_position_stream():
    async def scenario() -> list[int]:
        gate = PriorityGate("positions-test", 1, 4)
        holder = gate.enter("interactive")
        waiter = gate.enter("batch")
        seen: list[int] = []

        async def follow() -> None:
            async for position in waiter.positions():
                seen.append(position.position)

        follower = asyncio.ensure_future(follow())
        await asyncio.sleep(0)
        gate.shed(lambda: errors.Unavailable("draining"))
        await asyncio.wait_for(follower, 2)
        with pytest.raises(errors.Unavailable):
            await waiter.wait()
        holder.release()
        return seen

    assert asyncio.run(scenario()) == [1]
