"""An optional stage that is not configured: the orchestrator starts and serves, and a request
whose flow needs the stage fails with FAILED_PRECONDITION naming it, before any stage works."""
from __future__ import annotations

import dataclasses

import grpc
import pytest

from diffmesh.client import MeshClient, build_request
from diffmesh.runtime.config import ConfigError, load_config
from diffmesh.stages import STAGES, Need, StageTable
from services.orchestrator.main import OrchestratorStage, orchestrator_config
from grpc_health.v1 import health_pb2

from tests.component.test_runtime import Running, _health_or_none, wait_until

# Today's table with the vae declared optional, as the face and safety stages will be.
TABLE = StageTable(tuple(dataclasses.replace(spec, need=Need.OPTIONAL) if spec.name == "vae" else spec
                         for spec in STAGES))


def test_an_always_needed_stage_must_have_an_address():
    with pytest.raises(ConfigError, match="vae_address: must be set"):
        load_config(orchestrator_config(STAGES), ["--vae-address", ""], environ={})
    config = load_config(orchestrator_config(TABLE), [], environ={})
    assert config.vae_address == "" and [r.stage for r in config.routes()] == ["text_encoder", "denoiser", "safety"]


def test_a_request_needing_an_unconfigured_optional_stage_fails_with_failed_precondition(registry):
    config = load_config(orchestrator_config(TABLE), ["--registry", str(registry)], environ={})
    running = Running(OrchestratorStage(config), config)
    try:
        wait_until(lambda: _health_or_none(running.address) == health_pb2.HealthCheckResponse.SERVING, timeout=30)
        with MeshClient(running.address) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.generate(build_request("a cat", model="tiny-sd15", width=64, height=64, steps=1), timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stage vae is not configured" in info.value.details()
    finally:
        assert running.stop() == 0
