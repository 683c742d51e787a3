"""Small helpers shared by the benchmarks: percentiles, machine description, the table."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def summarize_ms(samples_ms: list[float]) -> dict[str, float | int]:
    """p50 / p95 (linear interpolation) and friends of a list of milliseconds."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, object]:
    import torch
    from google.protobuf.internal import api_implementation

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_pressure": cpu_pressure(),
        "torch_threads_bench_process": torch.get_num_threads(),
        "torch_interop_threads_bench_process": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "protobuf_backend": api_implementation.Type(),
        "git_commit": commit,
        "versions": {name: _version(name) for name in (
            "torch", "numpy", "grpcio", "protobuf", "diffusers", "transformers", "pillow", "diffmesh")},
    }


def cpu_pressure() -> float | None:
    """Linux PSI: share of the last 10 s in which some runnable task waited for a CPU (percent)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(dict(kv.split("=") for kv in line.split()[1:])["avg10"])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


@dataclass
class Row:
    name: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: informational, no target

    @property
    def status(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


def format_table(rows: list[Row]) -> str:
    headers = ("figure", "measured", "target", "")
    cells = [headers] + [(r.name, r.value, r.target, r.status) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
