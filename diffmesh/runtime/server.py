"""Server bootstrap every service runs: grpc.aio, health, reflection, errors, admission, drain.

A stage implements the `Stage` lifecycle (Triton-style): `initialize` loads models (the health
service says NOT_SERVING until it returns), `register` adds the stage's servicers, `finalize`
releases resources after the drain. `run_stage` does the rest, identically for every service.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, Sequence, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffmesh.runtime import errors
from diffmesh.runtime.channels import channel_options
from diffmesh.runtime.config import ConfigError, ServerConfig, load_config
from diffmesh.runtime.device import configure_threads
from diffmesh.runtime.logs import log_event, setup_logging

log = logging.getLogger("diffmesh.server")
T = TypeVar("T")
C = TypeVar("C", bound=ServerConfig)

# Services that answer even while models load (probes and grpcurl must work during start-up).
_ALWAYS_ON = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
              "grpc.reflection.v1.ServerReflection")


class Stage(Protocol):
    name: str

    def service_names(self) -> Sequence[str]:
        """Fully-qualified gRPC service names the stage registers (for health and reflection)."""

    def initialize(self) -> None:
        """Loads models; runs in a worker thread before the stage reports SERVING."""

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the stage's servicers to the server."""

    def finalize(self) -> None:
        """Releases resources after in-flight calls have drained."""


class Admission:
    """Bounds concurrent compute and the queue in front of it (RESOURCE_EXHAUSTED beyond).

    Compute runs on a dedicated thread pool so the event loop keeps answering health checks,
    streaming progress and noticing cancellations while a model runs.
    """

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self._slots = asyncio.Semaphore(max_concurrency)
        self._max_waiting = max_queue
        self._waiting = 0
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="compute")

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise errors.ResourceExhausted(
                f"stage at capacity: {self._waiting} requests already queued (max_queue)")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    def submit(self, fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        """Starts fn on the compute pool now; await the returned future for its result."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


class _ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns MeshError into its status code and any other exception into INTERNAL (logged), so a
    bad request never takes the process down; also answers UNAVAILABLE until models are loaded."""

    def __init__(self) -> None:
        self.ready = False

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.lstrip("/").startswith(_ALWAYS_ON):
            return handler
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    async def _fail(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        if isinstance(exc, errors.MeshError):
            code = getattr(grpc.StatusCode, exc.code)
            level = logging.WARNING if code == grpc.StatusCode.INVALID_ARGUMENT else logging.ERROR
            log_event(log, "request failed", level, method=method, code=exc.code, error=str(exc))
            await context.abort(code, str(exc))
        log.exception("unexpected error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")

    def _check_ready(self) -> None:
        if not self.ready:
            raise errors.Unavailable("models are still loading")

    def _wrap_unary(self, behavior: Callable, method: str) -> Callable:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                self._check_ready()
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point is to catch everything
                await self._fail(context, exc, method)
        return handle

    def _wrap_stream(self, behavior: Callable, method: str) -> Callable:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                self._check_ready()
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, exc, method)
        return handle


async def serve(stage: Stage, config: ServerConfig, stop: asyncio.Event | None = None,
                on_bound: Callable[[int], None] | None = None) -> int:
    """Runs a stage until SIGTERM/SIGINT (or until `stop` is set, for in-process use); returns
    the process exit code."""
    interceptor = _ErrorInterceptor()
    server = grpc.aio.server(interceptors=[interceptor],
                             options=channel_options(config.max_message_mb))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    stage.register(server)
    names = list(stage.service_names())
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    bound = server.add_insecure_port(f"{config.host}:{config.port}")
    if bound == 0:
        log_event(log, "cannot bind", logging.ERROR, host=config.host, port=config.port)
        return 1
    await server.start()
    log_event(log, "listening", stage=stage.name, host=config.host, port=bound)

    if on_bound is not None:
        on_bound(bound)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    try:
        await asyncio.to_thread(stage.initialize)
    except Exception as exc:  # start-up errors (a missing model) end the process clearly
        log_event(log, "start-up failed", logging.ERROR, stage=stage.name, error=str(exc))
        print(f"diffmesh {stage.name}: start-up failed: {exc}", file=sys.stderr)
        await server.stop(0)
        return 1
    interceptor.ready = True
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log_event(log, "serving", stage=stage.name, port=bound)

    await stop.wait()
    log_event(log, "draining", stage=stage.name, grace_s=config.grace_period_s)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_period_s)
    stage.finalize()
    log_event(log, "stopped", stage=stage.name)
    return 0


def run_stage(make_stage: Callable[[C], Stage], config_cls: type[C], argv: Sequence[str],
              prog: str) -> int:
    """Entry point shared by every service: config, logging, threads, then serve."""
    try:
        config = load_config(config_cls, argv, prog=prog)
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(prog, config.log_level)
    configure_threads(config.torch_threads)
    return asyncio.run(serve(make_stage(config), config))
