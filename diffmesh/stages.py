"""Every stage of the mesh, declared once.

The local mesh launcher, the CLI (`serve`, `up`), the orchestrator's per-stage route settings,
the Dockerfile's import check, the Helm chart's checks and the tests all read this table; adding
a stage is one entry here (plus its proto, its `services/<stage>/` folder, one chart values entry
and its tests).
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Iterator


class Role(str, enum.Enum):
    FRONTEND = "frontend"  # the public API: callers reach it; it calls the backends
    BACKEND = "backend"    # a compute stage: only the orchestrator calls it


class Need(str, enum.Enum):
    ALWAYS = "always"      # every flow calls it: the orchestrator refuses to start without an address
    OPTIONAL = "optional"  # only some requests need it: unconfigured, those fail FAILED_PRECONDITION


@dataclass(frozen=True)
class StageSpec:
    name: str                 # "text_encoder": flags (--text-encoder-address), env, spans, metrics
    module: str               # the process entry point (`python -m <package>`), <module>.main()
    service: str              # fully-qualified gRPC service it serves
    default_port: int
    role: Role
    loads: tuple[str, ...] = ()   # registry kinds it loads at start-up (diffmesh.models.registry.Kind)
    need: Need = Need.ALWAYS      # whether flows always need it (backends only)
    gpu: bool = False             # runs on an accelerator in production (chart: GPU node pool)
    local_torch_threads: int = 0  # torch threads in the local mesh (0: a share of the host, LocalMesh.torch_threads)
    # Flags the local mesh adds ("{workdir}" is the mesh's working directory): where a stage that
    # keeps files (state_dir) keeps them, development-only switches.
    local_args: tuple[str, ...] = ()
    stateful: bool = False        # keeps files across requests (chart: a volume at its state_dir)

    @property
    def package(self) -> str:
        """The `python -m` target: services.<stage>."""
        return self.module.rsplit(".", 1)[0]

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")

    @property
    def program(self) -> str:
        """The process name in logs and traces (the OpenTelemetry service.name)."""
        return f"diffmesh-{self.flag}"

    def main_module(self):  # -> a module with main(argv) -> int
        return importlib.import_module(self.module)


@dataclass(frozen=True)
class StageTable:
    stages: tuple[StageSpec, ...]

    def __iter__(self) -> Iterator[StageSpec]:
        return iter(self.stages)

    def __getitem__(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(self.names())}")

    def __contains__(self, name: object) -> bool:
        return any(spec.name == name for spec in self.stages)

    def names(self) -> list[str]:
        return [spec.name for spec in self.stages]

    def backends(self) -> list[StageSpec]:
        return [spec for spec in self.stages if spec.role is Role.BACKEND]

    def frontend(self) -> StageSpec:
        (spec,) = [spec for spec in self.stages if spec.role is Role.FRONTEND]
        return spec

    def loading(self, kind: str) -> list[StageSpec]:
        return [spec for spec in self.stages if kind in spec.loads]


STAGES = StageTable((
    StageSpec("text_encoder", "services.text_encoder.main", "diffmesh.v1.TextEncoder", 50061, Role.BACKEND,
              loads=("pipeline",), local_torch_threads=1),
    StageSpec("denoiser", "services.denoiser.main", "diffmesh.v1.Denoiser", 50062, Role.BACKEND,
              loads=("pipeline", "identity_encoder"), gpu=True),  # identity encoders: their UNet LoRA
    StageSpec("vae", "services.vae.main", "diffmesh.v1.Vae", 50063, Role.BACKEND,
              loads=("pipeline",), gpu=True, local_torch_threads=1),
    StageSpec("face", "services.face.main", "diffmesh.v1.FaceService", 50064, Role.BACKEND,
              loads=("face_analysis", "identity_encoder"), need=Need.OPTIONAL, gpu=True, local_torch_threads=1),
    StageSpec("safety", "services.safety.main", "diffmesh.v1.SafetyService", 50065, Role.BACKEND,
              gpu=True, local_torch_threads=1, stateful=True,
              local_args=("--state-dir", "{workdir}/safety", "--c2pa-dev-chain", "true")),
    StageSpec("orchestrator", "services.orchestrator.main", "diffmesh.v1.Orchestrator", 50051, Role.FRONTEND,
              loads=("pipeline",)),  # reads the pipelines' configs (its catalog), loads no weights
))
