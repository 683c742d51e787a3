"""A table of malformed requests sent to the running mesh: each gets INVALID_ARGUMENT naming the
field, every service stays SERVING, and a valid request right after succeeds."""
from __future__ import annotations

import io
import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from diffmesh.client import build_request, field_violations
from diffmesh.stages import STAGES
from diffmesh.proto.v1 import (denoiser_pb2, denoiser_pb2_grpc, orchestrator_pb2, tensor_pb2, text_encoder_pb2,
                               text_encoder_pb2_grpc, vae_pb2, vae_pb2_grpc)
from diffmesh.runtime import codec


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


VALID = dict(model="tiny-sd15", width=64, height=64, steps=2, seed=1)
INIT = png(64, 64)

# (case id, GenerateRequest fields, the field the error must name)
ORCHESTRATOR_CASES = [
    ("empty prompt", dict(prompt=""), "prompt"),
    ("blank prompt", dict(prompt="   \n"), "prompt"),
    ("100 kB prompt", dict(prompt="a cat " * 17_000), "prompt"),
    ("100 kB negative prompt", dict(negative_prompt="x" * 100_000), "negative_prompt"),
    ("unknown model", dict(model="sd-99"), "model"),
    ("unknown scheduler", dict(scheduler="warp_drive"), "scheduler"),
    ("zero steps", dict(steps=0), "steps"),
    ("10,000 steps", dict(steps=10_000), "steps"),
    ("negative steps", dict(steps=-4), "steps"),
    ("7x9 size", dict(width=7, height=9), "width"),
    ("height not a multiple of 8", dict(height=9), "height"),
    ("100,000 pixels wide", dict(width=100_000), "width"),
    ("negative width", dict(width=-64), "width"),
    ("NaN guidance", dict(guidance_scale=math.nan), "guidance_scale"),
    ("infinite guidance", dict(guidance_scale=math.inf), "guidance_scale"),
    ("negative guidance", dict(guidance_scale=-1.0), "guidance_scale"),
    ("zero count", dict(count=0), "count"),
    ("negative count", dict(count=-2), "count"),
    ("count of 1000", dict(count=1000), "count"),
    ("negative seed", dict(seed=-1), "seed"),
    ("non-image init bytes", dict(init_image=b"this is not an image"), "init_image"),
    ("truncated PNG", dict(init_image=INIT[:40]), "init_image"),
    ("4x4 init image", dict(init_image=png(4, 4)), "init_image"),
    ("strength above 1", dict(init_image=INIT, strength=1.5), "strength"),
    ("negative strength", dict(init_image=INIT, strength=-0.1), "strength"),
    ("NaN strength", dict(init_image=INIT, strength=math.nan), "strength"),
    ("strength too small for the steps", dict(init_image=INIT, strength=0.1, steps=2), "strength"),
    ("strength without an init image", dict(strength=0.5), "strength"),
    ("unknown output format", dict(output_format=42), "output_format"),
    ("quality 500", dict(quality=500), "quality"),
    ("overlong request key", dict(request_key="k" * 1000), "request_key"),
]


def generate_request(fields: dict) -> orchestrator_pb2.GenerateRequest:
    merged = {**VALID, "prompt": "a photo of a cat", **fields}
    request = orchestrator_pb2.GenerateRequest()
    for name, value in merged.items():
        setattr(request, name, value)
    return request


def assert_violation(error: grpc.RpcError, field: str) -> None:
    """The status details carry a google.rpc.BadRequest naming the field (plus its value and
    reason), as well as the readable message."""
    violations = field_violations(error)
    assert [v.field.split(".")[0] for v in violations] == [field.split(".")[0]], violations
    assert violations[0].reason and violations[0].reason in error.details()


def assert_mesh_healthy(mesh, client) -> None:
    for stage in STAGES.names():
        with grpc.insecure_channel(mesh.address(stage)) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, stage
    response = client.generate(build_request("a valid request", **VALID), timeout=60)
    assert len(response.images) == 1 and response.images[0].image.data.startswith(b"\x89PNG")


@pytest.mark.parametrize("fields,field", [c[1:] for c in ORCHESTRATOR_CASES], ids=[c[0] for c in ORCHESTRATOR_CASES])
def test_orchestrator_rejects(mesh, client, fields, field):
    with pytest.raises(grpc.RpcError) as info:
        client.generate(generate_request(fields), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert_violation(info.value, field)
    assert len(info.value.details()) < 500  # a 100 kB value is not echoed back
    assert_mesh_healthy(mesh, client)


def test_stream_rejects_before_any_event(client):
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate_stream(generate_request(dict(steps=0)), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps" in info.value.details()


# --- malformed tensors and fields sent straight to the stages ---------------------------------

def bad_bytes(t: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=t.dtype, shape=t.shape, data=t.data[:-3])


@pytest.fixture(scope="module")
def embeds(mesh):
    with grpc.insecure_channel(mesh.address("text_encoder")) as channel:
        stub = text_encoder_pb2_grpc.TextEncoderStub(channel)
        return stub.Encode(text_encoder_pb2.EncodeTextRequest(model_id="tiny-sd15", prompt="a cat",
                                                              with_negative=True), timeout=30)


def denoise_request(embeds, **changes) -> denoiser_pb2.DenoiseRequest:
    request = denoiser_pb2.DenoiseRequest(model_id="tiny-sd15", scheduler="euler", steps=2, guidance_scale=5.0,
                                          width=64, height=64, seeds=[1], prompt_embeds=embeds.prompt_embeds,
                                          negative_prompt_embeds=embeds.negative_prompt_embeds)
    for name, value in changes.items():
        if isinstance(value, tensor_pb2.Tensor):
            getattr(request, name).CopyFrom(value)
        elif name == "seeds":
            del request.seeds[:]
            request.seeds.extend(value)
        else:
            setattr(request, name, value)
    return request


def latents(shape=(1, 4, 8, 8), fill=0.1) -> tensor_pb2.Tensor:
    return codec.from_numpy(np.full(shape, fill, np.float32))


DENOISER_CASES = [
    ("embeds bytes do not match shape", lambda e: dict(prompt_embeds=bad_bytes(e.prompt_embeds)), "prompt_embeds.data"),
    ("embeds dtype unspecified", lambda e: dict(prompt_embeds=tensor_pb2.Tensor(shape=[1], data=b"abcd")),
     "prompt_embeds.dtype"),
    ("embeds as int64", lambda e: dict(prompt_embeds=codec.from_numpy(np.zeros((1, 77, 32), np.int64))),
     "prompt_embeds.dtype"),
    ("embeds hidden size wrong", lambda e: dict(prompt_embeds=codec.from_numpy(np.zeros((1, 77, 5), np.float32))),
     "prompt_embeds.shape"),
    ("negative embeds missing with guidance", lambda e: dict(negative_prompt_embeds=tensor_pb2.Tensor()),
     "negative_prompt_embeds"),
    ("unknown model", lambda e: dict(model_id="nope"), "model_id"),
    ("no seeds", lambda e: dict(seeds=[]), "seeds"),
    ("NaN guidance", lambda e: dict(guidance_scale=math.nan), "guidance_scale"),
    ("generator state garbage", lambda e: dict(generator_states=codec.from_numpy(np.zeros((1, 16), np.uint8))),
     "generator_states"),
    ("init latents of the wrong size", lambda e: dict(init_latents=latents((1, 4, 3, 3)), strength=0.5),
     "init_latents.shape"),
    ("width not a multiple of 8", lambda e: dict(width=60), "width"),
]


@pytest.mark.parametrize("change,field", [c[1:] for c in DENOISER_CASES], ids=[c[0] for c in DENOISER_CASES])
def test_denoiser_rejects(mesh, client, embeds, change, field):
    with grpc.insecure_channel(mesh.address("denoiser")) as channel:
        stub = denoiser_pb2_grpc.DenoiserStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Denoise(denoise_request(embeds, **change(embeds)), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert_violation(info.value, field)
    assert_mesh_healthy(mesh, client)


VAE_CASES = [
    ("decode: latents bytes short", "Decode", vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=bad_bytes(latents())),
     "latents.data"),
    ("decode: latents rank 3", "Decode", vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=latents((4, 8, 8))),
     "latents.shape"),
    ("decode: NaN latents", "Decode", vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=latents(fill=math.nan)),
     "latents"),
    ("decode: quality 101", "Decode", vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=latents(), quality=101),
     "quality"),
    ("encode: float pixels", "Encode",
     vae_pb2.EncodeImageRequest(model_id="tiny-sd15", pixels=codec.from_numpy(np.zeros((1, 8, 8, 3), np.float32)),
                                seeds=[1]), "pixels.dtype"),
    ("encode: no seeds", "Encode",
     vae_pb2.EncodeImageRequest(model_id="tiny-sd15", pixels=codec.from_numpy(np.zeros((1, 8, 8, 3), np.uint8))),
     "seeds"),
]


@pytest.mark.parametrize("method,request_,field", [c[1:] for c in VAE_CASES], ids=[c[0] for c in VAE_CASES])
def test_vae_rejects(mesh, client, method, request_, field):
    with grpc.insecure_channel(mesh.address("vae")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            getattr(vae_pb2_grpc.VaeStub(channel), method)(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert_violation(info.value, field)
    assert_mesh_healthy(mesh, client)


def test_text_encoder_rejects_unknown_model(mesh, client):
    with grpc.insecure_channel(mesh.address("text_encoder")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            text_encoder_pb2_grpc.TextEncoderStub(channel).Encode(
                text_encoder_pb2.EncodeTextRequest(model_id="nope", prompt="x"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("model_id")
    assert_violation(info.value, "model_id")
    assert_mesh_healthy(mesh, client)
