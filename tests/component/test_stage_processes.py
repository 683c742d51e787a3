"""Stage processes: SIGTERM drains in-flight work and exits 0; a missing or broken model is a
clear start-up error naming the path; a taken port (any of the three) is one error line."""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import re
import sys
import time
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from diffmesh.client import wait_for_serving
from diffmesh.mesh import free_port
from tests.component.stage_calls import denoise_request
from diffmesh.models.registry import write_registry
from diffmesh.proto.v1 import denoiser_pb2_grpc


def start(stage: str, registry: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", f"services.{stage}", "--port", str(port), "--registry",
                             str(registry), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"127.0.0.1:{port}"


def test_sigterm_finishes_the_in_flight_loop_then_exits_0(registry):
    encoder, encoder_address = start("text_encoder", registry, "--models", "tiny-sdxl")
    denoiser, address = start("denoiser", registry, "--models", "tiny-sdxl", "--grace-period-s", "30")
    try:
        wait_for_serving(encoder_address, 60)
        wait_for_serving(address, 60)
        request = denoise_request(encoder_address, "tiny-sdxl", scheduler="euler", steps=60, guidance_scale=5.0,
                                  width=128, height=128, seeds=[1])
        with grpc.insecure_channel(address) as channel:
            stream = denoiser_pb2_grpc.DenoiserStub(channel).Denoise(request, timeout=60)
            first = next(stream)
            assert first.progress.step == 1
            denoiser.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert rest[-1].HasField("result")
        assert [e.progress.step for e in rest[:-1]][-1] == 60
        assert list(rest[-1].result.latents.shape) == [1, 4, 16, 16]
        assert denoiser.wait(30) == 0
        output = denoiser.stdout.read()
        assert '"draining"' in output and '"stopped"' in output
    finally:
        for proc in (encoder, denoiser):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_missing_model_directory_is_a_start_up_error_naming_the_path(tmp_path):
    registry = write_registry(tmp_path / "registry.yaml", {"ghost": tmp_path / "no-such-model"})
    proc, _ = start("denoiser", registry)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "start-up failed" in output and str(tmp_path / "no-such-model") in output


@pytest.mark.parametrize("stage,component", [("denoiser", "unet"), ("vae", "vae"), ("text_encoder", "text_encoder")])
def test_broken_model_directory_is_a_start_up_error(tiny_models, tmp_path, stage, component):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models / "tiny-sd15", broken)
    shutil.rmtree(broken / component)
    registry = write_registry(tmp_path / "registry.yaml", {"broken": broken})
    proc, _ = start(stage, registry)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert str(broken / component) in output


def test_bad_configuration_exits_2_naming_the_setting(registry):
    proc, _ = start("vae", registry, "--max-batch", "-3")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "max_batch" in output and "-3" in output


# --- a port conflict at start-up: one line naming the setting, exit code 1 ------------------------

@contextlib.contextmanager
def taken_port(holder: str) -> Iterator[int]:
    """A port held by a plain listening socket, or by a gRPC server (which binds with SO_REUSEPORT:
    a second server on its port would silently share it unless the service refuses that)."""
    if holder == "grpc":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield port
        finally:
            server.stop(0)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("setting,holder", [("port", "socket"), ("port", "grpc"), ("health_port", "socket"),
                                            ("metrics_port", "socket")])
def test_a_taken_port_is_one_error_line_and_exit_code_1(registry, setting, holder):
    with taken_port(holder) as port:
        ports = {"port": free_port(), "health_port": 0, "metrics_port": 0, setting: port}
        flags = [arg for name, value in ports.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
        proc = subprocess.Popen([sys.executable, "-m", "services.vae", "--registry", str(registry), *flags],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output
    lines = output.splitlines()
    entries = [json.loads(line) for line in lines]  # every line is a JSON log entry: no traceback
    errors = [entry for entry in entries if entry["level"] == "ERROR"]
    assert len(errors) == 1, output
    assert errors[0]["msg"] == "cannot bind" and errors[0]["setting"] == setting and errors[0]["port"] == port
    assert "in use" in errors[0]["error"].lower()
    assert not any(entry["msg"] == "serving" for entry in entries)  # it never came up


def _queue_depth(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return float(re.search(r'^diffmesh_queue_depth\{stage="denoiser"\} (\S+)$', text, re.M).group(1))


def test_sigterm_answers_queued_calls_unavailable_at_once_and_finishes_the_running_one(registry):
    metrics_port = free_port()
    encoder, encoder_address = start("text_encoder", registry, "--models", "tiny-sdxl")
    denoiser, address = start("denoiser", registry, "--models", "tiny-sdxl", "--grace-period-s", "30",
                              "--max-concurrency", "1", "--metrics-port", str(metrics_port))
    try:
        wait_for_serving(encoder_address, 60)
        wait_for_serving(address, 60)
        request = denoise_request(encoder_address, "tiny-sdxl", scheduler="euler", steps=60, guidance_scale=5.0,
                                  width=128, height=128, seeds=[1])
        with grpc.insecure_channel(address) as channel, futures.ThreadPoolExecutor(1) as pool:
            stub = denoiser_pb2_grpc.DenoiserStub(channel)
            running = stub.Denoise(request, timeout=60)
            assert next(running).progress.step == 1  # it holds the one compute slot
            queued = pool.submit(lambda: list(stub.Denoise(request, timeout=60)))
            deadline = time.monotonic() + 20
            while _queue_depth(metrics_port) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            denoiser.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as refused:
                queued.result(30)
            shed_at = time.monotonic()
            rest = list(running)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        assert rest[-1].HasField("result") and rest[-2].progress.step == 60  # the running call finished
        assert time.monotonic() - shed_at > 0.05  # the queued call was answered before the running one ended
        assert denoiser.wait(30) == 0
        assert '"queued_calls_shed": 1' in denoiser.stdout.read()
    finally:
        for proc in (encoder, denoiser):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_the_local_mesh_moves_a_metrics_port_taken_before_the_process_bound_it(registry, tmp_path):
    from diffmesh.mesh import LocalMesh

    mesh = LocalMesh(registry=registry, workdir=tmp_path, ports={"te": free_port()})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        mesh.metrics_ports["te"] = taken  # someone else holds it by the time the process binds
        mesh.spawn("te", "text_encoder", "--models", "tiny-sd15")
        try:
            mesh.wait_ready(timeout=90, names=["te"])
            assert mesh.metrics_ports["te"] != taken
            assert "diffmesh_ready" in mesh.metrics_text("te")
            assert '"setting": "metrics_port"' in (mesh.log_dir / "te.log").read_text()  # the first try's error
        finally:
            assert mesh.stop(names=["te"]) == {"te": 0}
