"""The metrics every service exports: series pre-initialised for every method and code a service
can return (so the first error is visible to rate()/increase()), for each admission gate and for
each orchestrator route and variant; the cost counters; the GPU collector's names; and a real
scrape that passes `promtool check metrics` (skipped, with the reason, when promtool is absent)."""
from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
import shutil
import subprocess
import urllib.request

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import diffmesh.proto.v1
from diffmesh import errors
from diffmesh.mesh import free_port
from diffmesh.runtime import metrics
from diffmesh.runtime.server import Admission
from diffmesh.stages import STAGES


def service_descriptor(name: str) -> ServiceDescriptor:
    for module in pkgutil.iter_modules(diffmesh.proto.v1.__path__):
        if module.name.endswith("_pb2"):
            importlib.import_module(f"diffmesh.proto.v1.{module.name}")
    return descriptor_pool.Default().FindServiceByName(name)


def exposed() -> dict[tuple[str, frozenset], float]:
    """Every sample of the process's registry: (name, labels) -> value."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for item in family.samples:
            samples[(item.name, frozenset(item.labels.items()))] = item.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_service_methods_are_the_descriptors_full_method_paths() -> None:
    assert metrics.service_methods(service_descriptor("diffmesh.v1.Vae")) == ["/diffmesh.v1.Vae/Decode",
                                                                            "/diffmesh.v1.Vae/Encode"]
    assert metrics.service_methods(service_descriptor("diffmesh.v1.Orchestrator")) == [
        "/diffmesh.v1.Orchestrator/Generate", "/diffmesh.v1.Orchestrator/GenerateStream",
        "/diffmesh.v1.Orchestrator/FetchReviewed"]


@pytest.mark.parametrize("stage", STAGES.names())
def test_every_method_and_code_of_a_stage_exists_before_its_first_request(stage: str) -> None:
    service = service_descriptor(STAGES[stage].service)
    metrics.preinitialize_service(stage, service)
    samples = exposed()
    methods = metrics.service_methods(service)
    assert methods, f"{stage}: its service has no methods"
    for method in methods:
        for code in metrics.SERVER_CODES:
            assert value(samples, "diffmesh_grpc_requests_total", stage=stage, method=method, code=code) is not None, \
                (stage, method, code)
        assert value(samples, "diffmesh_grpc_request_duration_seconds_count", stage=stage, method=method) is not None
        assert value(samples, "diffmesh_grpc_request_duration_seconds_bucket", stage=stage, method=method,
                     le="30.0") is not None
        assert value(samples, "diffmesh_grpc_in_flight_requests", stage=stage, method=method) is not None
        for direction in metrics.DIRECTIONS:
            assert value(samples, "diffmesh_grpc_payload_bytes_total", stage=stage, method=method,
                         direction=direction) is not None


def test_every_code_the_errors_module_maps_to_is_preinitialised() -> None:
    """A new MeshError subclass with a new code must join SERVER_CODES, or its first occurrence
    would create its series (and increase() would miss it)."""
    codes = {cls.code for _, cls in inspect.getmembers(errors, inspect.isclass)
             if issubclass(cls, errors.MeshError)}
    assert codes and codes <= set(metrics.SERVER_CODES), codes - set(metrics.SERVER_CODES)
    assert {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "INTERNAL"} <= set(metrics.SERVER_CODES)
    assert set(metrics.SERVER_CODES) <= set(metrics.STAGE_CALL_CODES)


def test_an_admission_gate_exposes_its_limits_and_an_empty_queue_when_created() -> None:
    admission = Admission("unit_gate", max_concurrency=3, max_queue=7)
    try:
        samples = exposed()
        assert value(samples, "diffmesh_queue_capacity", stage="unit_gate") == 7
        assert value(samples, "diffmesh_concurrency_limit", stage="unit_gate") == 3
        assert value(samples, "diffmesh_queue_depth", stage="unit_gate") == 0
        assert value(samples, "diffmesh_queue_wait_seconds_count", stage="unit_gate") == 0
        assert value(samples, "diffmesh_compute_seconds_count", stage="unit_gate") == 0
    finally:
        admission.executor.shutdown()


def test_the_orchestrators_routes_preinitialise_stage_calls_per_variant_and_code() -> None:
    from services.orchestrator.clients import StageClients
    from services.orchestrator.routing import StageRoute

    async def build() -> None:
        clients = StageClients([StageRoute("vae", "127.0.0.1:1", canary="127.0.0.1:2", canary_weight=10),
                                StageRoute("denoiser", "127.0.0.1:3")], max_message_mb=16)
        await clients.close(drain_timeout_s=1)

    asyncio.run(build())
    samples = exposed()
    for stage, variants in (("vae", ("stable", "canary")), ("denoiser", ("stable",))):
        for variant in variants:
            for code in metrics.STAGE_CALL_CODES:
                assert value(samples, "diffmesh_stage_calls_total", stage=stage, variant=variant,
                             code=code) is not None, (stage, variant, code)
            assert value(samples, "diffmesh_stage_retries_total", stage=stage, variant=variant) is not None
    assert value(samples, "diffmesh_stage_fallbacks_total", stage="vae") is not None


def test_a_generation_adds_its_images_and_device_seconds() -> None:
    before = exposed()
    metrics.record_generation("unit-model", images=3, device_seconds=1.5)
    after = exposed()

    def moved(name: str) -> float:
        return value(after, name, model="unit-model") - (value(before, name, model="unit-model") or 0.0)

    assert moved("diffmesh_images_generated_total") == 3
    assert moved("diffmesh_generation_device_seconds_total") == pytest.approx(1.5)


def test_the_gpu_collector_names_its_metrics_without_touching_a_device() -> None:
    collector = metrics.GpuMemoryCollector()
    assert [family.name for family in collector.describe()] == ["diffmesh_gpu_memory_bytes",
                                                                "diffmesh_gpu_memory_capacity_bytes"]
    import torch

    families = list(collector.collect())
    if not torch.cuda.is_available():  # no device: the families exist, with no samples
        assert [len(family.samples) for family in families] == [0, 0]
    else:
        capacity = {s.labels["device"]: s.value for s in families[1].samples}
        assert capacity and all(total > 0 for total in capacity.values())


def test_a_real_scrape_passes_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); metric names not linted")
    for spec in STAGES:
        metrics.preinitialize_service(spec.name, service_descriptor(spec.service))
        metrics.preinitialize_stage_calls(spec.name, ["stable", "canary"])
    metrics.record_generation("unit-model", images=1, device_seconds=0.1)
    metrics.BATCH_SIZE.labels("unit").observe(2)
    metrics.DENOISE_STEPS.labels("unit-model").inc()
    metrics.DENOISE_STEP_RATE.labels("unit-model").set(12.5)
    metrics.MODEL_LOADED.labels("unit", "unit-model").set(1)
    port = free_port()
    metrics.start_metrics_server("127.0.0.1", port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert "diffmesh_grpc_requests_total" in text and "diffmesh_stage_calls_total" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    # The linter does complain about a badly named metric (the check above can fail).
    bad = "# HELP diffmesh_requests_count requests\n# TYPE diffmesh_requests_count counter\ndiffmesh_requests_count 1\n"
    complaint = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, text=True, timeout=60)
    assert complaint.returncode != 0 and "_total" in complaint.stdout + complaint.stderr
