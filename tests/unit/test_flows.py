"""The orchestrator's declared steps and flows, run without any stage: which flow a request gets,
that flows are consistent, planned sub-steps, progress streaming, and unconfigured stages."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from diffmesh.errors import FailedPrecondition
from diffmesh.proto.v1 import common_pb2, orchestrator_pb2
from services.orchestrator.clients import CallContext, Deadline, StageClients
from services.orchestrator.routing import StageRoute
from services.orchestrator.steps import (FLOWS, Flow, FlowRun, RequestState, Step, choose_flow, execute,
                                         run_flow)


def fake_plan(**fields):
    base = dict(request_id="r1", model=SimpleNamespace(entry=SimpleNamespace(id="tiny")), scheduler="euler",
                steps=2, guidance_scale=1.0, strength=0.0, width=8, height=8, seeds=[1], change_map=None,
                is_img2img=False)
    return SimpleNamespace(**{**base, **fields})


def test_the_flow_follows_from_the_request_fields():
    assert choose_flow(fake_plan()).name == "txt2img"
    assert choose_flow(fake_plan(is_img2img=True)).name == "img2img"
    assert choose_flow(fake_plan(is_img2img=True, change_map=np.zeros((1, 8, 8), np.uint8))).name == "inpaint"


def test_every_declared_flow_is_consistent_and_ends_with_files():
    for flow in FLOWS.values():
        flow.check()
        assert flow.steps[-1].writes == ("files",)
    assert FLOWS["txt2img"].stages() == ["denoiser", "text_encoder", "vae"]


class Writes(Step):
    def __init__(self, name, reads=(), writes=(), log=None, plans=(), stages=()):
        self.name, self.reads, self.writes, self.stages = name, tuple(reads), tuple(writes), tuple(stages)
        self.log, self.plans = log, list(plans)

    async def run(self, state, run):
        self.log.append(self.name)
        for name in self.writes:
            setattr(state, name, [common_pb2.EncodedImage(data=b"x")] if name == "files" else object())
        return self.plans


def test_a_flow_that_reads_before_anything_writes_is_rejected():
    with pytest.raises(ValueError, match="reads \\['latents'\\] before"):
        Flow("broken", (Writes("decode", reads=("latents",), writes=("files",)),)).check()
    with pytest.raises(ValueError, match="unknown state fields"):
        Flow("typo", (Writes("x", writes=("fiels",)),)).check()
    with pytest.raises(ValueError, match="no step writes the files"):
        Flow("open", (Writes("x", writes=("pixels",)),)).check()


def run_context(routes=(), progress=True):
    clients = StageClients(list(routes), 4)
    return FlowRun(clients, CallContext("r1", "k", Deadline(30)), progress)


def test_a_step_plans_further_work_that_runs_right_after_it():
    async def main():
        log: list[str] = []
        sub = [Writes(f"face-{i}", log=log) for i in range(3)]
        steps = [Writes("analyze", log=log, plans=sub), Writes("composite", log=log)]
        await execute(steps, RequestState(fake_plan()), run_context())
        return log
    assert asyncio.run(main()) == ["analyze", "face-0", "face-1", "face-2", "composite"]


def test_an_unconfigured_stage_fails_the_request_before_any_step_works():
    async def main():
        log: list[str] = []
        flow = Flow("needs-vae", (Writes("first", log=log, writes=("files",), stages=("vae",)),))
        run = run_context([StageRoute("text_encoder", "127.0.0.1:1"), StageRoute("vae", "")])
        with pytest.raises(FailedPrecondition, match="stage vae is not configured"):
            async for _ in run_flow(flow, RequestState(fake_plan()), run):
                pass
        await run.clients.close()
        return log
    assert asyncio.run(main()) == []


class Progressing(Step):
    name, writes = "denoise", ("files",)

    async def run(self, state, run):
        for step in (1, 2):
            run.events.put_nowait(orchestrator_pb2.GenerateEvent(
                progress=orchestrator_pb2.StepProgress(step=step, total_steps=2, phase="faces")))
            await asyncio.sleep(0.01)
        state.files = [common_pb2.EncodedImage(data=b"png")]


def test_progress_streams_while_steps_run_then_the_result_and_nothing_is_left_pending():
    async def main():
        run = run_context()
        events = [e async for e in run_flow(Flow("one", (Progressing(),)), RequestState(fake_plan()), run)]
        await asyncio.sleep(0)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return events, pending
    events, pending = asyncio.run(main())
    assert [(e.progress.step, e.progress.phase) for e in events[:-1]] == [(1, "faces"), (2, "faces")]
    assert events[-1].result.images[0].image.data == b"png" and events[-1].result.info.request_id == "r1"
    assert pending == []


def test_a_caller_that_leaves_midway_cancels_the_steps():
    class Slow(Step):
        name, writes = "slow", ("files",)
        cancelled = False

        async def run(self, state, run):
            run.events.put_nowait(orchestrator_pb2.GenerateEvent(progress=orchestrator_pb2.StepProgress(step=1)))
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                Slow.cancelled = True
                raise

    async def main():
        events = run_flow(Flow("slow", (Slow(),)), RequestState(fake_plan()), run_context())
        first = await events.__anext__()
        await events.aclose()  # what grpc does when the caller cancels the stream
        await asyncio.sleep(0)
        return first, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    first, pending = asyncio.run(main())
    assert first.progress.step == 1 and Slow.cancelled and pending == []


def test_finalize_drains_in_flight_shadow_calls_then_closes_the_channels():
    from services.orchestrator.shadow import ShadowDiffer

    async def main():
        shadow = ShadowDiffer()
        clients = StageClients([StageRoute("vae", "127.0.0.1:1")], 4, shadow=shadow)
        finished = []

        async def canary_call():
            await asyncio.sleep(0.05)
            finished.append(True)
            return common_pb2.StageUsage()
        shadow.mirror("vae.decode", "r1", canary_call, common_pb2.StageUsage())
        await clients.close(drain_timeout_s=5)
        channel = clients.router._channels[("vae", "stable")]
        return finished, channel.get_state()
    finished, state = asyncio.run(main())
    assert finished == [True] and state == grpc.ChannelConnectivity.SHUTDOWN
