"""Prometheus metrics every service exposes on its own HTTP port (metrics_port).

Defined once per process; labels say which stage and method. Latency histograms carry the
trace id as an exemplar (visible in the OpenMetrics exposition), so a slow bucket links to a trace.

Series are pre-initialised (at 0) for every label set a process knows it can produce, so that
`rate()` and `increase()` see the first error instead of a series born with it:
- per service (`preinitialize_service`, at start-up): requests for every method of the stage's
  gRPC service (from its proto descriptor) x every code of SERVER_CODES; latency, in-flight and
  payload bytes for every method;
- per admission gate (`preinitialize_admission`): queue depth, wait, compute time, and the
  configured limits (diffmesh_queue_capacity, diffmesh_concurrency_limit);
- per orchestrator route (`preinitialize_stage_calls`): stage calls for each configured variant x
  every code of STAGE_CALL_CODES, retries per variant, fallbacks where a canary is configured.
Label sets that depend on requests (model ids of steps, batch sizes) start with their first use.
The chart's PrometheusRule and Grafana dashboard (deploy/helm/diffmesh) use these names; a test
checks every name they use exists here.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, REGISTRY
from prometheus_client.registry import Collector

from diffmesh.runtime.telemetry import current_ids

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# The codes a service's own requests can end with: OK; those the runtime maps compute errors to
# (diffmesh.errors: INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, RESOURCE_EXHAUSTED,
# UNAVAILABLE, CANCELLED; the orchestrator's caller admission: UNAUTHENTICATED, PERMISSION_DENIED);
# INTERNAL for an unexpected exception; CANCELLED when the caller goes away; DEADLINE_EXCEEDED when
# its deadline passes; UNKNOWN when the handler finished but the transport failed to send its reply
# (runtime.delivery). A test checks every diffmesh.errors code is here.
SERVER_CODES = ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED",
                "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL", "UNAUTHENTICATED", "PERMISSION_DENIED",
                "UNKNOWN")
# An orchestrator's call to a stage can also end with what the client side reports itself:
# UNKNOWN (a stage answering outside the contract) and UNIMPLEMENTED (a canary of another version).
STAGE_CALL_CODES = SERVER_CODES + ("UNIMPLEMENTED",)
DIRECTIONS = ("in", "out")

REQUESTS = Counter("diffmesh_grpc_requests", "gRPC requests handled, by method and status code",
                   ["stage", "method", "code"])
LATENCY = Histogram("diffmesh_grpc_request_duration_seconds", "gRPC request latency (server side)",
                    ["stage", "method"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("diffmesh_grpc_in_flight_requests", "gRPC requests being handled", ["stage", "method"])
PAYLOAD = Counter("diffmesh_grpc_payload_bytes", "serialized message bytes, by direction",
                  ["stage", "method", "direction"])
QUEUE_DEPTH = Gauge("diffmesh_queue_depth", "requests waiting for a compute slot", ["stage"])
QUEUE_CAPACITY = Gauge("diffmesh_queue_capacity", "requests that may wait for a compute slot (max_queue); "
                       "more are refused with RESOURCE_EXHAUSTED", ["stage"])
CONCURRENCY_LIMIT = Gauge("diffmesh_concurrency_limit", "compute slots: calls computing at once (max_concurrency)",
                          ["stage"])
QUEUE_WAIT = Histogram("diffmesh_queue_wait_seconds", "time waiting for a compute slot", ["stage"],
                       buckets=LATENCY_BUCKETS)
COMPUTE = Histogram("diffmesh_compute_seconds", "time computing on the device per call", ["stage"],
                    buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("diffmesh_batch_size", "images per compute call", ["stage"],
                       buckets=(1, 2, 4, 8, 16, 32, 64))
DENOISE_STEPS = Counter("diffmesh_denoise_steps", "sampling steps run", ["model"])
DENOISE_STEP_RATE = Gauge("diffmesh_denoise_steps_per_second", "steps per second of the last finished loop",
                          ["model"])
MODEL_LOADED = Gauge("diffmesh_model_loaded", "1 when the model is loaded and serving", ["stage", "model"])
READY = Gauge("diffmesh_ready", "1 once every model is loaded (health SERVING)", ["stage"])
STAGE_CALLS = Counter("diffmesh_stage_calls", "orchestrator calls to stages, by variant and status code",
                      ["stage", "variant", "code"])
STAGE_FALLBACKS = Counter("diffmesh_stage_fallbacks", "calls that fell back from canary to stable", ["stage"])
STAGE_RETRIES = Counter("diffmesh_stage_retries", "stage call attempts retried after UNAVAILABLE (the one retry layer)",
                        ["stage", "variant"])
IMAGES = Counter("diffmesh_images_generated", "images the orchestrator generated (counted when the reply is built)",
                 ["model"])
# Safety: counted where the decision is enforced (the orchestrator) and where it is made (the
# safety stage, "check" prompt / image). Labels are policy categories and outcomes only.
SAFETY_DECISIONS = Counter("diffmesh_safety_decisions", "safety decisions, by check, policy category and outcome",
                           ["stage", "check", "category", "outcome"])
IMAGES_WITHHELD = Counter("diffmesh_images_withheld", "generated images not returned, by outcome (BLOCK, REVIEW)",
                          ["outcome"])
REVIEW_CASES = Gauge("diffmesh_review_cases", "review cases in the queue, by status", ["status"])
GENERATION_DEVICE_SECONDS = Counter("diffmesh_generation_device_seconds",
                                    "device compute seconds the stages spent on generations (info.cost)", ["model"])
# step-level batching (a StepBatcher per loaded model: the denoiser's UNets)
BATCH_ROWS = Histogram("diffmesh_batch_rows", "rows per shared model call (CFG rows count)", ["model"],
                       buckets=(1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64))
BATCH_CALL_REQUESTS = Histogram("diffmesh_batch_call_requests", "requests sharing one model call", ["model"],
                                buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
BATCH_JOIN_WAIT = Histogram("diffmesh_batch_join_wait_seconds",
                            "time an evaluation waited before its model call started (company, other calls)",
                            ["model"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
BATCH_OCCUPANCY = Gauge("diffmesh_batch_occupancy", "rows of the latest model call / the row budget (max_rows)",
                        ["model"])
BATCH_REQUESTS = Gauge("diffmesh_batch_requests", "requests inside the batching engine (mid-loop)", ["model"])

# caller admission (the orchestrator, before any stage: services/orchestrator/callers.py). Labels
# are caller names from the callers file ("anonymous", "unauthenticated"), never keys.
CALLER_REQUESTS = Counter("diffmesh_caller_requests", "requests by caller and admission outcome (admitted, "
                          "unauthenticated, permission_denied, rate_limited, over_quota, queue_full)",
                          ["caller", "outcome"])
CALLER_ACTIVE = Gauge("diffmesh_caller_active_requests", "requests a caller has in the orchestrator (waiting or "
                      "running; its max_concurrency bounds this)", ["caller"])
ADMISSION_WAITING = Gauge("diffmesh_admission_waiting", "requests waiting for an orchestrator slot, by priority class",
                          ["priority"])
ADMISSION_QUEUE_WAIT = Histogram("diffmesh_admission_queue_wait_seconds",
                                 "time waiting for an orchestrator slot, by priority class", ["priority"],
                                 buckets=LATENCY_BUCKETS)
CALLERS_RELOADS = Counter("diffmesh_callers_file_reloads", "callers file loads, by result (ok; error: the "
                          "configuration in force was kept)", ["result"])


def batch_call_observer(model: str):
    """A StepBatcher's on_call for one model: rows, requests, join waits and occupancy."""
    rows_metric, requests_metric = BATCH_ROWS.labels(model), BATCH_CALL_REQUESTS.labels(model)
    wait_metric, occupancy = BATCH_JOIN_WAIT.labels(model), BATCH_OCCUPANCY.labels(model)
    occupancy.set(0)

    def on_call(rows: int, requests: int, max_rows: int, waits_s: list[float]) -> None:
        rows_metric.observe(rows)
        requests_metric.observe(requests)
        for wait in waits_s:
            wait_metric.observe(wait)
        occupancy.set(min(rows / max_rows, 1.0))
    return on_call


def exemplar() -> dict[str, str] | None:
    ids = current_ids()
    return {"trace_id": ids[0], "span_id": ids[1]} if ids else None


def service_methods(service: ServiceDescriptor) -> list[str]:
    """The `method` label values of a gRPC service: its full method paths, as grpc names them."""
    return [f"/{service.full_name}/{method.name}" for method in service.methods]


def preinitialize_service(stage: str, service: ServiceDescriptor) -> None:
    """Every method of the stage's service, at 0: requests by code, latency, in-flight, payload."""
    for method in service_methods(service):
        for code in SERVER_CODES:
            REQUESTS.labels(stage, method, code)
        LATENCY.labels(stage, method)
        IN_FLIGHT.labels(stage, method)
        for direction in DIRECTIONS:
            PAYLOAD.labels(stage, method, direction)


def preinitialize_admission(stage: str, max_concurrency: int, max_queue: int) -> None:
    """An admission gate's series: its limits, an empty queue, no waits or compute yet."""
    QUEUE_CAPACITY.labels(stage).set(max_queue)
    CONCURRENCY_LIMIT.labels(stage).set(max_concurrency)
    QUEUE_DEPTH.labels(stage).set(0)
    QUEUE_WAIT.labels(stage)
    COMPUTE.labels(stage)


def preinitialize_stage_calls(stage: str, variants: Sequence[str]) -> None:
    """An orchestrator route's series: calls per variant and code, retries, canary fallbacks."""
    for variant in variants:
        for code in STAGE_CALL_CODES:
            STAGE_CALLS.labels(stage, variant, code)
        STAGE_RETRIES.labels(stage, variant)
    if "canary" in variants:
        STAGE_FALLBACKS.labels(stage)


def record_generation(model: str, images: int, device_seconds: float) -> None:
    """One finished generation: its images and what it cost on the devices (cost per image)."""
    IMAGES.labels(model).inc(images)
    GENERATION_DEVICE_SECONDS.labels(model).inc(device_seconds)


class GpuMemoryCollector(Collector):
    """CUDA memory per device, read at scrape time: what this process's caching allocator holds
    (allocated, reserved) and the device's capacity, so an alert can compare the two."""

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("diffmesh_gpu_memory_bytes", "CUDA memory held by this process",
                                  labels=["device", "kind"]),
                GaugeMetricFamily("diffmesh_gpu_memory_capacity_bytes", "total memory of the CUDA device",
                                  labels=["device"]))

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families()  # names only: a describe must not touch the device

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from diffmesh.runtime.device import gpu_memory

        held, capacity = self._families()
        for usage in gpu_memory():
            held.add_metric([usage.device, "allocated"], usage.allocated)
            held.add_metric([usage.device, "reserved"], usage.reserved)
            capacity.add_metric([usage.device], usage.total)
        yield held
        yield capacity


_gpu_registered = False


def start_metrics_server(host: str, port: int) -> None:
    """Serves /metrics (Prometheus text or OpenMetrics by Accept header) on its own port."""
    global _gpu_registered
    import torch

    if torch.cuda.is_available() and not _gpu_registered:
        REGISTRY.register(GpuMemoryCollector())
        _gpu_registered = True
    start_http_server(port, addr=host)
