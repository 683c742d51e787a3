"""Shutdown is bounded: a stage whose compute outlives the grace period answers the call
UNAVAILABLE (callers retry on another replica), logs the drain's outcome as one structured line,
and exits 0 soon after the grace period even though a thread inside torch cannot be interrupted."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from diffmesh.client import wait_for_serving
from diffmesh.mesh import free_port
from diffmesh.proto.v1 import denoiser_pb2_grpc, vae_pb2, vae_pb2_grpc
from diffmesh.runtime import codec
from tests.component.stage_calls import denoise_request

GRACE_S = 1.0
EXIT_SLACK_S = 2.0  # after the grace period: answering UNAVAILABLE, finalize, flushing logs


def start(stage: str, registry: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", f"services.{stage}", "--port", str(port), "--registry",
                             str(registry), "--grace-period-s", str(GRACE_S), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"127.0.0.1:{port}"


def terminate_and_time(proc: subprocess.Popen) -> float:
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return time.monotonic() - began


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def assert_one_structured_drain_line(output: str, abandoned: int) -> dict:
    assert "Traceback" not in output and "CancelledError" not in output, output
    timed_out = [entry for entry in json_lines(output) if entry["msg"] == "drain timed out"]
    assert len(timed_out) == 1, output
    assert timed_out[0]["abandoned_calls"] == abandoned and timed_out[0]["level"] == "WARNING"
    return timed_out[0]


def test_a_vae_abandons_a_long_decode_after_the_grace_period(registry):
    # One torch thread and a 1536x1536 decode: several seconds of compute, far beyond the grace.
    proc, address = start("vae", registry, "--models", "tiny-sd15", "--torch-threads", "1")
    try:
        wait_for_serving(address, 60)
        latents = codec.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 192, 192), np.float32))
        with grpc.insecure_channel(address) as channel:
            call = vae_pb2_grpc.VaeStub(channel).Decode.future(
                vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=latents, skip_files=True), timeout=60)
            time.sleep(1.0)  # in the compute pool by now
            assert not call.done()
            took = terminate_and_time(proc)
            error = call.exception(10)
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "shutting down" in error.details()
        assert proc.returncode == 0
        assert took < GRACE_S + EXIT_SLACK_S, f"exit took {took:.1f}s"
        drain = assert_one_structured_drain_line(proc.stdout.read(), abandoned=1)
        assert drain["compute_running"] == 1  # the decode was still running when the process left
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_denoiser_stream_past_the_grace_period_ends_unavailable(registry):
    encoder, encoder_address = start("text_encoder", registry, "--models", "tiny-sd15")
    denoiser, address = start("denoiser", registry, "--models", "tiny-sd15", "--torch-threads", "1")
    try:
        wait_for_serving(encoder_address, 60)
        wait_for_serving(address, 60)
        request = denoise_request(encoder_address, "tiny-sd15", scheduler="euler", steps=150, guidance_scale=5.0,
                                  width=512, height=512, seeds=[1, 2, 3, 4])
        events, outcome = [], {}
        with grpc.insecure_channel(address) as channel:
            stream = denoiser_pb2_grpc.DenoiserStub(channel).Denoise(request, timeout=60)

            def read() -> None:
                try:
                    for event in stream:
                        events.append(event)
                except grpc.RpcError as exc:
                    outcome["error"] = exc

            reader = threading.Thread(target=read)
            reader.start()
            deadline = time.monotonic() + 30
            while not events and time.monotonic() < deadline:
                time.sleep(0.05)
            assert events, "no progress event"
            took = terminate_and_time(denoiser)
            reader.join(10)
        assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE, outcome
        assert not any(event.HasField("result") for event in events)  # the loop did not finish
        assert denoiser.returncode == 0 and took < GRACE_S + EXIT_SLACK_S, f"exit took {took:.1f}s"
        assert_one_structured_drain_line(denoiser.stdout.read(), abandoned=1)
    finally:
        for proc in (encoder, denoiser):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
