"""OpenTelemetry tracing for every service, configured the standard way.

The SDK reads its own environment: OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (resource),
OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (sampler), OTEL_EXPORTER_OTLP_* (the OTLP/gRPC
exporter's endpoint, headers, TLS, timeout), OTEL_BSP_* (batching). OTEL_TRACES_EXPORTER picks
the exporter (otlp, console or none); unset, spans go over OTLP when an OTLP endpoint is
configured and nowhere otherwise. W3C trace context travels in gRPC metadata through the
opentelemetry-instrumentation-grpc interceptors on every server and client channel.
"""
from __future__ import annotations

import os
import socket
from contextlib import aclosing
from typing import Any, Awaitable, Callable

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.instrumentation.grpc._aio_server import (OpenTelemetryAioServerInterceptor,
                                                            _OpenTelemetryAioServicerContext)
from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_prefix
from opentelemetry.instrumentation.grpc.version import __version__ as _GRPC_INSTRUMENTATION_VERSION
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from diffmesh import __version__

TRACER_NAME = "diffmesh"
_provider: TracerProvider | None = None
# Probes and reflection are not worth a span each.
_UNTRACED = negate(any_of(service_prefix("grpc.health."), service_prefix("grpc.reflection.")))


def instance_id() -> str:
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}-{os.getpid()}"


def _exporter_names() -> list[str]:
    configured = os.environ.get("OTEL_TRACES_EXPORTER")
    if configured is not None:
        return [name.strip() for name in configured.split(",") if name.strip() and name.strip() != "none"]
    has_endpoint = any(os.environ.get(name) for name in
                       ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    return ["otlp"] if has_endpoint else []


def setup_tracing(service: str, variant: str = "stable") -> TracerProvider:
    """Installs the process's TracerProvider (once); the SDK applies the OTEL_* environment."""
    global _provider
    if _provider is not None:
        return _provider
    attributes: dict[str, Any] = {"service.version": __version__, "service.instance.id": instance_id(),
                                  "diffmesh.variant": variant}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in _exporter_names():
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r} (otlp, console, none)")
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flushes buffered spans (called after the drain, before the process exits)."""
    if _provider is not None:
        _provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME, __version__)


class _ServerInterceptor(OpenTelemetryAioServerInterceptor):
    """OpenTelemetry's aio server interceptor, with server streams that end cleanly.

    Its own stream wrapper is an async generator holding the server span and the attached
    context across each yield. grpc.aio iterates such a handler and, when the call ends while it
    is suspended at a yield (the caller cancels or disconnects, the deadline passes, or a send
    fails: a client refusing an oversized message), leaves it to the garbage collector, whose
    finalizer closes it later in a copy of whatever context runs then: the detach fails ("Failed
    to detach context"), attributes land on ended spans, and the handler's cleanup (metrics,
    cancelling stage calls) runs late. Here the stream is a coroutine that writes each message
    itself and closes the handler's generator (aclosing) inside the span, in the call's own task,
    however the call ends; a write that fails raises here, so the call is not counted as OK.
    (Overrides the pinned opentelemetry-instrumentation-grpc's `_intercept_aio_server_stream`,
    reusing its span helpers.)"""

    def _intercept_aio_server_stream(self, behavior: Callable, handler_call_details: grpc.HandlerCallDetails
                                     ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
        async def stream(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            with self._set_remote_context(context):
                with self._start_span(handler_call_details, context, set_status_on_exception=False) as span:
                    traced = _OpenTelemetryAioServicerContext(context, span)
                    try:
                        async with aclosing(behavior(request_or_iterator, traced)) as responses:
                            async for response in responses:
                                await context.write(response)
                    except Exception as error:
                        if type(error) is not Exception:  # as upstream: a bare Exception is an abort
                            span.record_exception(error)
                        raise
        return stream


def server_interceptor() -> Any:
    # The tracer upstream's aio_server_interceptor() makes (same scope name, version and schema).
    tracer = trace.get_tracer("opentelemetry.instrumentation.grpc", _GRPC_INSTRUMENTATION_VERSION,
                              schema_url="https://opentelemetry.io/schemas/1.11.0")
    return _ServerInterceptor(tracer, filter_=_UNTRACED)


def client_interceptors() -> list[Any]:
    return aio_client_interceptors(filter_=_UNTRACED)


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the active span, or None outside a valid span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def sampled_trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid and context.trace_flags.sampled else None


def traced(name: str, fn: Any, **attributes: Any) -> Any:
    """fn wrapped to run inside its own span (use on the compute thread, where the caller's
    trace context has been carried over)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with tracer().start_as_current_span(name, attributes=attributes):
            return fn(*args, **kwargs)

    return run


def annotate(**attributes: Any) -> None:
    """Adds attributes to the active span (the RPC's server span inside a servicer)."""
    trace.get_current_span().set_attributes({k: v for k, v in attributes.items() if v is not None})
