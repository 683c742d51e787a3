"""The committed generated code matches protos/, and the services have the agreed shapes."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "diffmesh" / "proto" / "v1"
PROTOS = REPO / "protos" / "diffmesh" / "v1"


def _gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos_under_test", REPO / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "v1"
    written = _gen_protos().generate(out)
    assert sorted(p.name for p in written) == sorted(p.name for p in out.iterdir())

    generated, committed = _files(out), _files(COMMITTED)
    missing = sorted(set(generated) - set(committed))
    extra = sorted(set(committed) - set(generated))
    assert not missing, f"generated but not committed (run make protos): {missing}"
    assert not extra, f"committed but no longer generated: {extra}"
    stale = sorted(name for name in generated if generated[name] != committed[name])
    assert not stale, f"stale generated files (run make protos): {stale}"
    # one _pb2, _pb2.pyi and _pb2_grpc per proto file
    for proto in PROTOS.glob("*.proto"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert proto.stem + suffix in generated
    assert all(b"from diffmesh.v1 import" not in data for data in generated.values())


def _modules() -> dict[str, ModuleType]:
    from diffmesh.proto.v1 import (common_pb2, denoiser_pb2, face_pb2, orchestrator_pb2, safety_pb2, tensor_pb2,
                                   text_encoder_pb2, vae_pb2)

    return {"common": common_pb2, "denoiser": denoiser_pb2, "face": face_pb2, "orchestrator": orchestrator_pb2,
            "safety": safety_pb2, "tensor": tensor_pb2, "text_encoder": text_encoder_pb2, "vae": vae_pb2}


def test_every_file_is_in_package_diffmesh_v1() -> None:
    modules = _modules()
    assert sorted(modules) == sorted(p.stem for p in PROTOS.glob("*.proto"))
    for name, module in modules.items():
        assert module.DESCRIPTOR.package == "diffmesh.v1", name
        assert module.DESCRIPTOR.name == f"diffmesh/v1/{name}.proto"


# (proto module, service, method) -> (request type, response type, server-streaming)
METHODS = {
    ("text_encoder", "TextEncoder", "Encode"): ("EncodeTextRequest", "EncodeTextResponse", False),
    ("denoiser", "Denoiser", "Denoise"): ("DenoiseRequest", "DenoiseEvent", True),
    ("vae", "Vae", "Decode"): ("DecodeRequest", "DecodeResponse", False),
    ("vae", "Vae", "Encode"): ("EncodeImageRequest", "EncodeImageResponse", False),
    ("face", "FaceService", "Analyze"): ("AnalyzeRequest", "AnalyzeResponse", False),
    ("face", "FaceService", "EncodeIdentity"): ("EncodeIdentityRequest", "EncodeIdentityResponse", False),
    ("orchestrator", "Orchestrator", "Generate"): ("GenerateRequest", "GenerateResponse", False),
    ("orchestrator", "Orchestrator", "GenerateStream"): ("GenerateRequest", "GenerateEvent", True),
    ("orchestrator", "Orchestrator", "FetchReviewed"): ("FetchReviewedRequest", "GenerateResponse", False),
    **{("safety", "SafetyService", name): (f"{name}Request", f"{name}Response", False)
       for name in ("CheckPrompt", "CheckImages", "MarkImages", "DescribePolicy", "ListCases", "GetCase",
                    "DecideCase", "PurgeExpiredCases", "ReleaseCase")},
}


@pytest.mark.parametrize("key", sorted(METHODS), ids=lambda k: f"{k[1]}.{k[2]}")
def test_stage_services_and_methods(key: tuple[str, str, str]) -> None:
    module_name, service_name, method_name = key
    request, response, streaming = METHODS[key]
    service = _modules()[module_name].DESCRIPTOR.services_by_name[service_name]
    assert service.full_name == f"diffmesh.v1.{service_name}"
    method = service.methods_by_name[method_name]
    assert method.input_type.full_name == f"diffmesh.v1.{request}"
    assert method.output_type.full_name == f"diffmesh.v1.{response}"
    assert method.client_streaming is False
    assert method.server_streaming is streaming


def test_services_have_exactly_the_agreed_methods() -> None:
    expected: dict[str, set[str]] = {}
    for module_name, service_name, method_name in METHODS:
        expected.setdefault(service_name, set()).add(method_name)
    found = {
        service.name: set(service.methods_by_name)
        for module in _modules().values() for service in module.DESCRIPTOR.services_by_name.values()
    }
    assert found == expected


def test_dtype_enum_values_are_never_renumbered() -> None:
    from diffmesh.proto.v1 import tensor_pb2

    assert dict(tensor_pb2.DType.items()) == {
        "DTYPE_UNSPECIFIED": 0, "FLOAT16": 1, "BFLOAT16": 2, "FLOAT32": 3, "UINT8": 4,
        "INT64": 5, "BOOL": 6, "INT32": 7, "FLOAT64": 8,
    }
    fields = {f.name: f.number for f in tensor_pb2.Tensor.DESCRIPTOR.fields}
    assert fields == {"dtype": 1, "shape": 2, "data": 3}
