"""A table of malformed requests sent to the running mesh: each gets INVALID_ARGUMENT naming the
field, every service stays SERVING, and a valid request right after succeeds. The orchestrator's
table, then every stage's own (each stage refuses on its own what the orchestrator would):
undecodable bytes and invalid UTF-8 on every method, non-finite and empty tensors, sizes, counts,
steps, token windows, enum values, images that inflate."""
from __future__ import annotations

import io
import math
import struct
import zlib

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
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


# --- every stage defends itself: the same bounds as the orchestrator's, checked by the stage ---------
# Each case checks the stage stays SERVING; one generation at the end shows the mesh still works.

def assert_serving(mesh, stage: str) -> None:
    with grpc.insecure_channel(mesh.address(stage)) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING, stage


def assert_invalid(error: grpc.RpcError, field: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details().startswith(field), error.details()
    assert_violation(error, field)
    assert len(error.details()) < 500


# Every method of every stage's service, from the stage table and the protos.
# Every method of every service each stage serves: its own, and the health and reflection services.
LIBRARY_SERVICES = (health_pb2.DESCRIPTOR.services_by_name["Health"],
                    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
METHODS = [(spec.name, method) for spec in STAGES
           for service in (descriptor_pool.Default().FindServiceByName(spec.service), *LIBRARY_SERVICES)
           for method in service.methods]
METHOD_IDS = [f"{method.containing_service.name}.{method.name}" for _, method in METHODS]
# A length-delimited field 1 that claims 127 bytes and has 5; and a varint tag 11 bytes long.
GARBAGE = [b"\x0a\x7fshort", b"\xff" * 10 + b"\x01garbage"]


def raw_call(mesh, stage: str, method, payload: bytes) -> None:
    """Sends `payload` as the request bytes, as a client nobody on the project wrote would."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    with grpc.insecure_channel(mesh.address(stage)) as channel:
        if method.client_streaming:
            list(channel.stream_stream(path)(iter([payload]), timeout=30))
        elif method.server_streaming:
            list(channel.unary_stream(path)(payload, timeout=30))
        else:
            channel.unary_unary(path)(payload, timeout=30)


def bad_utf8(method) -> tuple[str, bytes]:
    """The method's request with its first string field set to bytes that are not UTF-8."""
    string = next(f for f in method.input_type.fields if f.type == f.TYPE_STRING and f.number < 16)
    return string.name, bytes([string.number << 3 | 2, 4]) + b"\xff\xfe\xc3\x28"


@pytest.mark.parametrize("stage,method", METHODS, ids=METHOD_IDS)
def test_undecodable_bytes_are_invalid_argument(mesh, stage, method):
    message_class = message_factory.GetMessageClass(method.input_type)
    for payload in GARBAGE:
        with pytest.raises(DecodeError):
            message_class.FromString(payload)  # the payload really is not a message
        with pytest.raises(grpc.RpcError) as info:
            raw_call(mesh, stage, method, payload)
        assert_invalid(info.value, "request")
        assert method.input_type.full_name in info.value.details()
    assert_serving(mesh, stage)


WITH_STRINGS = [(i, (stage, method)) for i, (stage, method) in enumerate(METHODS)
                if any(f.type == f.TYPE_STRING and f.number < 16 for f in method.input_type.fields)]


@pytest.mark.parametrize("stage,method", [m for _, m in WITH_STRINGS], ids=[METHOD_IDS[i] for i, _ in WITH_STRINGS])
def test_a_string_that_is_not_utf8_is_invalid_argument(mesh, stage, method):
    field, payload = bad_utf8(method)
    with pytest.raises(grpc.RpcError) as info:
        raw_call(mesh, stage, method, payload)
    assert_invalid(info.value, "request")
    assert "UTF-8" in info.value.details()
    assert_serving(mesh, stage)


def embeds_like(embeds, seq: int | None = None, fill: float | None = None, rows: int = 1) -> tensor_pb2.Tensor:
    """prompt embeddings shaped as the text encoder's ([rows, seq, D]), filled with `fill`."""
    template = codec.to_numpy(embeds.prompt_embeds, "prompt_embeds")
    shape = (rows, template.shape[1] if seq is None else seq, template.shape[2])
    return codec.from_numpy(np.full(shape, 0.1 if fill is None else fill, np.float32))


def with_nan_at(t: tensor_pb2.Tensor, value: float) -> tensor_pb2.Tensor:
    array = codec.to_numpy(t, "t").copy()
    array.flat[array.size // 2] = value
    return codec.from_numpy(array)


DENOISER_LIMIT_CASES = [
    ("NaN in prompt_embeds", lambda e: dict(prompt_embeds=with_nan_at(e.prompt_embeds, math.nan)), "prompt_embeds"),
    ("inf in negative_prompt_embeds", lambda e: dict(negative_prompt_embeds=with_nan_at(e.negative_prompt_embeds,
                                                                                      math.inf)),
     "negative_prompt_embeds"),
    ("all-NaN init_latents", lambda e: dict(init_latents=latents(fill=math.nan), strength=0.5), "init_latents"),
    ("-inf in init_latents", lambda e: dict(init_latents=with_nan_at(latents(), -math.inf), strength=0.5),
     "init_latents"),
    ("prompt_embeds [1, 0, D]", lambda e: dict(prompt_embeds=embeds_like(e, seq=0)), "prompt_embeds.shape"),
    ("negative_prompt_embeds [1, 0, D]", lambda e: dict(negative_prompt_embeds=embeds_like(e, seq=0)),
     "negative_prompt_embeds.shape"),
    ("width and height 2^30", lambda e: dict(width=2**30, height=2**30), "width"),
    ("height above max_size", lambda e: dict(height=2056), "height"),
    ("10,000 steps", lambda e: dict(steps=10_000), "steps"),
    ("17 images in one call", lambda e: dict(seeds=list(range(17))), "seeds"),
    ("33 windows of embeddings", lambda e: dict(prompt_embeds=embeds_like(e, seq=33 * 77),
                                                negative_prompt_embeds=embeds_like(e, seq=33 * 77)),
     "prompt_embeds.shape"),
    ("mask feather of 1e9 pixels", lambda e: dict(init_latents=latents(), strength=0.5, change_map_is_mask=True,
                                                  change_map=codec.from_numpy(np.zeros((1, 64, 64), np.uint8)),
                                                  mask_feather=1e9), "mask_feather"),
    ("change map not at the image size", lambda e: dict(init_latents=latents(), strength=0.5,
                                                        change_map=codec.from_numpy(np.zeros((1, 4096, 4096),
                                                                                             np.uint8))),
     "change_map.shape"),
]


@pytest.mark.parametrize("change,field", [c[1:] for c in DENOISER_LIMIT_CASES],
                         ids=[c[0] for c in DENOISER_LIMIT_CASES])
def test_denoiser_enforces_its_limits(mesh, embeds, change, field):
    with grpc.insecure_channel(mesh.address("denoiser")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(denoiser_pb2_grpc.DenoiserStub(channel).Denoise(denoise_request(embeds, **change(embeds)),
                                                                 timeout=30))
    assert_invalid(info.value, field)
    assert_serving(mesh, "denoiser")


@pytest.fixture(scope="module")
def sdxl_embeds(mesh):
    with grpc.insecure_channel(mesh.address("text_encoder")) as channel:
        return text_encoder_pb2_grpc.TextEncoderStub(channel).Encode(text_encoder_pb2.EncodeTextRequest(
            model_id="tiny-sdxl", prompt="a cat", with_negative=True, negative_prompt="blurry"), timeout=30)


@pytest.mark.parametrize("name,value", [("pooled_prompt_embeds", math.nan),
                                        ("negative_pooled_prompt_embeds", math.inf)])
def test_denoiser_refuses_non_finite_pooled_embeddings(mesh, sdxl_embeds, name, value):
    request = denoiser_pb2.DenoiseRequest(
        model_id="tiny-sdxl", scheduler="euler", steps=2, guidance_scale=5.0, width=64, height=64, seeds=[1],
        prompt_embeds=sdxl_embeds.prompt_embeds, negative_prompt_embeds=sdxl_embeds.negative_prompt_embeds,
        pooled_prompt_embeds=sdxl_embeds.pooled_prompt_embeds,
        negative_pooled_prompt_embeds=sdxl_embeds.negative_pooled_prompt_embeds)
    getattr(request, name).CopyFrom(with_nan_at(getattr(sdxl_embeds, name), value))
    with grpc.insecure_channel(mesh.address("denoiser")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(denoiser_pb2_grpc.DenoiserStub(channel).Denoise(request, timeout=30))
    assert_invalid(info.value, name)
    assert_serving(mesh, "denoiser")


def pixels(n: int, height: int, width: int) -> tensor_pb2.Tensor:
    return codec.from_numpy(np.full((n, height, width, 3), 128, np.uint8))


def encode_request(**changes) -> vae_pb2.EncodeImageRequest:
    fields = {"model_id": "tiny-sd15", "pixels": pixels(1, 64, 64), "seeds": [1], **changes}
    return vae_pb2.EncodeImageRequest(**fields)


# Built when the case runs: one of them is a 48 MiB image.
VAE_LIMIT_CASES = [
    ("decode: format 42", "Decode",
     lambda: vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=latents(), format=42), "format"),
    ("decode: inf latents", "Decode",
     lambda: vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=with_nan_at(latents(), math.inf)), "latents"),
    ("decode: latents [1, 4, 0, 8]", "Decode",
     lambda: vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=latents((1, 4, 0, 8))), "latents.shape"),
    ("decode: 2112 pixels wide", "Decode",
     lambda: vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=latents((1, 4, 8, 264))), "latents.shape"),
    ("decode: 17 images", "Decode",
     lambda: vae_pb2.DecodeRequest(model_id="tiny-sd15", latents=latents((17, 4, 8, 8))), "latents.shape"),
    ("encode: sampling 42", "Encode", lambda: encode_request(sampling=42), "sampling"),
    ("encode: width 2^30", "Encode", lambda: encode_request(width=2**30, height=64), "width"),
    ("encode: height 2^30", "Encode", lambda: encode_request(width=64, height=2**30), "height"),
    ("encode: 65536x65536", "Encode", lambda: encode_request(width=65536, height=65536), "width"),
    ("encode: 17 seeds", "Encode", lambda: encode_request(seeds=list(range(17))), "seeds"),
    ("encode: 17 images", "Encode", lambda: encode_request(pixels=pixels(17, 8, 8)), "pixels.shape"),
    ("encode: pixels [1, 0, 8, 3]", "Encode", lambda: encode_request(pixels=pixels(1, 0, 8)), "pixels.shape"),
    ("encode: an 8200-pixel side", "Encode", lambda: encode_request(pixels=pixels(1, 8, 8200), width=64),
     "pixels.shape"),
    ("encode: kept at its own 2104-pixel size", "Encode", lambda: encode_request(pixels=pixels(1, 8, 2104)),
     "pixels.shape"),
    ("encode: 4096x4096 is over the memory budget", "Encode",
     lambda: encode_request(pixels=pixels(1, 4096, 4096), width=512, height=512), "pixels.shape"),
]


@pytest.mark.parametrize("method,make,field", [c[1:] for c in VAE_LIMIT_CASES], ids=[c[0] for c in VAE_LIMIT_CASES])
def test_vae_enforces_its_limits(mesh, method, make, field):
    with grpc.insecure_channel(mesh.address("vae")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            getattr(vae_pb2_grpc.VaeStub(channel), method)(make(), timeout=30)
    assert_invalid(info.value, field)
    assert_serving(mesh, "vae")


TEXT_ENCODER_LIMIT_CASES = [
    ("1 MB prompt", dict(prompt="a cat " * 175_000), "prompt"),
    ("1 MB negative prompt", dict(negative_prompt="x" * 1_000_000, with_negative=True), "negative_prompt"),
    ("1 MB prompt_2", dict(model_id="tiny-sdxl", prompt_2="y" * 1_000_000), "prompt_2"),
    ("667 BREAK windows in 4000 characters", dict(prompt="BREAK " * 666), "prompt"),
    ("667 BREAK windows in the negative prompt", dict(negative_prompt="BREAK " * 666, with_negative=True),
     "negative_prompt"),
]


@pytest.mark.parametrize("fields,field", [c[1:] for c in TEXT_ENCODER_LIMIT_CASES],
                         ids=[c[0] for c in TEXT_ENCODER_LIMIT_CASES])
def test_text_encoder_enforces_its_limits(mesh, fields, field):
    request = text_encoder_pb2.EncodeTextRequest(**{"model_id": "tiny-sd15", "prompt": "a cat", **fields})
    with grpc.insecure_channel(mesh.address("text_encoder")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            text_encoder_pb2_grpc.TextEncoderStub(channel).Encode(request, timeout=30)
    assert_invalid(info.value, field)
    assert_serving(mesh, "text_encoder")


def paletted_1bit_png(side: int) -> bytes:
    """A few kB declaring side x side 1-bit paletted pixels (built byte by byte: PIL would decode it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\x00" + bytes((side + 7) // 8)) * side
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0))
            + chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff") + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("field", ["init_image", "mask"])
def test_orchestrator_refuses_an_image_that_inflates(mesh, client, field):
    bomb = paletted_1bit_png(8000)
    assert len(bomb) < 16_000
    fields = dict(init_image=bomb) if field == "init_image" else dict(init_image=INIT, mask=bomb)
    with pytest.raises(grpc.RpcError) as info:
        client.generate(generate_request(fields), timeout=30)
    assert_invalid(info.value, field)
    assert "8000x8000" in info.value.details() and "MiB" in info.value.details()
    assert_serving(mesh, "orchestrator")


def test_the_mesh_still_generates_after_the_stage_tables(mesh, client):
    assert_mesh_healthy(mesh, client)
