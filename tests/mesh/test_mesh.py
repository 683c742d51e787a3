"""The running mesh as callers see it: streaming, metadata, formats, cancellation, deadlines,
reflection, and the `diffmesh generate` command."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from diffmesh.client import build_request, collect_stream
from diffmesh.stages import STAGES

SMALL = dict(model="tiny-sd15", width=64, height=64, scheduler="euler")


def read_log_events(mesh, stage: str) -> list[dict]:
    events = []
    for line in (mesh.log_dir / f"{stage}.log").read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def test_stream_sends_every_step_then_the_images(client):
    events = list(client.generate_stream(build_request("a boat", steps=7, seed=3, count=2, **SMALL), timeout=60))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == list(range(1, 8))
    assert all(p.total_steps == 7 for p in progress)
    # Each image in its own event (one chunk each at this size), then the result with the info.
    assert [e.WhichOneof("event") for e in events] == ["progress"] * 7 + ["image"] * 2 + ["result"]
    result = collect_stream(events)
    assert [(img.seed, img.index) for img in result.images] == [(3, 0), (4, 1)]
    info = result.info
    assert (info.model, info.scheduler, info.steps, info.width, info.height) == ("tiny-sd15", "euler", 7, 64, 64)
    assert info.guidance_scale == pytest.approx(7.5)  # diffusers' SD 1.x default
    # No face.analyze: the default policy needs faces only where a sexual label makes ages matter.
    assert [t.stage for t in info.timings] == ["safety.check_prompt", "text_encoder", "denoiser", "vae.decode",
                                               "safety.check_images", "safety.mark_images"]
    assert {t.phase for t in info.timings if t.stage.startswith("safety.")} == {"safety"}
    assert all(t.wall_ms > 0 and t.variant == "stable" for t in info.timings)
    assert info.total_ms >= sum(t.wall_ms for t in info.timings) * 0.9
    assert len(info.request_id) == 32


def test_img2img_stream_runs_strength_times_steps(client):
    init = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 72, 3), dtype=np.uint8)).save(init, "PNG")
    events = list(client.generate_stream(build_request("a boat", model="tiny-sdxl", steps=10, strength=0.5,
                                                       init_image=init.getvalue(), seed=1), timeout=60))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.total_steps for p in progress] == [5] * 5
    info = events[-1].result.info
    assert (info.width, info.height, info.strength) == (72, 48, pytest.approx(0.5))
    assert [t.stage for t in info.timings][1:3] in (["text_encoder", "vae.encode"], ["vae.encode", "text_encoder"])


@pytest.mark.parametrize("fmt,mime,magic", [("jpeg", "image/jpeg", b"\xff\xd8"), ("webp", "image/webp", b"RIFF"),
                                            ("png", "image/png", b"\x89PNG")])
def test_output_formats(client, fmt, mime, magic):
    response = client.generate(build_request("a tree", steps=2, output_format=fmt, quality=80, **SMALL), timeout=60)
    image = response.images[0].image
    assert image.mime_type == mime and image.data.startswith(magic)
    assert Image.open(io.BytesIO(image.data)).size == (64, 64)


def test_defaults_fill_unset_fields(client):
    response = client.generate(build_request("a tree", model="tiny-sdxl", steps=2), timeout=60)
    info = response.info
    assert (info.width, info.height) == (128, 128)  # the tiny SDXL UNet's sample size x 8
    assert info.scheduler == "euler" and info.guidance_scale == pytest.approx(5.0)
    assert 0 <= response.images[0].seed < 2**32


def test_prompt_changes_the_image_and_cache_keeps_it_exact(client):
    def run(prompt):
        data = client.generate(build_request(prompt, steps=3, seed=9, **SMALL), timeout=60).images[0].image.data
        return np.asarray(Image.open(io.BytesIO(data))).astype(int)

    cat, dog, cat_again = run("a cat"), run("a dog"), run("a cat")
    assert np.abs(cat - dog).max() > 10
    assert np.array_equal(cat, cat_again)  # the second is served from the embedding cache


def long_request(**extra):
    return build_request("a very long job", model="tiny-sdxl", width=256, height=256, steps=150, scheduler="euler",
                         seed=1, **extra)


def wait_for_log(mesh, stage: str, message: str, after: float, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in read_log_events(mesh, stage):
            if event["msg"] == message and event["ts"] >= after:
                return event
        time.sleep(0.1)
    raise AssertionError(f"{stage} never logged {message!r}")


def test_cancelling_the_call_stops_the_denoiser(mesh, client):
    started = time.time()
    stream = client.generate_stream(long_request(), timeout=120)
    first = next(stream)
    assert first.HasField("progress") and first.progress.total_steps == 150
    stream.cancel()
    event = wait_for_log(mesh, "denoiser", "denoise cancelled", started)
    steps_done = int(event["detail"].split("after ")[1].split(" of")[0])
    assert steps_done < 150
    assert client.generate(build_request("next", steps=2, **SMALL), timeout=60).images


def test_deadline_propagates_to_the_denoiser(mesh, client):
    started = time.time()
    with pytest.raises(grpc.RpcError) as info:
        client.generate(long_request(), timeout=0.8)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_log(mesh, "denoiser", "denoise cancelled", started)
    assert client.generate(build_request("next", steps=2, **SMALL), timeout=60).images


def test_reflection_lists_each_stage_service(mesh):
    expected = {"text_encoder": "diffmesh.v1.TextEncoder", "denoiser": "diffmesh.v1.Denoiser",
                "vae": "diffmesh.v1.Vae", "face": "diffmesh.v1.FaceService", "safety": "diffmesh.v1.SafetyService",
                "orchestrator": "diffmesh.v1.Orchestrator"}
    for stage in STAGES.names():
        with grpc.insecure_channel(mesh.address(stage)) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            assert {expected[stage], "grpc.health.v1.Health"} <= services
            assert database.FindFileContainingSymbol(expected[stage]).name.startswith("diffmesh/v1/")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffmesh.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_generate_writes_numbered_files_and_json(mesh, tmp_path):
    out = tmp_path / "cat.png"
    done = run_cli("generate", "--prompt", "a cat", "--negative-prompt", "blurry", "--model", "tiny-sd15",
                   "--width", "64", "--height", "48", "--steps", "3", "--scheduler", "ddim", "--guidance", "6",
                   "--seed", "11", "--count", "2", "--out", str(out), "--address", mesh.address("orchestrator"),
                   "--json")
    assert done.returncode == 0, done.stderr
    meta = json.loads(done.stdout)
    assert [img["seed"] for img in meta["images"]] == [11, 12]
    assert meta["scheduler"] == "ddim" and meta["steps"] == 3 and meta["guidance_scale"] == 6
    for i in range(2):
        assert Image.open(tmp_path / f"cat-{i}.png").size == (64, 48)

    edited = tmp_path / "edit.jpg"
    done = run_cli("generate", "--prompt", "a dog", "--init-image", str(tmp_path / "cat-0.png"), "--strength", "0.5",
                   "--model", "tiny-sd15", "--steps", "4", "--out", str(edited),
                   "--address", mesh.address("orchestrator"))
    assert done.returncode == 0, done.stderr
    assert edited.read_bytes().startswith(b"\xff\xd8")
    assert "denoiser" in done.stdout  # the timings table


def test_cli_reports_invalid_argument(mesh):
    done = run_cli("generate", "--prompt", "x", "--steps", "0", "--address", mesh.address("orchestrator"))
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "steps" in done.stderr


def test_text_encoder_cache_hits_on_the_same_model_and_prompt(mesh):
    from diffmesh.proto.v1 import text_encoder_pb2, text_encoder_pb2_grpc

    with grpc.insecure_channel(mesh.address("text_encoder")) as channel:
        stub = text_encoder_pb2_grpc.TextEncoderStub(channel)

        def encode(model, prompt, negative=None):
            request = text_encoder_pb2.EncodeTextRequest(model_id=model, prompt=prompt, with_negative=True)
            if negative is not None:
                request.negative_prompt = negative
            return stub.Encode(request, timeout=30)

        first = encode("tiny-sdxl", "a unique cache probe")
        second = encode("tiny-sdxl", "a unique cache probe")
        assert not first.cache_hit and second.cache_hit
        assert second.prompt_embeds.data == first.prompt_embeds.data
        assert not encode("tiny-sd15", "a unique cache probe").cache_hit  # keyed by model
        assert not encode("tiny-sdxl", "a unique cache probe", "").cache_hit  # and by negative prompt
        assert list(first.prompt_embeds.shape) == [1, 77, 48] and list(first.pooled_prompt_embeds.shape) == [1, 32]
