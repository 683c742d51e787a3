"""Prometheus metrics every service exposes on its own HTTP port (metrics_port).

Defined once per process; labels say which stage and method. Latency histograms carry the
trace id as an exemplar (visible in the OpenMetrics exposition), so a slow bucket links to a trace.
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, REGISTRY
from prometheus_client.registry import Collector

from diffmesh.runtime.telemetry import current_ids

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("diffmesh_grpc_requests", "gRPC requests handled, by method and status code",
                   ["stage", "method", "code"])
LATENCY = Histogram("diffmesh_grpc_request_duration_seconds", "gRPC request latency (server side)",
                    ["stage", "method"], buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("diffmesh_grpc_in_flight_requests", "gRPC requests being handled", ["stage", "method"])
PAYLOAD = Counter("diffmesh_grpc_payload_bytes", "serialized message bytes, by direction",
                  ["stage", "method", "direction"])
QUEUE_DEPTH = Gauge("diffmesh_queue_depth", "requests waiting for a compute slot", ["stage"])
QUEUE_WAIT = Histogram("diffmesh_queue_wait_seconds", "time waiting for a compute slot", ["stage"],
                       buckets=_LATENCY_BUCKETS)
COMPUTE = Histogram("diffmesh_compute_seconds", "time computing on the device per call", ["stage"],
                    buckets=_LATENCY_BUCKETS)
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


def exemplar() -> dict[str, str] | None:
    ids = current_ids()
    return {"trace_id": ids[0], "span_id": ids[1]} if ids else None


class _GpuMemoryCollector(Collector):
    def collect(self) -> Iterable[GaugeMetricFamily]:
        import torch

        family = GaugeMetricFamily("diffmesh_gpu_memory_bytes", "CUDA memory held by this process",
                                   labels=["device", "kind"])
        for index in range(torch.cuda.device_count()):
            family.add_metric([f"cuda:{index}", "allocated"], torch.cuda.memory_allocated(index))
            family.add_metric([f"cuda:{index}", "reserved"], torch.cuda.memory_reserved(index))
        yield family


_gpu_registered = False


def start_metrics_server(host: str, port: int) -> None:
    """Serves /metrics (Prometheus text or OpenMetrics by Accept header) on its own port."""
    global _gpu_registered
    import torch

    if torch.cuda.is_available() and not _gpu_registered:
        REGISTRY.register(_GpuMemoryCollector())
        _gpu_registered = True
    start_http_server(port, addr=host)
