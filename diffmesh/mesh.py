"""A local mesh: every stage as its own process on loopback (demo, `make up`, tests).

Each stage runs one stable process by default; `replicas` adds more stable processes of a stage
(the orchestrator balances over them round-robin and fails over between them) and `canaries`
adds a canary process with a traffic weight, as the Helm chart does on Kubernetes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from diffmesh.client.client import wait_for_serving
from diffmesh.stages import STAGES, Role, StageSpec

DEFAULT_PORTS = {spec.name: spec.default_port for spec in STAGES}
# gRPC's C core logs in plain text below Python's logging: errors only, so every line stays JSON.
QUIET_GRPC_CORE = {"GRPC_VERBOSITY": "ERROR"}


def host_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports() -> dict[str, int]:
    return {stage: free_port() for stage in STAGES.names()}


@dataclass(frozen=True)
class Instance:
    name: str     # "denoiser", "denoiser-1", "denoiser-canary"
    stage: str
    variant: str  # "stable" or "canary"


@dataclass
class LocalMesh:
    registry: Path
    workdir: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))  # by instance name
    metrics_ports: dict[str, int] = field(default_factory=dict)
    extra_args: dict[str, list[str]] = field(default_factory=dict)  # by instance name or stage
    env: dict[str, str] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)     # stable processes per backend stage
    canaries: dict[str, float] = field(default_factory=dict)   # backend stage -> canary weight (percent)
    # Backend stages not started (an optional stage the orchestrator then runs without).
    without: tuple[str, ...] = ()
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    extra: list[Instance] = field(default_factory=list)         # started by spawn()
    # How each process was launched (to start it again on a fresh metrics port) and how often it was.
    _launches: dict[str, tuple[Instance, tuple[str, ...], bool]] = field(default_factory=dict, repr=False)
    _rebinds: dict[str, int] = field(default_factory=dict, repr=False)

    def instances(self) -> list[Instance]:
        found = []
        for spec in STAGES.backends():
            if spec.name in self.without:
                continue
            found += [Instance(spec.name if i == 0 else f"{spec.name}-{i}", spec.name, "stable")
                      for i in range(self.replicas.get(spec.name, 1))]
            if spec.name in self.canaries:
                found.append(Instance(f"{spec.name}-canary", spec.name, "canary"))
        frontend = STAGES.frontend().name
        return found + [Instance(frontend, frontend, "stable")]

    def port(self, name: str) -> int:
        if name not in self.ports:
            self.ports[name] = free_port()
        return self.ports[name]

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.port(name)}"

    def stage_addresses(self, stage: str, variant: str = "stable") -> str:
        return ",".join(self.address(i.name) for i in self.instances() if i.stage == stage and i.variant == variant)

    def route_args(self) -> list[str]:
        """The orchestrator's flags for this mesh's backends: each stage's address (its stable
        processes), and its canary with the weight where one runs."""
        args: list[str] = []
        for spec in STAGES.backends():
            addresses = self.stage_addresses(spec.name)
            args += [f"--{spec.flag}-address", addresses]
            if spec.name in self.canaries:
                args += [f"--{spec.flag}-canary-address", self.stage_addresses(spec.name, "canary"),
                         f"--{spec.flag}-canary-weight", str(self.canaries[spec.name])]
        return args

    def command(self, instance: Instance, args: Sequence[str] = ()) -> list[str]:
        spec: StageSpec = STAGES[instance.stage]
        command = [sys.executable, "-m", spec.package, "--port", str(self.port(instance.name)),
                   "--registry", str(self.registry), "--variant", instance.variant]
        command += ["--torch-threads", str(self.torch_threads(instance))]
        if instance.name in self.metrics_ports:
            command += ["--metrics-port", str(self.metrics_ports[instance.name])]
        command += [arg.replace("{workdir}", str(self.workdir)) for arg in spec.local_args]
        if spec.name == STAGES.frontend().name:
            command += self.route_args()  # `args` come after: a flag given there overrides its route
        return command + self.extra_args.get(instance.stage, []) + (
            self.extra_args.get(instance.name, []) if instance.name != instance.stage else []) + list(args)

    def torch_threads(self, instance: Instance) -> int:
        """Torch threads for one process. The stage table's local_torch_threads where it sets one: on a
        shared CPU host the light stages' idle thread pools go cold between calls and contend with the
        denoiser's, and one thread each is faster end to end (measured by the bench). The
        orchestrator runs no model: one. The other compute processes (denoisers, replicas and
        canaries included) share the host's CPUs: each keeping torch's default, one thread per CPU,
        oversubscribes the host (two denoisers on 2 CPUs: 16-35 s per request, 0.5-1.8 s with one
        thread each); a single one keeps torch's default (0). A --torch-threads in a process's extra
        args still overrides this."""
        spec = STAGES[instance.stage]
        if spec.local_torch_threads:
            return spec.local_torch_threads
        if spec.role is Role.FRONTEND:
            return 1
        running_extra = [i for i in self.extra if i.name in self.processes or i == instance]  # spawn()ed
        sharing = [i for i in self.instances() + running_extra
                   if STAGES[i.stage].role is Role.BACKEND and not STAGES[i.stage].local_torch_threads]
        if len(sharing) <= 1:
            # Alone on the host: torch's default. Measured by the bench on 2 CPUs: an explicit
            # torch.set_num_threads(2) made the tiny SDXL loop 2.5x slower than the default (also 2).
            return 0
        return max(1, host_cpus() // len(sharing))

    def _launch(self, instance: Instance, args: Sequence[str], detach: bool) -> None:
        self._launches[instance.name] = (instance, tuple(args), detach)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{instance.name}.log", "ab") as log:
            self.processes[instance.name] = subprocess.Popen(
                self.command(instance, args), stdout=log, stderr=subprocess.STDOUT, env={**QUIET_GRPC_CORE, **os.environ, **self.env},
                start_new_session=detach)

    def start(self, detach: bool = False) -> None:
        for instance in self.instances():
            self._launch(instance, (), detach)

    def spawn(self, name: str, stage: str, *args: str, variant: str = "stable", metrics: bool = True) -> str:
        """One more process beside the mesh (a canary, a replica, a differently routed
        orchestrator); `args` are its extra flags (an orchestrator gets this mesh's routes, which
        its own flags override). Returns its address; wait_ready(names=[name]) waits for it,
        stop(names=[name]) stops it."""
        instance = Instance(name, stage, variant)
        if metrics:
            self.metrics_ports.setdefault(name, free_port())
        self.extra.append(instance)
        self._launch(instance, args, detach=False)
        return self.address(name)

    def metrics_text(self, name: str) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def wait_ready(self, timeout: float = 120.0, names: Sequence[str] = ()) -> None:
        deadline = time.monotonic() + timeout
        for name in names or list(self.processes):
            while True:
                proc = self.processes[name]
                if proc.poll() is not None:
                    if self._moved_metrics_port(name):
                        continue
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
                try:
                    wait_for_serving(self.address(name), timeout=1.0)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{name} not SERVING after {timeout:.0f}s:\n{self.log_tail(name)}")

    def _moved_metrics_port(self, name: str) -> bool:
        """A free_port() can be taken by someone else before the process binds it (a client's
        ephemeral port, say). Nobody else knows a metrics port, so it alone is moved and the
        process started again, a few times at most; a taken gRPC port stays an error."""
        tail = self.log_tail(name, lines=5)
        if '"cannot bind"' not in tail or '"setting": "metrics_port"' not in tail or name not in self.metrics_ports:
            return False
        if self._rebinds.get(name, 0) >= 3:
            return False
        self._rebinds[name] = self._rebinds.get(name, 0) + 1
        self.metrics_ports[name] = free_port()
        instance, args, detach = self._launches[name]
        self._launch(instance, args, detach)
        return True

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 30.0, names: Sequence[str] = ()) -> dict[str, int | None]:
        """SIGTERM the named processes (default: every one, the orchestrator first), wait for
        the drain; returns their exit codes and forgets them."""
        chosen = [name for name in reversed(list(self.processes)) if not names or name in names]
        for name in chosen:
            proc = self.processes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name in reversed(chosen):
            proc = self.processes.pop(name)
            try:
                codes[name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    # --- `make up` / `make down`: a mesh that outlives the command ------------------------
    def save_state(self) -> Path:
        state = {name: {"pid": proc.pid, "address": self.address(name)} for name, proc in self.processes.items()}
        path = self.workdir / "state.json"
        path.write_text(json.dumps(state, indent=2))
        return path

    @staticmethod
    def stop_saved(workdir: Path, timeout: float = 30.0) -> list[str]:
        path = workdir / "state.json"
        if not path.exists():
            return []
        state = json.loads(path.read_text())
        stopped = []
        for name, info in state.items():
            try:
                os.kill(info["pid"], signal.SIGTERM)
                stopped.append(name)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for info in state.values():
            while time.monotonic() < deadline and _alive(info["pid"]):
                time.sleep(0.1)
            if _alive(info["pid"]):
                os.kill(info["pid"], signal.SIGKILL)
        path.unlink()
        return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
