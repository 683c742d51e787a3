"""A minimal OTLP/gRPC trace receiver for development and tests: collects the spans every
service exports, so `make demo` can show a request's trace without a collector deployed.
(Production points OTEL_EXPORTER_OTLP_ENDPOINT at a real OpenTelemetry Collector.)"""
from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass
class CollectedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class SpanCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._spans: list[CollectedSpan] = []
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any):
        collected = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    collected.append(CollectedSpan(
                        service=str(resource.get("service.name", "")), name=span.name,
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), kind=span.kind,
                        start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                        attributes={kv.key: _value(kv.value) for kv in span.attributes}, resource=resource,
                        events=[{"name": e.name, "time_ns": e.time_unix_nano,
                                 "attributes": {kv.key: _value(kv.value) for kv in e.attributes}}
                                for e in span.events]))
        with self._lock:
            self._spans.extend(collected)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str | None = None) -> list[CollectedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(self, trace_id: str, services: set[str], timeout: float = 10.0,
                 settle: float = 0.3) -> list[CollectedSpan]:
        """Spans of one trace once every named service has exported some (plus a short settle)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if services <= {s.service for s in self.spans(trace_id)}:
                time.sleep(settle)
                return self.spans(trace_id)
            time.sleep(0.05)
        return self.spans(trace_id)


class Receiver:
    """The collector on a loopback port; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self, port: int = 0) -> None:
        self.collector = SpanCollector()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self.collector, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exporter_env(self) -> dict[str, str]:
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "200"}

    def stop(self) -> None:
        self._server.stop(0)


def span_tree(spans: list[CollectedSpan]) -> list[tuple[int, CollectedSpan]]:
    """(depth, span) in depth-first start order; spans whose parent is absent are roots."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[CollectedSpan]] = {}
    for span in spans:
        children.setdefault(span.parent_span_id if span.parent_span_id in ids else "", []).append(span)
    ordered: list[tuple[int, CollectedSpan]] = []

    def visit(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            ordered.append((depth, span))
            visit(span.span_id, depth + 1)

    visit("", 0)
    return ordered


def format_waterfall(spans: list[CollectedSpan], width: int = 40) -> str:
    if not spans:
        return "(no spans)"
    origin = min(s.start_ns for s in spans)
    total = max(s.end_ns for s in spans) - origin or 1
    lines = [f"{'service':<24}{'span':<44}{'start ms':>9}{'dur ms':>9}  timeline"]
    for depth, span in span_tree(spans):
        begin = int((span.start_ns - origin) / total * width)
        length = max(1, int((span.end_ns - span.start_ns) / total * width))
        bar = " " * begin + "█" * min(length, width - begin)
        name = ("  " * depth + span.name)[:43]
        lines.append(f"{span.service[:23]:<24}{name:<44}{(span.start_ns - origin) / 1e6:>9.1f}"
                     f"{span.duration_ms:>9.1f}  |{bar:<{width}}|")
    return "\n".join(lines)


def write_spans(spans: list[CollectedSpan], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(s) for s in spans], indent=1))
