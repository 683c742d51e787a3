"""Server bootstrap every service runs: grpc.aio, health, reflection, tracing, metrics, errors,
admission, drain.

A stage implements the `Stage` lifecycle (Triton's: initialize, execute, finalize):
`initialize` loads models in a worker thread and returns what it loaded; `servicer` builds the
stage's servicer from that (on the event loop: channels made there belong to it), so a servicer
is complete when built; `finalize` releases resources after the drain. The port binds before
`initialize` starts and health says NOT_SERVING until the servicer exists, then SERVING; calls
that arrive meanwhile get UNAVAILABLE. `run_stage` does the rest, identically for every service.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, Sequence, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from diffmesh.error_details import trailing_metadata
from diffmesh.proto.v1 import common_pb2
from diffmesh.stages import STAGES
from diffmesh import errors
from diffmesh.runtime import delivery, metrics, reflection, telemetry
from diffmesh.runtime.admission import INTERACTIVE, PriorityGate
from diffmesh.runtime.batching import SharedCalls
from diffmesh.runtime.channels import channel_options
from diffmesh.runtime.config import ConfigError, ServerConfig, load_config
from diffmesh.runtime.device import configure_threads, keep_freed_memory
from diffmesh.runtime.logs import json_line, log_event, setup_logging
from diffmesh.runtime.tls import load_tls

log = logging.getLogger("diffmesh.server")
T = TypeVar("T")
C = TypeVar("C", bound=ServerConfig)

# Services that answer even while models load (probes and grpcurl must work during start-up).
_ALWAYS_ON = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
              "grpc.reflection.v1.ServerReflection")
# After the grace period, how long abandoned calls get to send their UNAVAILABLE before grpc
# cancels whatever is left.
_ABANDON_S = 2.0


def request_class(method: str) -> type[Message] | None:
    """The request message class of a '/package.Service/Method' path (None: not a known method)."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service).methods_by_name.get(name)
    except KeyError:
        return None
    return None if descriptor is None else message_factory.GetMessageClass(descriptor.input_type)


def parse_request(message_class: type[Message] | None, request: Any) -> Any:
    """A request message from the bytes grpc hands over (the runtime registers no request
    deserializer: grpc would answer a deserializer's exception with UNKNOWN). Bytes that are not a
    valid message, a string field that is not UTF-8 included, are an InvalidArgument naming the
    message type; a message passes through."""
    if message_class is None or not isinstance(request, bytes):
        return request
    try:
        return message_class.FromString(request)
    except DecodeError as exc:
        detail = str(exc).rpartition(": ")[2] or type(exc).__name__  # "String field had bad UTF-8"
        raise errors.InvalidArgument("request", f"{len(request)} bytes",
                                     f"not a valid {message_class.DESCRIPTOR.full_name} message: {detail}") from None


class Stage(Protocol):
    name: str  # its entry in the stage table (diffmesh.stages): which gRPC service it serves

    def initialize(self) -> Any:
        """Loads models; runs in a worker thread before the stage reports SERVING. Returns what
        the servicer is built from."""

    def servicer(self, loaded: Any) -> Any:
        """The stage's servicer (an object with one async method per RPC of its service), built
        from what initialize returned."""

    async def finalize(self) -> None:
        """Releases resources after in-flight calls have drained."""


class _DeferredService:
    """A service's method handlers, registered before the server starts, that call the servicer
    once it exists (grpc cannot add services to a started server, and the port must bind before
    models load so probes see NOT_SERVING rather than a refused connection). Built from the
    service's proto descriptor, so no stage registers anything by hand."""

    def __init__(self, full_name: str) -> None:
        self.descriptor = descriptor_pool.Default().FindServiceByName(full_name)
        self.target: Any = None

    def _method(self, method: Any) -> grpc.RpcMethodHandler:
        name = method.name
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        # Bytes in (parse_request: the interceptor parses them first, inside its error mapping).
        codecs = dict(request_deserializer=None, response_serializer=response.SerializeToString)
        if method.server_streaming:
            async def stream(message: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                # aclosing: a stream that ends early closes the servicer's generator now, in this
                # call's task (an abandoned `async for` would leave it to the garbage collector).
                async with aclosing(getattr(self.target, name)(parse_request(request, message), context)) as items:
                    async for item in items:
                        yield item
            return grpc.unary_stream_rpc_method_handler(stream, **codecs)

        async def unary(message: Any, context: grpc.aio.ServicerContext) -> Any:
            return await getattr(self.target, name)(parse_request(request, message), context)
        return grpc.unary_unary_rpc_method_handler(unary, **codecs)

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {method.name: self._method(method) for method in self.descriptor.methods}
        return grpc.method_handlers_generic_handler(self.descriptor.full_name, methods)


@dataclass
class Usage:
    """What one call cost inside the stage: filled in by Admission, reported in the response."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_wait_ms: float = 0.0

    def share(self, shared: "SharedCalls") -> None:
        """Charges model calls shared with other requests by this call's share only (once, after
        its compute finished): compute_ms counted the whole time inside them, and the waits."""
        self.compute_ms = max(self.compute_ms - shared.blocked_ms + shared.device_ms, 0.0)
        self.batch_wait_ms += shared.wait_ms


def _shutting_down(stage: str) -> errors.MeshError:
    return errors.Unavailable(f"{stage} is shutting down: not started here; retry on another replica")


class Admission:
    """Bounds concurrent compute and the queue in front of it (RESOURCE_EXHAUSTED beyond, with a
    retry hint), and measures each call's queue wait and compute time. The queue is a
    PriorityGate: a call's priority class (the caller's, sent by the orchestrator as
    `diffmesh-priority`) lets interactive calls overtake batch ones, batch never starved. A
    draining server sheds the queue (`shed_queues`): UNAVAILABLE at once, retried elsewhere.

    Compute runs on a dedicated thread pool so the event loop keeps answering health checks,
    streaming progress and noticing cancellations while a model runs.
    """

    # Compute functions running right now, in every Admission of the process: a thread running
    # torch cannot be interrupted, so a drain that abandons calls exits the process past them.
    _running = 0
    _running_lock = threading.Lock()

    @classmethod
    def computing(cls) -> int:
        with cls._running_lock:
            return cls._running

    @classmethod
    def _count(cls, delta: int) -> None:
        with cls._running_lock:
            cls._running += delta

    def __init__(self, stage: str, max_concurrency: int, max_queue: int) -> None:
        self.stage = stage
        self.device = "cpu"
        self.variant = "stable"
        depth = metrics.QUEUE_DEPTH.labels(stage)
        self._gate = PriorityGate(stage, max_concurrency, max_queue,
                                  on_depth=lambda waiting: depth.set(sum(waiting.values())))
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="compute")
        metrics.preinitialize_admission(stage, max_concurrency, max_queue)

    @staticmethod
    def shed_queues(stage: str) -> int:
        """Every admission queue of the process (the stage's, the orchestrator's callers') answers
        its waiting calls, and later ones, UNAVAILABLE; calls already running go on. Returns how
        many were shed. For a draining server: it is the whole process's."""
        return PriorityGate.shed_all(lambda: _shutting_down(stage))

    def shed_queue(self) -> int:
        """shed_queues for this Admission's queue alone."""
        return self._gate.shed(lambda: _shutting_down(self.stage))

    @asynccontextmanager
    async def slot(self, priority: str = INTERACTIVE) -> AsyncIterator[Usage]:
        usage = Usage()
        start = time.perf_counter()
        ticket = self._gate.enter(priority)  # ResourceExhausted (with a retry hint) when the queue is full
        try:
            with telemetry.tracer().start_as_current_span("queue_wait", attributes={"diffmesh.priority": priority}):
                await ticket.wait()
            usage.queue_ms = (time.perf_counter() - start) * 1000.0
            metrics.QUEUE_WAIT.labels(self.stage).observe(usage.queue_ms / 1000.0)
            yield usage
        finally:
            ticket.release()

    def submit(self, usage: Usage, fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        """Starts fn on the compute pool now, in the caller's trace context; adds its run time to
        usage.compute_ms. Await the returned future for the result."""
        context = contextvars.copy_context()

        def timed() -> T:
            start = time.perf_counter()
            Admission._count(1)
            try:
                return context.run(fn, *args)
            finally:
                Admission._count(-1)
                elapsed = time.perf_counter() - start
                usage.compute_ms += elapsed * 1000.0
                metrics.COMPUTE.labels(self.stage).observe(elapsed)

        return asyncio.get_running_loop().run_in_executor(self.executor, timed)

    def report(self, usage: Usage) -> common_pb2.StageUsage:
        return common_pb2.StageUsage(compute_ms=usage.compute_ms, queue_ms=usage.queue_ms,
                                     batch_wait_ms=usage.batch_wait_ms, device=self.device,
                                     variant=self.variant, instance_id=telemetry.instance_id())


@dataclass
class _Call:
    bytes_out: int = 0
    request: Any = None  # the parsed request message
    code: str = ""       # how the handler ended ("": it never started: the readiness gate refused it)
    undelivered: bool = False  # the transport failed to send the reply (runtime.delivery)
    settled: int = 0     # of the two ends it is counted after: the handler's and grpc's


def _parsing_first(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A library service's handler (health, reflection) that parses its requests itself, so
    bytes that are not a valid message get INVALID_ARGUMENT rather than grpc's UNKNOWN."""
    deserialize, message_class = handler.request_deserializer, request_class(method)
    if deserialize is None or message_class is None:
        return handler
    name = message_class.DESCRIPTOR.full_name

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return deserialize(raw)  # the library's own class (v1 reflection is served by v1alpha's)
        except DecodeError as exc:
            detail = str(exc).rpartition(": ")[2] or type(exc).__name__
            error = errors.InvalidArgument("request", f"{len(raw)} bytes", f"not a valid {name} message: {detail}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error),
                                trailing_metadata(error.code, str(error), error.violations))

    codecs = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await handler.unary_unary(await parse(raw, context), context)
        return grpc.unary_unary_rpc_method_handler(unary, **codecs)
    if handler.unary_stream:
        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in handler.unary_stream(await parse(raw, context), context):
                yield item
        return grpc.unary_stream_rpc_method_handler(unary_stream, **codecs)
    if handler.stream_stream:
        async def stream_stream(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async def parsed() -> AsyncIterator[Any]:
                async for raw in raws:
                    yield await parse(raw, context)
            async for item in handler.stream_stream(parsed(), context):
                yield item
        return grpc.stream_stream_rpc_method_handler(stream_stream, **codecs)
    return handler


class _ParsingFirst(grpc.aio.ServerInterceptor):
    """For the health-only probe port: malformed requests get INVALID_ARGUMENT there too."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        return handler if handler is None else _parsing_first(handler, details.method)


class _ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Per call, for every stage's own services: answers UNAVAILABLE until models are loaded;
    turns MeshError into its status code and any other exception into INTERNAL (logged once), so
    a bad request never takes the process down; records request metrics and payload sizes."""

    def __init__(self, stage: str, variant: str) -> None:
        self.stage = stage
        self.variant = variant
        self.ready = False
        self._calls: set[asyncio.Task] = set()  # in flight: each call's handler task
        self._abandoning = False

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        if details.method.lstrip("/").startswith(_ALWAYS_ON):
            return _parsing_first(handler, details.method)
        method = details.method
        message_class = request_class(method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, message_class),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, message_class),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _begin(self, method: str, request: Any) -> float:
        if not self.ready:
            raise errors.Unavailable(f"{self.stage}: models are still loading")
        size = len(request) if isinstance(request, bytes) else request.ByteSize()  # the wire size either way
        metrics.IN_FLIGHT.labels(self.stage, method).inc()
        metrics.PAYLOAD.labels(self.stage, method, "in").inc(size)
        span = trace.get_current_span()
        span.set_attribute("diffmesh.variant", self.variant)
        span.set_attribute("diffmesh.payload.bytes_in", size)
        return time.perf_counter()

    def _end(self, method: str, start: float, code: str, bytes_out: int) -> None:
        elapsed = time.perf_counter() - start
        metrics.IN_FLIGHT.labels(self.stage, method).dec()
        metrics.LATENCY.labels(self.stage, method).observe(elapsed, exemplar=metrics.exemplar())
        metrics.PAYLOAD.labels(self.stage, method, "out").inc(bytes_out)
        trace.get_current_span().set_attribute("diffmesh.payload.bytes_out", bytes_out)

    def _settle(self, method: str, call: _Call) -> None:
        call.settled += 1
        if call.settled == 2 and call.code:
            code = delivery.UNDELIVERED_CODE if call.undelivered else call.code
            metrics.REQUESTS.labels(self.stage, method, code).inc()

    async def _fail(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> str:
        if isinstance(exc, errors.MeshError):
            code = getattr(grpc.StatusCode, exc.code)
            level = logging.WARNING if code in _CALLER_CODES else logging.ERROR
            log_event(log, "request failed", level, method=method, code=exc.code, error=str(exc))
            await context.abort(code, str(exc), error_trailers(exc))
        log.exception("unexpected error in %s", method, extra={"fields": {"method": method, "code": "INTERNAL"}})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")

    @staticmethod
    def _code_of(exc: BaseException, context: grpc.aio.ServicerContext | None = None) -> str:
        if isinstance(exc, errors.MeshError):
            return exc.code
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # Either the deadline passed or the caller went away; grpc cancels the handler for both.
            remaining = context.time_remaining() if context is not None else None
            return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        return "INTERNAL"

    async def drain(self, grace_s: float) -> int:
        """Waits up to grace_s for the calls in flight; then abandons the rest: each is answered
        UNAVAILABLE (so its caller retries on another replica) and its compute is left running for
        the process exit to end. Returns how many calls were abandoned."""
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=grace_s)
        left = [task for task in self._calls if not task.done()]
        if left:
            self._abandoning = True
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=_ABANDON_S)
        return len(left)

    @asynccontextmanager
    async def _observed(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                        message_class: type[Message] | None = None) -> AsyncIterator[_Call]:
        """Around one call: the readiness gate, request parsing, error mapping, metrics and
        payload attributes."""
        start, code, call = None, "OK", _Call()
        task = asyncio.current_task()
        self._calls.add(task)
        delivery.watch(call)
        # Counted when both the handler has ended and grpc says the call is done, whichever is
        # last: a unary reply, and a stream's status, are sent after the handler is through, and a
        # stream whose write failed is closed later still. So a reply whose send failed is counted
        # undelivered, not as what the handler returned.
        context.add_done_callback(lambda _context: self._settle(method, call))
        try:
            start = self._begin(method, request)
            call.request = parse_request(message_class, request)
            yield call
        except grpc.aio.AbortError:
            code = "ABORTED_BY_HANDLER"
            raise
        except asyncio.CancelledError:
            if not self._abandoning:
                code = self._code_of(asyncio.CancelledError(), context)  # the deadline, or the caller left
                raise
            code = "UNAVAILABLE"  # abandoned by the drain: the caller retries elsewhere
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{self.stage} is shutting down: the call outlived the grace period; retry")
        except BaseException as exc:
            code = self._code_of(exc, context)
            if isinstance(exc, Exception):
                await self._fail(context, exc, method)
            raise
        finally:
            self._calls.discard(task)
            if start is not None:
                call.code = code
                self._end(method, start, code, call.bytes_out)
            self._settle(method, call)

    def _wrap_unary(self, behavior: Callable, method: str, message_class: type[Message] | None) -> Callable:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._observed(method, request, context, message_class) as call:
                response = await behavior(call.request, context)
                call.bytes_out = response.ByteSize()
                return response
        return handle

    def _wrap_stream(self, behavior: Callable, method: str, message_class: type[Message] | None) -> Callable:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._observed(method, request, context, message_class) as call, \
                    aclosing(behavior(call.request, context)) as items:  # closed in this task if the call ends early
                async for item in items:
                    call.bytes_out += item.ByteSize()
                    yield item
        return handle


# Codes that say the caller must change something (the request, its credentials): logged as
# WARNING, the server itself is fine.
_CALLER_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# gRPC's standard retry hint (A6 retry design): how long the client should wait before retrying.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def error_trailers(exc: errors.MeshError) -> tuple[tuple[str, str | bytes], ...]:
    """A MeshError's trailing metadata: the structured status details, and for a
    ResourceExhausted that knows when to come back, grpc-retry-pushback-ms."""
    trailers: tuple[tuple[str, str | bytes], ...] = trailing_metadata(exc.code, str(exc), exc.violations)
    retry_after_ms = getattr(exc, "retry_after_ms", None)
    if retry_after_ms is not None:
        trailers += ((RETRY_PUSHBACK_KEY, str(int(retry_after_ms))),)
    return trailers


def _port_in_use(host: str, port: int) -> str | None:
    """Why host:port cannot be bound (None: it can; port 0 always can). Checked before binding, so
    that a taken port is one log line: grpc's own failure comes after a C-core log line, and
    prometheus_client's as a traceback."""
    if not port:
        return None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as exc:  # socket.gaierror included
        return exc.strerror or str(exc)
    return None


def _cannot_bind(stage: str, setting_name: str, host: str, port: int, error: str) -> int:
    log_event(log, "cannot bind", logging.ERROR, stage=stage, setting=setting_name, host=host, port=port,
              error=error)
    return 1


async def serve(stage: Stage, config: ServerConfig, stop: asyncio.Event | None = None,
                on_bound: Callable[[int], None] | None = None) -> int:
    """Runs a stage until SIGTERM/SIGINT (or until `stop` is set, for in-process use); returns
    the process exit code."""
    try:
        tls = load_tls(config)
    except ConfigError as exc:
        log_event(log, "start-up failed", logging.ERROR, stage=stage.name, error=str(exc))
        return 1
    delivery.install()
    interceptor = _ServiceInterceptor(stage.name, config.variant)
    # The tracing interceptor goes first so its server span encloses the error mapping and sees
    # the final status code.
    # No SO_REUSEPORT (grpc's default): a second server on a taken port must fail, not share it.
    options = channel_options(config.max_message_mb) + [("grpc.so_reuseport", 0)]
    if config.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(config.grace_period_s * 1000))]
    server = grpc.aio.server(interceptors=[telemetry.server_interceptor(), interceptor], options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service = _DeferredService(STAGES[stage.name].service)
    server.add_generic_rpc_handlers((service.handler(),))
    names = [service.descriptor.full_name]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    metrics.READY.labels(stage.name).set(0)
    metrics.preinitialize_service(stage.name, service.descriptor)

    ports = {"port": config.port, "health_port": config.health_port, "metrics_port": config.metrics_port}
    for setting_name, port in ports.items():
        error = _port_in_use(config.host, port)
        if error:
            return _cannot_bind(stage.name, setting_name, config.host, port, error)
    address = f"{config.host}:{config.port}"
    try:
        bound = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError:  # taken since the check
        bound = 0
    if bound == 0:
        return _cannot_bind(stage.name, "port", config.host, config.port, "address already in use")
    await server.start()
    health_server = None
    if config.health_port:
        # Probes only: this port serves nothing but health, so it can stay plaintext under mTLS.
        health_server = grpc.aio.server(interceptors=[_ParsingFirst()], options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        try:
            health_bound = health_server.add_insecure_port(f"{config.host}:{config.health_port}")
        except RuntimeError:
            health_bound = 0
        if health_bound == 0:
            await server.stop(0)
            return _cannot_bind(stage.name, "health_port", config.host, config.health_port, "address already in use")
        await health_server.start()
    if config.metrics_port:
        try:
            metrics.start_metrics_server(config.host, config.metrics_port)
        except OSError as exc:
            await server.stop(0)
            if health_server is not None:
                await health_server.stop(0)
            return _cannot_bind(stage.name, "metrics_port", config.host, config.metrics_port, exc.strerror or str(exc))
    log_event(log, "listening", stage=stage.name, host=config.host, port=bound, metrics_port=config.metrics_port)
    if on_bound is not None:
        on_bound(bound)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    try:
        loaded = await asyncio.to_thread(stage.initialize)
        service.target = stage.servicer(loaded)
    except Exception as exc:  # start-up errors (a missing model) end the process clearly
        log_event(log, "start-up failed", logging.ERROR, stage=stage.name, error=str(exc))
        await server.stop(0)
        if health_server is not None:
            await health_server.stop(0)
        return 1
    interceptor.ready = True
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics.READY.labels(stage.name).set(1)
    log_event(log, "serving", stage=stage.name, port=bound)

    await stop.wait()
    log_event(log, "draining", stage=stage.name, grace_s=config.grace_period_s,
              queued_calls_shed=Admission.shed_queues(stage.name))
    await health_servicer.enter_graceful_shutdown()
    metrics.READY.labels(stage.name).set(0)
    # grpc refuses new calls from here on. Its own deadline (cancelling what is left, which callers
    # would see as CANCELLED) is only a backstop: at the end of the grace period the interceptor
    # answers what is still in flight UNAVAILABLE, so that callers retry on another replica.
    stopping = asyncio.ensure_future(server.stop(config.grace_period_s + _ABANDON_S))
    abandoned = await interceptor.drain(config.grace_period_s)
    await stopping
    if abandoned:
        log_event(log, "drain timed out", logging.WARNING, stage=stage.name, grace_s=config.grace_period_s,
                  abandoned_calls=abandoned, compute_running=Admission.computing())
    if health_server is not None:
        await health_server.stop(0)
    await stage.finalize()
    log_event(log, "stopped", stage=stage.name)
    return 0


def run_stage(make_stage: Callable[[C], Stage], config_cls: type[C], argv: Sequence[str],
              prog: str | None = None) -> int:
    """Entry point shared by every service: config, logging, tracing, threads, then serve.
    make_stage is the stage class; its `name` picks its stage table entry (and program name)."""
    prog = prog or STAGES[make_stage.name].program
    try:
        config = load_config(config_cls, argv, prog=prog)
    except ConfigError as exc:
        print(json_line(prog, "ERROR", f"{prog}: configuration error: {exc}"), file=sys.stderr)
        return 2
    setup_logging(prog, config.log_level)
    try:
        telemetry.setup_tracing(prog, config.variant)
    except ValueError as exc:
        print(json_line(prog, "ERROR", f"{prog}: configuration error: {exc}"), file=sys.stderr)
        return 2
    configure_threads(config.torch_threads)
    if config.keep_freed_memory:
        keep_freed_memory()
    try:
        code = asyncio.run(serve(make_stage(config), config))
    finally:
        telemetry.shutdown_tracing()
    if Admission.computing():
        # The drain abandoned calls whose compute still runs: a thread inside torch cannot be
        # interrupted, and the interpreter would wait for it at exit (ThreadPoolExecutor joins
        # its workers), so shutdown would last as long as the longest call. Exit past it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
