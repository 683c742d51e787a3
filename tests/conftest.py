"""Shared fixtures: one tiny model set and one running mesh per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from diffmesh.devtools.otlp_receiver import Receiver
from diffmesh.mesh import LocalMesh, free_ports


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a freshly built tiny model set; registry at root / "registry.yaml"."""
    from diffmesh.models.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("models")
    build_tiny_models(root)
    return root


@pytest.fixture(scope="session")
def registry(tiny_models: Path) -> Path:
    return tiny_models / "registry.yaml"


@pytest.fixture(scope="session")
def entries(registry: Path) -> dict:
    """Every tiny model's registry entry by id (paths checked, family detected)."""
    from diffmesh.models.registry import Registry

    loaded = Registry.load(registry)
    return {model_id: loaded.get(model_id) for model_id in loaded.ids()}


@pytest.fixture(scope="session")
def otlp_receiver():
    """A real OTLP/gRPC trace receiver the session's mesh exports its spans to."""
    receiver = Receiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def mesh(registry: Path, tmp_path_factory: pytest.TempPathFactory, otlp_receiver: Receiver):
    """Every stage as its own process on loopback, shared by the whole session: tracing to the
    session's OTLP receiver, metrics on their own ports."""
    local = LocalMesh(registry=registry, workdir=tmp_path_factory.mktemp("mesh"), ports=free_ports(),
                      metrics_ports=free_ports(), env=otlp_receiver.exporter_env(),
                      extra_args={"denoiser": ["--max-concurrency", "2"]})
    local.start()
    try:
        local.wait_ready(timeout=180)
        yield local
    finally:
        codes = local.stop()
        assert all(code == 0 for code in codes.values()), f"unclean stop: {codes}"


@pytest.fixture(scope="session")
def client(mesh: LocalMesh):
    from diffmesh.client import MeshClient

    with MeshClient(mesh.address("orchestrator")) as mesh_client:
        yield mesh_client
