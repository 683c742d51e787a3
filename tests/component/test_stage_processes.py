"""Stage processes: SIGTERM drains in-flight work and exits 0; a missing or broken model is a
clear start-up error naming the path."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from diffmesh.client import wait_for_serving
from diffmesh.mesh import free_port
from diffmesh.models.registry import write_registry
from diffmesh.proto.v1 import denoiser_pb2, denoiser_pb2_grpc, text_encoder_pb2, text_encoder_pb2_grpc


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
        with grpc.insecure_channel(encoder_address) as channel:
            embeds = text_encoder_pb2_grpc.TextEncoderStub(channel).Encode(text_encoder_pb2.EncodeTextRequest(
                model_id="tiny-sdxl", prompt="a cat", with_negative=True), timeout=30)
        request = denoiser_pb2.DenoiseRequest(
            model_id="tiny-sdxl", scheduler="euler", steps=60, guidance_scale=5.0, width=128, height=128, seeds=[1],
            prompt_embeds=embeds.prompt_embeds, negative_prompt_embeds=embeds.negative_prompt_embeds,
            pooled_prompt_embeds=embeds.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=embeds.negative_pooled_prompt_embeds)
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
