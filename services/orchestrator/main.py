"""The orchestrator process: `diffmesh serve orchestrator` or `python -m services.orchestrator`."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Sequence

from diffmesh.limits import BatchLimits, FaceLimits, ImageMemoryLimits, ImageSizeLimits, PromptLimits, StepLimits
from diffmesh.runtime.channels import channel_target
from diffmesh.runtime.config import ConfigError, ServerConfig, setting
from diffmesh.runtime.server import run_stage
from diffmesh.runtime.tls import load_tls
from diffmesh.stages import STAGES, Need, StageTable
from services.orchestrator.callers import CallersFileError, caller_admission, load_callers_file
from services.orchestrator.clients import StageClients
from services.orchestrator.plan import Limits, ModelCatalog
from services.orchestrator.routing import StageRoute
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.shadow import ShadowDiffer

STREAM_EVENT_OVERHEAD_KB = 4  # an image event's fields besides the data (index, seed, mime, sizes)


@dataclass
class OrchestratorSettings(ImageSizeLimits, StepLimits, BatchLimits, PromptLimits, ImageMemoryLimits, FaceLimits,
                           ServerConfig):
    """diffmesh orchestrator: the public API; chains the stages per request."""

    # max_size, max_steps, max_batch, max_prompt_chars, max_image_decode_mb: diffmesh.limits,
    # the same settings every stage checks its own requests against.

    port: int = setting(STAGES.frontend().default_port, "gRPC port", min=0, max=65535)
    max_concurrency: int = setting(64, "requests in flight at once (more wait in the queue, max_queue)", min=1)
    callers_file: str = setting(
        "", "YAML callers file (docs/admission.md): who may call (API key hashes, client certificate subjects or "
        "SANs), their models, rate limits, concurrency quotas and priority class; re-read when it changes. "
        "Empty: open (every caller anonymous, interactive, unlimited)")
    callers_reload_s: float = setting(2.0, "look at the callers file for changes at most this often (on request), "
                                           "seconds", min=0)
    batch_every: int = setting(4, "fairness of the admission queue: when interactive and batch requests both wait, "
                                  "after this many interactive grants in a row the oldest batch request goes next",
                               min=1)
    default_model: str = setting("", "model used when a request names none (empty: the first registry id)")
    default_scheduler: str = setting("euler", "scheduler used when a request names none")
    default_steps: int = setting(30, "steps when a request sets none", min=1)
    default_strength: float = setting(0.75, "img2img strength when a request sets none", min=0.01, max=1)
    max_count: int = setting(8, "most images per request (at most max_batch)", min=1)
    max_guidance: float = setting(50.0, "largest guidance_scale accepted", min=0)
    max_init_image_mb: int = setting(32, "largest init_image file accepted, MiB", min=1)
    request_timeout_s: float = setting(600.0, "deadline for requests that carry none", min=1)
    shadow_threshold: float = setting(0.0, "log a shadow divergence above this max absolute difference", min=0)
    shadow_tolerance: float = setting(0.005, "a shadow output within this share of the stable output's largest "
                                      "magnitude is 'close' (batch rounding), not 'diverged'", min=0)
    shadow_max_in_flight: int = setting(8, "mirrored calls in flight at once (more are dropped)", min=1)
    max_unary_reply_mb: int = setting(
        4, "largest Generate (unary) reply, MiB: a request whose worst-case reply is larger fails "
        "FAILED_PRECONDITION before any work (stock gRPC clients accept 4 MiB; raise it only with the "
        "clients' receive limit; GenerateStream has no such limit)", min=1, max=2047)
    stream_chunk_kb: int = setting(3072, "largest piece of an image file per GenerateStream event, KiB "
                                         "(under the 4 MiB stock clients accept)", min=16)
    readiness_wait_s: float = setting(1.0, "before a flow, how long a stage's connection may take to come up; "
                                           "a stage with no reachable replica fails the request UNAVAILABLE "
                                           "before any stage works", min=0)

    TABLE = STAGES  # the stages this orchestrator routes to (a class attribute, not a setting)

    def validate(self) -> None:
        if self.default_steps > self.max_steps:
            raise ConfigError(f"default_steps: {self.default_steps} exceeds max_steps {self.max_steps}")
        if self.max_count > self.max_batch:
            raise ConfigError(f"max_count: {self.max_count} exceeds max_batch {self.max_batch} (the stages "
                              f"would refuse a request's images in one call)")
        if self.max_unary_reply_mb > self.max_message_mb:
            raise ConfigError(f"max_unary_reply_mb: {self.max_unary_reply_mb} exceeds max_message_mb "
                              f"{self.max_message_mb} (the server could not send such a reply)")
        if self.stream_chunk_kb + STREAM_EVENT_OVERHEAD_KB > self.max_message_mb * 1024:
            raise ConfigError(f"stream_chunk_kb: {self.stream_chunk_kb} does not fit in max_message_mb "
                              f"{self.max_message_mb} with its event")
        if self.callers_file:
            try:
                load_callers_file(self.callers_file, require_client_certificates=bool(self.tls_ca_file))
            except CallersFileError as exc:
                raise ConfigError(f"callers_file: {exc}") from exc
        for spec in self.TABLE.backends():
            stage = spec.name
            if spec.need is Need.ALWAYS and not getattr(self, f"{stage}_address"):
                raise ConfigError(f"{stage}_address: must be set (every flow needs {stage})")
            for knob in ("canary_weight", "shadow_percent"):
                if getattr(self, f"{stage}_{knob}") > 0 and not getattr(self, f"{stage}_canary_address"):
                    raise ConfigError(f"{stage}_{knob}: set but {stage}_canary_address is empty")
            if getattr(self, f"{stage}_canary_address") and not getattr(self, f"{stage}_address"):
                raise ConfigError(f"{stage}_canary_address: set but {stage}_address is empty")
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
                      max_init_image_bytes=self.max_init_image_mb * 1024 * 1024,
                      max_image_decode_bytes=self.max_image_decode_bytes,
                      max_reference_faces=self.max_reference_faces)

    def routes(self) -> list[StageRoute]:
        """One route per backend stage of the table (an unconfigured optional stage has none)."""
        return [StageRoute(spec.name, getattr(self, f"{spec.name}_address"),
                           getattr(self, f"{spec.name}_canary_address"), getattr(self, f"{spec.name}_canary_weight"),
                           getattr(self, f"{spec.name}_shadow_percent"))
                for spec in self.TABLE.backends() if getattr(self, f"{spec.name}_address")]


def route_settings(table: StageTable) -> list[tuple[str, type, dataclasses.Field]]:
    """The per-stage route settings, generated from the stage table: address, canary address and
    weight, shadow percent. An optional stage defaults to no address (not configured)."""
    fields = []
    for spec in table.backends():
        default = f"127.0.0.1:{spec.default_port}" if spec.need is Need.ALWAYS else ""
        optional = "" if spec.need is Need.ALWAYS else "; empty: not configured (requests needing it fail)"
        fields += [
            (f"{spec.name}_address", str, setting(default, f"{spec.name} target: host:port (DNS: every address it "
                                                           f"resolves to), a comma-separated list of IP:port replicas, "
                                                           f"or a gRPC target{optional}")),
            (f"{spec.name}_canary_address", str, setting("", f"{spec.name} canary target (empty: no canary)")),
            (f"{spec.name}_canary_weight", float, setting(0.0, f"percent of requests the {spec.name} canary serves",
                                                          min=0, max=100)),
            (f"{spec.name}_shadow_percent", float, setting(0.0, f"percent of stable {spec.name} calls mirrored to "
                                                                f"the canary and compared (never returned)",
                                                           min=0, max=100)),
        ]
    return fields


def orchestrator_config(table: StageTable) -> type[OrchestratorSettings]:
    cls = dataclasses.make_dataclass("OrchestratorConfig", route_settings(table), bases=(OrchestratorSettings,),
                                     namespace={"TABLE": table, "__doc__": OrchestratorSettings.__doc__,
                                                "__module__": __name__})
    return cls


OrchestratorConfig = orchestrator_config(STAGES)


class OrchestratorStage:
    name = "orchestrator"

    def __init__(self, config: OrchestratorSettings) -> None:
        self.config = config
        self.clients: StageClients | None = None

    def initialize(self) -> ModelCatalog:
        catalog = ModelCatalog.load(self.config.registry)
        if self.config.default_model and catalog.get(self.config.default_model) is None:
            raise ConfigError(f"default_model: {self.config.default_model!r} is not in {self.config.registry}")
        return catalog

    def servicer(self, catalog: ModelCatalog) -> OrchestratorServicer:
        # On the server's event loop: the channels belong to it.
        config = self.config
        tls = load_tls(config)  # the orchestrator's own identity is its client identity to the stages
        shadow = ShadowDiffer(config.shadow_threshold, config.shadow_max_in_flight, config.shadow_tolerance)
        self.clients = StageClients(config.routes(), config.max_message_mb,
                                    tls.channel_credentials() if tls else None, shadow, config.request_timeout_s)
        admission = caller_admission(self.name, config.max_concurrency, config.max_queue,
                                     callers_file=config.callers_file, check_interval_s=config.callers_reload_s,
                                     batch_every=config.batch_every,
                                     require_client_certificates=bool(config.tls_ca_file), known_models=catalog.ids())
        return OrchestratorServicer(self.clients, catalog, config.limits(), config.request_timeout_s,
                                    admission=admission,
                                    max_unary_reply_bytes=config.max_unary_reply_mb * 1024 * 1024,
                                    stream_chunk_bytes=config.stream_chunk_kb * 1024,
                                    readiness_wait_s=config.readiness_wait_s)

    async def finalize(self) -> None:
        if self.clients is not None:
            await self.clients.close(self.config.grace_period_s)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(OrchestratorStage, OrchestratorConfig, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
