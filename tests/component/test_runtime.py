"""The shared runtime on a real port: health lifecycle, load gating, message limits, admission,
error mapping, drain on stop, and per-request balancing across replicas."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from diffmesh.mesh import free_port
from diffmesh.proto.v1 import vae_pb2, vae_pb2_grpc
from diffmesh.runtime import codec
from diffmesh.runtime.channels import channel_options, open_channel
from diffmesh.runtime.config import ServerConfig
from diffmesh.errors import InvalidArgument
from diffmesh.runtime.server import Admission, serve

SERVICE = vae_pb2.DESCRIPTOR.services_by_name["Vae"].full_name


class EchoVae(vae_pb2_grpc.VaeServicer):
    """Decode echoes the latents back as pixels after `delay` seconds; Encode raises errors."""

    def __init__(self, admission: Admission, delay: float) -> None:
        self.admission = admission
        self.delay = delay
        self.calls = 0

    async def Decode(self, request, context):
        self.calls += 1
        async with self.admission.slot():
            await asyncio.sleep(self.delay)
        if request.model_id == "oversized":  # a reply over the server's own 4 MiB send limit
            return vae_pb2.DecodeResponse(pixels=codec.from_numpy(np.zeros((5, 1024, 1024), np.uint8)))
        array = codec.to_numpy(request.latents, "latents")
        return vae_pb2.DecodeResponse(pixels=codec.from_numpy(array))

    async def Encode(self, request, context):
        if request.model_id == "bad":
            raise InvalidArgument("model_id", request.model_id, "unknown model")
        raise RuntimeError("boom")


@dataclass
class FakeStage:
    delay: float = 0.0
    max_concurrency: int = 1
    max_queue: int = 1
    name: str = "vae"  # serves the vae stage's service (diffmesh.stages), with an echo servicer

    def __post_init__(self) -> None:
        self.loaded = threading.Event()
        self.release = threading.Event()
        self.finalized = False
        self.echo = EchoVae(Admission("fake", self.max_concurrency, self.max_queue), self.delay)

    def initialize(self) -> str:
        assert self.release.wait(30)  # "loading models" until the test lets go
        self.loaded.set()
        return "loaded"

    def servicer(self, loaded: str) -> EchoVae:
        assert loaded == "loaded"  # built from what initialize returned
        return self.echo

    async def finalize(self) -> None:
        self.finalized = True


class Running:
    """serve() in a background thread with its own event loop."""

    def __init__(self, stage: Any, config: ServerConfig | None = None, **settings) -> None:
        self.stage = stage
        self.port = free_port()
        base = config or ServerConfig(grace_period_s=settings.pop("grace_period_s", 5.0))
        self.config = dataclasses.replace(base, port=self.port, **settings)
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        while self.stop_event is None:
            time.sleep(0.01)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            self.stop_event = asyncio.Event()
            self.exit_code = await serve(self.stage, self.config, stop=self.stop_event)

        self.loop.run_until_complete(main())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)
        return self.exit_code


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def decode_request(shape=(1, 4, 8, 8), dtype=np.float32):
    return vae_pb2.DecodeRequest(latents=codec.from_numpy(np.ones(shape, dtype)))


def test_not_serving_until_models_load_then_serving():
    stage = FakeStage()
    running = Running(stage)
    try:
        wait_until(lambda: _health_or_none(running.address) is not None)
        assert health(running.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health(running.address, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                vae_pb2_grpc.VaeStub(channel).Decode(decode_request(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
        stage.release.set()
        wait_until(lambda: health(running.address) == health_pb2.HealthCheckResponse.SERVING)
        assert health(running.address, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    finally:
        stage.release.set()
        assert running.stop() == 0
    assert stage.finalized


def _health_or_none(address):
    try:
        return health(address)
    except grpc.RpcError:
        return None


@pytest.fixture
def serving():
    started = []

    def start(**kwargs):
        stage_kwargs = {k: kwargs.pop(k) for k in ("delay", "max_concurrency", "max_queue") if k in kwargs}
        stage = FakeStage(**stage_kwargs)
        stage.release.set()
        running = Running(stage, **kwargs)
        wait_until(lambda: _health_or_none(running.address) == health_pb2.HealthCheckResponse.SERVING)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def test_sdxl_1024_payloads_fit_the_message_limits(serving):
    running = serving()
    # Four 1024x1024 RGB images as uint8 (12.6 MB) each way: above gRPC's 4 MB default.
    with grpc.insecure_channel(running.address, options=channel_options(256)) as channel:
        reply = vae_pb2_grpc.VaeStub(channel).Decode(decode_request((4, 1024, 1024, 3), np.uint8), timeout=30)
    assert list(reply.pixels.shape) == [4, 1024, 1024, 3]


def test_messages_above_the_configured_limit_are_refused(serving):
    running = serving(max_message_mb=4)
    with grpc.insecure_channel(running.address, options=channel_options(256)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            vae_pb2_grpc.VaeStub(channel).Decode(decode_request((2, 1024, 1024, 3), np.uint8), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_errors_map_to_status_codes_and_the_server_survives(serving):
    running = serving()
    with grpc.insecure_channel(running.address) as channel:
        stub = vae_pb2_grpc.VaeStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Encode(vae_pb2.EncodeImageRequest(model_id="bad"), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "model_id: unknown model (got 'bad')"
        with pytest.raises(grpc.RpcError) as info:
            stub.Encode(vae_pb2.EncodeImageRequest(model_id="x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.INTERNAL and "RuntimeError" in info.value.details()
        bad = vae_pb2.DecodeRequest(latents=codec.from_numpy(np.ones((2, 2), np.float32)))
        bad.latents.data = b"123"
        with pytest.raises(grpc.RpcError) as info:
            stub.Decode(bad, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("latents.data")
        assert stub.Decode(decode_request(), timeout=5).pixels.shape == [1, 4, 8, 8]


def test_admission_control_rejects_beyond_the_queue(serving):
    running = serving(delay=1.0, max_concurrency=1, max_queue=1)
    with grpc.insecure_channel(running.address) as channel:
        stub = vae_pb2_grpc.VaeStub(channel)
        first = stub.Decode.future(decode_request(), timeout=10)
        wait_until(lambda: running.stage.echo.calls == 1)
        second = stub.Decode.future(decode_request(), timeout=10)  # waits in the queue
        wait_until(lambda: running.stage.echo.calls == 2)
        with pytest.raises(grpc.RpcError) as info:
            stub.Decode(decode_request(), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert first.result().pixels.shape and second.result().pixels.shape


def test_stop_drains_in_flight_calls_and_refuses_new_ones(serving):
    running = serving(delay=1.5, max_concurrency=4, max_queue=4, grace_period_s=10)
    with grpc.insecure_channel(running.address) as channel:
        stub = vae_pb2_grpc.VaeStub(channel)
        in_flight = stub.Decode.future(decode_request(), timeout=20)
        wait_until(lambda: running.stage.echo.calls == 1)
        stopper = threading.Thread(target=running.stop)
        stopper.start()
        assert in_flight.result().pixels.shape == [1, 4, 8, 8]  # finished, not cut off
        stopper.join(20)
    assert running.exit_code == 0
    assert _health_or_none(running.address) is None  # the port is closed


def test_round_robin_spreads_calls_over_every_replica(serving):
    replicas = [serving(), serving()]
    target = "ipv4:" + ",".join(r.address for r in replicas)

    async def call_many():
        channel = open_channel(target)
        stub = vae_pb2_grpc.VaeStub(channel)
        # Until both subchannels are connected the first ones take everything; pick_first would
        # never reach the second replica at all.
        for _ in range(100):
            if all(r.stage.echo.calls for r in replicas):
                break
            await stub.Decode(decode_request(), timeout=10)
        before = [r.stage.echo.calls for r in replicas]
        for _ in range(10):
            await stub.Decode(decode_request(), timeout=10)
        await channel.close()
        return [r.stage.echo.calls - b for r, b in zip(replicas, before)]

    assert asyncio.run(call_many()) == [5, 5]


def test_a_reply_the_transport_failed_to_send_is_not_counted_as_ok(serving, caplog):
    """The handler returns, then grpc's send fails (here: over the server's own send limit). The
    call is counted UNKNOWN, not OK, and grpc's ERROR traceback becomes one structured WARNING."""
    running = serving(max_message_mb=4)
    decode = "/diffmesh.v1.Vae/Decode"

    def count(code: str) -> float:
        return REGISTRY.get_sample_value("diffmesh_grpc_requests_total",
                                         {"stage": "vae", "method": decode, "code": code}) or 0.0

    with grpc.insecure_channel(running.address, options=channel_options(256)) as channel:
        stub = vae_pb2_grpc.VaeStub(channel)
        # The registry is the process's: other tests' calls count under the same labels.
        before = count("OK")
        stub.Decode(decode_request(), timeout=10)
        wait_until(lambda: count("OK") == before + 1)  # counted when grpc reports it done
        ok, unknown = count("OK"), count("UNKNOWN")
        with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as info:
            request = decode_request()
            request.model_id = "oversized"
            stub.Decode(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_until(lambda: count("UNKNOWN") == unknown + 1)
        assert count("OK") == ok
        stub.Decode(decode_request(), timeout=10)  # the server is fine, and counts OK again
        wait_until(lambda: count("OK") == ok + 1)
    grpc_records = [r for r in caplog.records if r.name == "grpc._cython.cygrpc"]
    assert [(r.levelname, r.getMessage(), r.fields) for r in grpc_records] == [
        ("WARNING", "reply not delivered: the transport failed to send it",
         {"method": decode, "code": "UNKNOWN", "counted": True})]
    assert grpc_records[0].exc_info is None
