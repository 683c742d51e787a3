"""A registry holding entries of every kind starts every stage that does not load the broken
ones: each stage loads and checks only the kinds the stage table says it loads
(diffmesh.stages StageSpec.loads), so a face pack that is not mounted stops the face stage (a
clear start-up error naming it) but neither the pipeline stages nor the orchestrator, and
adapters and safety policies (which no stage loads yet) stop nothing.

One mesh for the whole module (a start costs ~10 s here), without the face stage: its registry has
the tiny pipelines, the tiny face pack and identity encoders, dummy entries of the kinds no stage
loads, plus one face pack whose path does not exist.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from diffmesh.client import MeshClient, build_request
from diffmesh.mesh import LocalMesh, free_ports
from diffmesh.models.registry import Kind, ModelError, Registry, RegistryItem, write_registry
from diffmesh.models.tiny import SD15_ID, SDXL_ID
from diffmesh.stages import STAGES

UNMOUNTED_FACES = "faces-unmounted"


@pytest.fixture(scope="module")
def kinds_registry(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second registry over the session's tiny pipelines, plus one dummy entry of every other
    kind (a folder or a file: no stage loads those kinds, only their existence is checkable)."""
    root = tmp_path_factory.mktemp("kinds")
    (root / "antelopev2").mkdir()  # a folder without model_index.json: not a pipeline
    for name in ("photomaker-v2.bin", "pixel.safetensors", "canny.safetensors", "ip-adapter.bin", "policy.yaml"):
        (root / name).write_bytes(b"not weights")
    tiny = Registry.load(tiny_models / "registry.yaml")
    items = {
        SD15_ID: RegistryItem(tiny_models / SD15_ID),
        SDXL_ID: RegistryItem(tiny_models / SDXL_ID, kind=Kind.PIPELINE),
        # the face stage's kinds: real (tiny) ones, which the denoiser loads too (identity LoRAs)
        **{i: RegistryItem(tiny.path_of(i), kind=tiny.kind_of(i), base=tiny.specs[i].base)
           for i in tiny.ids(kinds=(Kind.FACE_ANALYSIS, Kind.IDENTITY_ENCODER))},
        UNMOUNTED_FACES: RegistryItem(root / "not-mounted" / "antelopev2", kind=Kind.FACE_ANALYSIS),
        "pixel": RegistryItem(root / "pixel.safetensors", kind=Kind.LORA, base=SDXL_ID),
        "canny": RegistryItem(root / "canny.safetensors", kind=Kind.CONTROLNET, base=SD15_ID),
        "ipa": RegistryItem(root / "ip-adapter.bin", kind=Kind.IP_ADAPTER, base=SD15_ID),
        "policy": RegistryItem(root / "policy.yaml", kind=Kind.SAFETY_POLICY),
    }
    return write_registry(root / "registry.yaml", items)


@pytest.fixture(scope="module")
def kinds_mesh(kinds_registry: Path, tmp_path_factory: pytest.TempPathFactory):
    mesh = LocalMesh(registry=kinds_registry, workdir=tmp_path_factory.mktemp("kinds-mesh"), ports=free_ports(),
                     without=("face",))
    mesh.start()
    try:
        mesh.wait_ready(180)
        yield mesh
    finally:
        codes = mesh.stop()
        assert codes and all(code == 0 for code in codes.values()), f"unclean stop: {codes}"


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


def _loaded_models(mesh: LocalMesh, name: str) -> list[str]:
    """The ids a backend stage says it loaded (its "models loaded" JSON log line)."""
    for line in (mesh.log_dir / f"{name}.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("msg") == "models loaded":
                return record["models"]
    raise AssertionError(f"{name} logged no 'models loaded' line:\n{mesh.log_tail(name)}")


def test_the_registry_holds_every_kind(kinds_registry: Path) -> None:
    # Guards the premise of the mesh tests below: every kind is present, every path but the
    # unmounted face pack exists.
    registry = Registry.load(kinds_registry)
    assert {registry.kind_of(i) for i in registry.ids()} == set(Kind)
    assert [i for i in registry.ids() if not registry.path_of(i).exists()] == [UNMOUNTED_FACES]


def test_every_stage_serves_and_generates(kinds_mesh: LocalMesh) -> None:
    names = [instance.name for instance in kinds_mesh.instances()]
    assert sorted(names) == sorted(set(STAGES.names()) - {"face"})
    for instance in kinds_mesh.instances():
        address = kinds_mesh.address(instance.name)
        assert _health(address, "") == health_pb2.HealthCheckResponse.SERVING, instance.name
        assert _health(address, STAGES[instance.stage].service) == health_pb2.HealthCheckResponse.SERVING

    with MeshClient(kinds_mesh.address("orchestrator")) as client:
        response = client.generate(build_request("a cat", model=SD15_ID, width=64, height=64, steps=1,
                                                 guidance_scale=1.0, seed=1), timeout=120)
    assert len(response.images) == 1
    assert Image.open(io.BytesIO(response.images[0].image.data)).size == (64, 64)


def test_each_stage_loads_only_its_kinds(kinds_registry: Path, kinds_mesh: LocalMesh) -> None:
    registry = Registry.load(kinds_registry)
    for spec in STAGES.backends():
        if spec.name == "face" or not spec.loads:
            continue  # face is not in this mesh; safety loads no registry models (its come from settings)
        assert _loaded_models(kinds_mesh, spec.name) == registry.ids(kinds=spec.loads), spec.name
    assert not STAGES["safety"].loads


def test_an_unmounted_face_pack_stops_the_face_stage_with_one_clear_error(kinds_registry: Path, tmp_path) -> None:
    import subprocess
    import sys

    from diffmesh.mesh import free_port

    done = subprocess.run([sys.executable, "-m", "services.face", "--registry", str(kinds_registry), "--port",
                           str(free_port()), "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()
              if line.startswith("{") and json.loads(line).get("level") == "ERROR"]
    assert len(errors) == 1 and "not-mounted" in json.dumps(errors[0]), done.stderr[-2000:]


def test_an_unmounted_face_pack_does_not_stop_the_pipeline_stages(kinds_registry: Path,
                                                                  kinds_mesh: LocalMesh) -> None:
    registry = Registry.load(kinds_registry)
    # A check of everything does see the missing pack ...
    with pytest.raises(ModelError) as exc_info:
        registry.verify()
    assert str(registry.path_of(UNMOUNTED_FACES)) in str(exc_info.value)
    # ... yet every stage that does not load face packs started on this registry and serves.
    for instance in kinds_mesh.instances():
        assert kinds_mesh.processes[instance.name].poll() is None, kinds_mesh.log_tail(instance.name)
        assert _health(kinds_mesh.address(instance.name), "") == health_pb2.HealthCheckResponse.SERVING
