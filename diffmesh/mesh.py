"""A local mesh: every stage as its own process on loopback (demo, `make up`, tests)."""
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

from diffmesh.client.client import wait_for_serving

STAGES = ("text_encoder", "denoiser", "vae", "orchestrator")
DEFAULT_PORTS = {"orchestrator": 50051, "text_encoder": 50061, "denoiser": 50062, "vae": 50063}


def free_ports(stages=STAGES) -> dict[str, int]:
    return {stage: free_port() for stage in stages}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalMesh:
    registry: Path
    workdir: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    metrics_ports: dict[str, int] = field(default_factory=dict)
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def address(self, stage: str) -> str:
        return f"127.0.0.1:{self.ports[stage]}"

    def command(self, stage: str) -> list[str]:
        args = [sys.executable, "-m", f"services.{stage}", "--port", str(self.ports[stage]),
                "--registry", str(self.registry)]
        if stage in self.metrics_ports:
            args += ["--metrics-port", str(self.metrics_ports[stage])]
        if stage == "orchestrator":
            for name in STAGES[:-1]:
                args += [f"--{name.replace('_', '-')}-address", self.address(name)]
        return args + self.extra_args.get(stage, [])

    def start(self, detach: bool = False) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        for stage in STAGES:
            log = open(self.log_dir / f"{stage}.log", "ab")
            self.processes[stage] = subprocess.Popen(
                self.command(stage), stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=detach)
            log.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for stage in STAGES:
            while True:
                proc = self.processes.get(stage)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{stage} exited with {proc.returncode}:\n{self.log_tail(stage)}")
                try:
                    wait_for_serving(self.address(stage), timeout=1.0)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{stage} not SERVING after {timeout:.0f}s:\n{self.log_tail(stage)}")

    def log_tail(self, stage: str, lines: int = 20) -> str:
        path = self.log_dir / f"{stage}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every stage (the orchestrator first), wait for the drain; returns exit codes."""
        for stage in reversed(STAGES):
            proc = self.processes.get(stage)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for stage, proc in self.processes.items():
            try:
                codes[stage] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[stage] = proc.wait()
        return codes

    # --- `make up` / `make down`: a mesh that outlives the command ------------------------
    def save_state(self) -> Path:
        state = {stage: {"pid": proc.pid, "address": self.address(stage)} for stage, proc in self.processes.items()}
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
        for stage, info in state.items():
            try:
                os.kill(info["pid"], signal.SIGTERM)
                stopped.append(stage)
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
