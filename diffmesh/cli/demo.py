"""`make demo`: tiny models -> a mesh of processes -> one image -> per-stage timings and the
request's trace as a waterfall -> clean stop."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from diffmesh.client import MeshClient, build_request, collect_stream
from diffmesh.devtools.otlp_receiver import Receiver, format_waterfall, write_spans
from diffmesh.cli.render import format_timings
from diffmesh.mesh import LocalMesh, free_ports
from diffmesh.stages import STAGES


def run_demo(models_root: Path, out: Path, model: str) -> int:
    from diffmesh.models.tiny import build_tiny_models

    registry = models_root / "registry.yaml"
    if not registry.exists():
        print(f"building the tiny model set in {models_root}/ ...")
        build_tiny_models(models_root)
    receiver = Receiver()  # stands in for an OpenTelemetry Collector
    workdir = Path(tempfile.mkdtemp(prefix="diffmesh-demo-"))
    mesh = LocalMesh(registry=registry.resolve(), workdir=workdir, ports=free_ports(), env=receiver.exporter_env())
    print("starting " + ", ".join(f"{s} ({mesh.address(s)})" for s in STAGES.names()))
    start = time.perf_counter()
    mesh.start()
    try:
        mesh.wait_ready()
        print(f"every stage SERVING after {time.perf_counter() - start:.1f}s (logs: {mesh.log_dir}/)")
        request = build_request("a photo of a cat", negative_prompt="blurry", model=model, width=256,
                                height=256, steps=20, scheduler="euler", seed=42)
        with MeshClient(mesh.address("orchestrator")) as client:
            result = collect_stream(client.generate_stream(request, timeout=120), lambda progress: print(
                f"\r  step {progress.step}/{progress.total_steps}", end="", flush=True))
        print()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(result.images[0].image.data)
        info = result.info
        print(f"wrote {out} ({info.width}x{info.height}, model {info.model}, {info.scheduler}, "
              f"{info.steps} steps, seed {result.images[0].seed})")
        print(format_timings(info))
        services = {spec.program for spec in STAGES}
        spans = receiver.collector.wait_for(info.trace_id, services)
        trace_file = out.with_name(out.stem + "-trace.json")
        write_spans(spans, trace_file)
        print(f"\ntrace {info.trace_id}: {len(spans)} spans from {len({s.service for s in spans})} services "
              f"(written to {trace_file})")
        print(format_waterfall(spans))
    finally:
        codes = mesh.stop()
        receiver.stop()
        print("stopped: " + ", ".join(f"{stage} exit {code}" for stage, code in codes.items()))
    return 0 if all(code == 0 for code in codes.values()) else 1
