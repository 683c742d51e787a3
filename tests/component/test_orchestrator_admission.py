"""The orchestrator's own admission and its fail-fast routing, on an orchestrator run in-process
on a real port, routed to the session mesh's stages: max_concurrency and max_queue bound the
requests it takes (RESOURCE_EXHAUSTED beyond), and a stage with no reachable replica fails a
request UNAVAILABLE, naming it, before any other stage works."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from diffmesh.client import MeshClient, build_request
from diffmesh.mesh import free_port
from diffmesh.runtime.config import load_config
from services.orchestrator.main import OrchestratorConfig, OrchestratorStage

from tests.component.test_runtime import Running, _health_or_none, wait_until

FAST = dict(model="tiny-sd15", width=64, height=64, steps=1, guidance_scale=1.0, seed=4)
SLOW = dict(model="tiny-sdxl", width=128, height=128, steps=80, seed=4)  # a few seconds each


def orchestrator(mesh, registry, *args: str) -> Running:
    """An orchestrator in this process, routed to the session mesh's stages (args override)."""
    config = load_config(OrchestratorConfig, ["--registry", str(registry), *mesh.route_args(), *args], environ={})
    running = Running(OrchestratorStage(config), config)
    wait_until(lambda: _health_or_none(running.address) == health_pb2.HealthCheckResponse.SERVING, timeout=30)
    return running


def stage_requests(mesh, stage: str) -> float:
    return sum(float(line.split("#")[0].split()[-1]) for line in mesh.metrics_text(stage).splitlines()
               if line.startswith("diffmesh_grpc_requests_total{"))


def test_with_two_slots_and_no_queue_a_burst_of_eight_gets_resource_exhausted_beyond_two(mesh, registry):
    running = orchestrator(mesh, registry, "--max-concurrency", "2", "--max-queue", "0")
    try:
        start = threading.Barrier(8)
        with MeshClient(running.address) as client, ThreadPoolExecutor(8) as pool:
            def call(i: int) -> tuple[str, str]:
                start.wait()
                try:
                    client.generate(build_request(f"burst {i}", **SLOW), timeout=120)
                    return "OK", ""
                except grpc.RpcError as exc:
                    return exc.code().name, exc.details()
            results = list(pool.map(call, range(8)))
            codes = sorted(code for code, _ in results)
            assert codes == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 6, results
            assert all("max_queue" in details for code, details in results if code == "RESOURCE_EXHAUSTED")
            # The slots are given back: the next request is admitted.
            assert client.generate(build_request("after the burst", **FAST), timeout=60).images
    finally:
        assert running.stop() == 0


def test_a_queue_lets_requests_wait_for_a_slot_instead(mesh, registry):
    running = orchestrator(mesh, registry, "--max-concurrency", "1", "--max-queue", "3")
    try:
        with MeshClient(running.address) as client, ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda i: client.generate(build_request(f"queued {i}", **FAST), timeout=60),
                                    range(4)))
        assert all(reply.images for reply in replies)
    finally:
        assert running.stop() == 0


def test_a_stage_with_nothing_listening_fails_unavailable_naming_it_before_other_stages_work(mesh, registry):
    running = orchestrator(mesh, registry, "--vae-address", f"127.0.0.1:{free_port()}")
    try:
        before = {stage: stage_requests(mesh, stage) for stage in ("text_encoder", "denoiser")}
        with MeshClient(running.address) as client:
            for call in (client.generate, lambda r, timeout: list(client.generate_stream(r, timeout=timeout))):
                with pytest.raises(grpc.RpcError) as info:
                    call(build_request("no vae", **FAST), timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "stage vae is unavailable" in info.value.details()
        assert {stage: stage_requests(mesh, stage) for stage in before} == before  # neither ran
    finally:
        assert running.stop() == 0


def test_reply_size_settings_are_checked_at_start_up():
    from diffmesh.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="max_unary_reply_mb: 300 exceeds max_message_mb 256"):
        load_config(OrchestratorConfig, ["--max-unary-reply-mb", "300"], environ={})
    with pytest.raises(ConfigError, match="stream_chunk_kb: 4096 does not fit in max_message_mb 4"):
        load_config(OrchestratorConfig, ["--max-message-mb", "4", "--stream-chunk-kb", "4096"], environ={})
    config = load_config(OrchestratorConfig, [], environ={})
    assert (config.max_unary_reply_mb, config.stream_chunk_kb, config.max_queue) == (4, 3072, 64)
