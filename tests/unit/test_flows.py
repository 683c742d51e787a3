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
from services.orchestrator.flows import FLOWS, choose_flow
from services.orchestrator.steps import Flow, FlowRun, RequestState, Step, execute, run_flow


def fake_plan(**fields):
    base = dict(request_id="r1", model=SimpleNamespace(entry=SimpleNamespace(id="tiny")), scheduler="euler",
                steps=2, guidance_scale=1.0, strength=0.0, width=8, height=8, seeds=[1], change_map=None,
                is_img2img=False, faces=None)
    return SimpleNamespace(**{**base, **fields})


def test_the_flow_follows_from_the_request_fields():
    assert choose_flow(fake_plan()).name == "txt2img"
    assert choose_flow(fake_plan(is_img2img=True)).name == "img2img"
    assert choose_flow(fake_plan(is_img2img=True, change_map=np.zeros((1, 8, 8), np.uint8))).name == "inpaint"
    faces = SimpleNamespace(base_pixels=None)
    assert choose_flow(fake_plan(faces=faces)).name == "txt2img+faces"
    assert choose_flow(fake_plan(faces=faces, is_img2img=True)).name == "img2img+faces"
    assert choose_flow(fake_plan(faces=SimpleNamespace(base_pixels=np.zeros((8, 8, 3), np.uint8)))).name == \
        "photo+faces"


def test_every_declared_flow_is_consistent_and_guarded_by_safety_at_both_ends():
    for flow in FLOWS.values():
        flow.check()
        # The prompt gate before any GPU work; the image check, then marking, as the files.
        assert flow.steps[0].name == "check_prompt"
        assert [step.name for step in flow.steps[-2:]] == ["check_images", "mark_files"]
        assert flow.steps[-1].writes == ("files",)
    # Stage 2 needs the face stage on top of stage 1's, and plans its calls to the others.
    assert FLOWS["txt2img+faces"].stages() == ["denoiser", "face", "safety", "text_encoder", "vae"]
    assert FLOWS["photo+faces"].stages() == ["denoiser", "face", "safety", "text_encoder", "vae"]
    assert FLOWS["txt2img"].stages() == ["denoiser", "safety", "text_encoder", "vae"]


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
    assert [e.WhichOneof("event") for e in events] == ["progress", "progress", "image", "result"]
    assert [(e.progress.step, e.progress.phase) for e in events[:2]] == [(1, "faces"), (2, "faces")]
    image = events[2].image
    assert (image.index, image.seed, image.data, image.last, image.file_size) == (0, 1, b"png", True, 3)
    assert events[-1].result.info.request_id == "r1" and not events[-1].result.images  # images came as events
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


# --- reply sizes, image chunks, reassembly -------------------------------------------------

def generated(index, data, seed=7):
    return orchestrator_pb2.GeneratedImage(
        image=common_pb2.EncodedImage(data=data, mime_type="image/png", width=3, height=2), seed=seed, index=index)


def test_images_are_split_into_ordered_chunks_that_collect_stream_reassembles():
    from diffmesh.client import collect_stream
    from services.orchestrator.replies import image_chunks

    images = [generated(0, bytes(range(256)) * 10, seed=5), generated(1, b"", seed=6), generated(2, b"abc", seed=7)]
    chunks = list(image_chunks(images, 1000))
    assert [(c.index, c.chunk, c.offset, len(c.data), c.last) for c in chunks] == [
        (0, 0, 0, 1000, False), (0, 1, 1000, 1000, False), (0, 2, 2000, 560, True), (1, 0, 0, 0, True),
        (2, 0, 0, 3, True)]
    assert all(len(c.data) <= 1000 for c in chunks)
    info = orchestrator_pb2.GenerationInfo(request_id="r9")
    events = ([orchestrator_pb2.GenerateEvent(progress=orchestrator_pb2.StepProgress(step=1))]
              + [orchestrator_pb2.GenerateEvent(image=c) for c in chunks]
              + [orchestrator_pb2.GenerateEvent(result=orchestrator_pb2.GenerateResponse(info=info))])
    seen = []
    response = collect_stream(events, seen.append)
    assert list(response.images) == images and response.info.request_id == "r9" and [p.step for p in seen] == [1]


def test_collect_stream_refuses_a_stream_with_a_missing_chunk_or_no_result():
    from diffmesh.client import IncompleteStream, collect_stream
    from services.orchestrator.replies import image_chunks

    chunks = [orchestrator_pb2.GenerateEvent(image=c) for c in image_chunks([generated(0, b"x" * 30)], 10)]
    result = orchestrator_pb2.GenerateEvent(result=orchestrator_pb2.GenerateResponse())
    with pytest.raises(IncompleteStream, match="expected offset 10"):
        collect_stream([chunks[0], chunks[2], result])
    with pytest.raises(IncompleteStream, match="without their last chunk"):
        collect_stream([chunks[0], result])
    with pytest.raises(IncompleteStream, match="without a result"):
        collect_stream(chunks)


def test_the_worst_case_file_bound_holds_for_incompressible_images_in_every_format():
    from diffmesh.imaging import encode_image
    from services.orchestrator.replies import max_file_bytes

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)
    binary = (rng.integers(0, 2, (96, 160, 3)) * 255).astype(np.uint8)
    for pixels in (noise, binary, np.zeros((8, 8, 3), np.uint8)):
        height, width = pixels.shape[:2]
        for fmt in (common_pb2.PNG, common_pb2.JPEG, common_pb2.WEBP):
            for level in (0, 1, 9):
                size = len(encode_image(pixels, fmt, 100, level).data)
                assert size <= max_file_bytes(width, height, fmt), (fmt, level, size)
    # PNG's bound is the raw scanlines plus framing: 3 images of 768x768 cannot fit 4 MiB.
    assert 3 * max_file_bytes(768, 768, common_pb2.PNG) > 4 * 1024 * 1024 > max_file_bytes(1024, 1024, common_pb2.PNG)


def test_unary_reply_checks_fail_with_failed_precondition_and_say_what_to_do():
    from services.orchestrator.replies import check_predicted, check_reply

    check_predicted(2, 768, 768, common_pb2.PNG, 4 * 1024 * 1024)
    with pytest.raises(FailedPrecondition, match="use GenerateStream") as info:
        check_predicted(3, 768, 768, common_pb2.PNG, 4 * 1024 * 1024)
    assert info.value.code == "FAILED_PRECONDITION" and "max_unary_reply_mb" in str(info.value)
    reply = orchestrator_pb2.GenerateResponse(images=[generated(0, b"x" * 5000)])
    check_reply(reply, 6000)
    with pytest.raises(FailedPrecondition, match="reply is .* MiB, over this server's unary reply limit"):
        check_reply(reply, 4000)


# --- readiness before a flow ----------------------------------------------------------------

def test_a_stage_with_nothing_listening_fails_unavailable_before_any_step_works():
    from diffmesh.errors import Unavailable
    from diffmesh.mesh import free_port

    async def main():
        log: list[str] = []
        flow = Flow("needs-vae", (Writes("first", log=log, writes=("files",), stages=("vae",)),))
        run = run_context([StageRoute("vae", f"127.0.0.1:{free_port()}")])
        with pytest.raises(Unavailable, match="stage vae is unavailable"):
            async for _ in run_flow(flow, RequestState(fake_plan()), run):
                pass
        await run.clients.close()
        return log
    assert asyncio.run(main()) == []


def test_a_reachable_stage_passes_the_readiness_check_without_waiting():
    from services.orchestrator.clients import reachable

    async def main():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        clients = StageClients([StageRoute("vae", f"127.0.0.1:{port}")], 4)
        channel = clients.router.channel("vae", "stable")
        first = await reachable(channel, 5.0)       # connecting: waits for the connection
        started = asyncio.get_running_loop().time()
        second = await reachable(channel, 5.0)      # READY: no wait
        waited = asyncio.get_running_loop().time() - started
        await clients.check_reachable(["vae"], CallContext("r1", "k", Deadline(30)), 1.0)
        await clients.close()
        await server.stop(0)
        return first, second, waited
    first, second, waited = asyncio.run(main())
    assert first and second and waited < 0.05


def test_a_cancelled_flow_waits_for_its_steps_to_finish_cleaning_up():
    class Cleanup(Step):
        name, writes = "slow", ("files",)
        finished = False

        async def run(self, state, run):
            try:
                await asyncio.sleep(30)
            finally:
                await asyncio.sleep(0.05)  # e.g. a stage call being cancelled, a span ending
                Cleanup.finished = True

    async def main():
        events = run_flow(Flow("slow", (Cleanup(),)), RequestState(fake_plan()), run_context())
        consumer = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.05)
        consumer.cancel()  # what grpc does on a deadline or a client's cancel
        with pytest.raises(asyncio.CancelledError):
            await consumer
        finished_when_cancelled = Cleanup.finished
        await events.aclose()
        return finished_when_cancelled, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    finished, pending = asyncio.run(main())
    assert finished and pending == []
