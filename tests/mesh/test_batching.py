"""Step-level batching in the running mesh: concurrent requests share the denoiser's UNet calls
(the sampling span and the metrics say so), each image equals its lone run within one pixel
level, a deadline inside a batch ends only its own request, and each request is charged its
share of the shared calls."""
from __future__ import annotations

import secrets
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from diffmesh.client import build_request
from diffmesh.imaging import decode_image
from diffmesh.proto.v1 import denoiser_pb2_grpc, orchestrator_pb2_grpc
from diffmesh.runtime import codec
from tests.component.stage_calls import denoise_request


def generate(mesh, prompt: str, seed: int, trace_id: str | None = None):
    request = build_request(prompt, negative_prompt="blurry", model="tiny-sdxl", steps=12, seed=seed,
                            width=64, height=64, guidance_scale=5.0)
    metadata = [("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")] if trace_id else None
    with grpc.insecure_channel(mesh.address("orchestrator")) as channel:
        return orchestrator_pb2_grpc.OrchestratorStub(channel).Generate(request, timeout=120, metadata=metadata)


def pixels(response) -> np.ndarray:
    return decode_image(response.images[0].image.data, "image").astype(int)


def together(calls):
    """Runs the calls at once and returns their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait(30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def metric(mesh, stage: str, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_ports[stage]}/metrics", timeout=5).read().decode()
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}}") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{wanted}}} not exported")


@pytest.fixture(scope="module")
def concurrent_pair(mesh, otlp_receiver):
    """Two requests alone, then the same two at once (traced)."""
    prompts = [("a red lighthouse on a cliff", 5), ("a blue boat in a harbour", 6)]
    alone = [generate(mesh, prompt, seed) for prompt, seed in prompts]
    calls_before = metric(mesh, "denoiser", "diffmesh_batch_call_requests_count", model="tiny-sdxl")
    trace_ids = [secrets.token_hex(16) for _ in prompts]
    both = together([lambda p=p, s=s, t=t: generate(mesh, p, s, t) for (p, s), t in zip(prompts, trace_ids)])
    spans = [otlp_receiver.collector.wait_for(trace_id, {"diffmesh-denoiser"}) for trace_id in trace_ids]
    return alone, both, spans, calls_before


def test_concurrent_requests_each_equal_their_lone_run(concurrent_pair):
    alone, both, _, _ = concurrent_pair
    for single, batched in zip(alone, both):
        assert np.abs(pixels(single) - pixels(batched)).max() <= 1
    assert np.abs(pixels(both[0]) - pixels(both[1])).max() > 10  # two different images


def test_the_sampling_span_says_they_shared_unet_calls(concurrent_pair):
    _, _, spans, _ = concurrent_pair
    for trace in spans:
        loop = next(s for s in trace if s.name == "sampling_loop")
        attributes = loop.attributes
        assert attributes["diffmesh.batch.calls"] == 12 == len(attributes["diffmesh.batch.rows"])
        assert attributes["diffmesh.batch.max_rows"] == 16
        assert 4 in attributes["diffmesh.batch.rows"]  # two requests' CFG rows in one call
        assert 2 in attributes["diffmesh.batch.requests"]
        assert attributes["diffmesh.priority"] == "interactive"


def test_batching_metrics_count_rows_requests_and_waits(mesh, concurrent_pair):
    _, _, _, calls_before = concurrent_pair
    labels = {"model": "tiny-sdxl"}
    assert metric(mesh, "denoiser", "diffmesh_batch_call_requests_count", **labels) > calls_before
    assert metric(mesh, "denoiser", "diffmesh_batch_call_requests_bucket", le="1.0", **labels) < \
        metric(mesh, "denoiser", "diffmesh_batch_call_requests_count", **labels)  # some calls had two
    assert metric(mesh, "denoiser", "diffmesh_batch_rows_sum", **labels) >= 4
    assert metric(mesh, "denoiser", "diffmesh_batch_join_wait_seconds_count", **labels) > 0
    assert 0 < metric(mesh, "denoiser", "diffmesh_batch_occupancy", **labels) <= 1
    assert metric(mesh, "denoiser", "diffmesh_batch_requests", **labels) == 0  # nobody mid-loop now


def test_each_request_is_charged_its_share_of_the_shared_calls(concurrent_pair):
    _, both, spans, _ = concurrent_pair
    for response, trace in zip(both, spans):
        [timing] = [t for t in response.info.timings if t.stage == "denoiser"]
        loop = next(s for s in trace if s.name == "sampling_loop")
        shared = loop.attributes["diffmesh.batch.device_ms"]
        # Its share of the UNet calls plus its own work, never the whole time inside shared calls.
        assert shared <= timing.compute_ms < timing.wall_ms
        assert timing.batch_wait_ms >= 0


def test_a_deadline_inside_a_batch_ends_only_its_request(mesh):
    request = lambda steps, seed: denoise_request(  # noqa: E731
        mesh.address("text_encoder"), "tiny-sdxl", scheduler="euler", steps=steps, guidance_scale=5.0,
        width=64, height=64, seeds=[seed])
    with grpc.insecure_channel(mesh.address("denoiser")) as channel:
        stub = denoiser_pb2_grpc.DenoiserStub(channel)
        [alone] = [e.result for e in stub.Denoise(request(30, 9), timeout=120) if e.HasField("result")]

        def survivor():
            return [e.result for e in stub.Denoise(request(30, 9), timeout=120) if e.HasField("result")][0]

        def doomed():
            stream = stub.Denoise(request(150, 10), timeout=0.6)
            with pytest.raises(grpc.RpcError) as caught:
                list(stream)
            return caught.value.code()

        result, code = together([survivor, doomed])
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    got, want = codec.to_numpy(result.latents, "latents"), codec.to_numpy(alone.latents, "latents")
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
