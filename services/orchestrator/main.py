"""The orchestrator process: `diffmesh serve orchestrator` or `python -m services.orchestrator`."""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Sequence

import grpc

from diffmesh.proto.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from diffmesh.runtime.channels import channel_target
from diffmesh.runtime.config import ConfigError, ServerConfig, setting
from diffmesh.runtime.server import run_stage
from diffmesh.runtime.tls import load_tls
from services.orchestrator.plan import Limits, ModelCatalog
from services.orchestrator.routing import StageRoute, StageRouter
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.shadow import ShadowDiffer

STAGES = ("text_encoder", "denoiser", "vae")


@dataclass
class OrchestratorConfig(ServerConfig):
    """diffmesh orchestrator: the public API; chains the stages per request."""

    port: int = setting(50051, "gRPC port", min=0, max=65535)
    max_concurrency: int = setting(64, "requests in flight at once", min=1)
    text_encoder_address: str = setting("127.0.0.1:50061", "text_encoder target: host:port (DNS: every address it resolves to), "
                                    "a comma-separated list of IP:port replicas, or a gRPC target")
    text_encoder_canary_address: str = setting("", "text_encoder canary target (empty: no canary)")
    text_encoder_canary_weight: float = setting(0.0, "percent of requests the text_encoder canary serves", min=0, max=100)
    text_encoder_shadow_percent: float = setting(0.0, "percent of stable text_encoder calls mirrored to the canary and "
                                            "compared (never returned)", min=0, max=100)
    denoiser_address: str = setting("127.0.0.1:50062", "denoiser target: host:port (DNS: every address it resolves to), "
                                    "a comma-separated list of IP:port replicas, or a gRPC target")
    denoiser_canary_address: str = setting("", "denoiser canary target (empty: no canary)")
    denoiser_canary_weight: float = setting(0.0, "percent of requests the denoiser canary serves", min=0, max=100)
    denoiser_shadow_percent: float = setting(0.0, "percent of stable denoiser calls mirrored to the canary and "
                                            "compared (never returned)", min=0, max=100)
    vae_address: str = setting("127.0.0.1:50063", "vae target: host:port (DNS: every address it resolves to), "
                                    "a comma-separated list of IP:port replicas, or a gRPC target")
    vae_canary_address: str = setting("", "vae canary target (empty: no canary)")
    vae_canary_weight: float = setting(0.0, "percent of requests the vae canary serves", min=0, max=100)
    vae_shadow_percent: float = setting(0.0, "percent of stable vae calls mirrored to the canary and "
                                            "compared (never returned)", min=0, max=100)
    default_model: str = setting("", "model used when a request names none (empty: the first registry id)")
    default_scheduler: str = setting("euler", "scheduler used when a request names none")
    default_steps: int = setting(30, "steps when a request sets none", min=1)
    default_strength: float = setting(0.75, "img2img strength when a request sets none", min=0.01, max=1)
    max_size: int = setting(2048, "largest width or height accepted", min=8)
    max_steps: int = setting(150, "most steps a request may ask for", min=1)
    max_count: int = setting(8, "most images per request", min=1)
    max_guidance: float = setting(50.0, "largest guidance_scale accepted", min=0)
    max_prompt_chars: int = setting(4000, "longest prompt accepted, in characters", min=1)
    max_init_image_mb: int = setting(32, "largest init_image file accepted, MiB", min=1)
    request_timeout_s: float = setting(600.0, "deadline for requests that carry none", min=1)
    shadow_threshold: float = setting(0.0, "log a shadow divergence above this max absolute difference", min=0)
    shadow_max_in_flight: int = setting(8, "mirrored calls in flight at once (more are dropped)", min=1)

    def validate(self) -> None:
        if self.default_steps > self.max_steps:
            raise ConfigError(f"default_steps: {self.default_steps} exceeds max_steps {self.max_steps}")
        for stage in STAGES:
            if not getattr(self, f"{stage}_address"):
                raise ConfigError(f"{stage}_address: must be set")
            for knob in ("canary_weight", "shadow_percent"):
                if getattr(self, f"{stage}_{knob}") > 0 and not getattr(self, f"{stage}_canary_address"):
                    raise ConfigError(f"{stage}_{knob}: set but {stage}_canary_address is empty")
            for kind in ("address", "canary_address"):
                address = getattr(self, f"{stage}_{kind}")
                try:
                    if address:
                        channel_target(address)
                except ValueError as exc:
                    raise ConfigError(f"{stage}_{kind}: {exc}") from exc

    def limits(self) -> Limits:
        return Limits(default_model=self.default_model, default_scheduler=self.default_scheduler,
                      default_steps=self.default_steps, default_strength=self.default_strength,
                      max_size=self.max_size, max_steps=self.max_steps, max_count=self.max_count,
                      max_guidance=self.max_guidance, max_prompt_chars=self.max_prompt_chars,
                      max_init_image_bytes=self.max_init_image_mb * 1024 * 1024)

    def routes(self) -> list[StageRoute]:
        return [StageRoute(stage, getattr(self, f"{stage}_address"), getattr(self, f"{stage}_canary_address"),
                           getattr(self, f"{stage}_canary_weight"), getattr(self, f"{stage}_shadow_percent"))
                for stage in STAGES]


class OrchestratorStage:
    name = "orchestrator"

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.servicer: OrchestratorServicer | None = None
        self.router: StageRouter | None = None

    def service_names(self) -> Sequence[str]:
        return (orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name,)

    def initialize(self) -> None:
        catalog = ModelCatalog.load(self.config.registry)
        if self.config.default_model and catalog.get(self.config.default_model) is None:
            raise ConfigError(f"default_model: {self.config.default_model!r} is not in {self.config.registry}")
        self.servicer.configure(self.config.limits(), catalog)

    def register(self, server: grpc.aio.Server) -> None:
        # Channels are made here, on the server's event loop; the catalog arrives in initialize.
        tls = load_tls(self.config)  # the orchestrator's own identity is its client identity to the stages
        self.router = StageRouter(self.config.routes(), self.config.max_message_mb,
                                  tls.channel_credentials() if tls else None)
        shadow = ShadowDiffer(self.config.shadow_threshold, self.config.shadow_max_in_flight)
        self.servicer = OrchestratorServicer(self.router, self.config.request_timeout_s, shadow)
        orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(self.servicer, server)

    def finalize(self) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(OrchestratorStage, OrchestratorConfig, sys.argv[1:] if argv is None else argv,
                     "diffmesh-orchestrator")


if __name__ == "__main__":
    sys.exit(main())
