"""`make demo`: tiny models -> a mesh of processes -> one image -> per-stage timings and the
request's trace as a waterfall -> clean stop."""
from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

from diffmesh.client import MeshClient, build_request, collect_stream
from diffmesh.devtools.otlp_receiver import Receiver, format_waterfall, write_spans
from diffmesh.cli.render import face_panels, format_faces, format_safety, format_timings
from diffmesh.mesh import LocalMesh, free_ports
from diffmesh.stages import STAGES, Need


def _face_demo(mesh: LocalMesh, out: Path, model: str) -> None:
    """Stage 2 on a real photo: random diffusion weights make a generated base without faces, so
    the demo details the six faces of insightface's group photo, with the identity of its bundled
    portrait, and draws what happened."""
    import io

    import numpy as np
    from PIL import Image

    photos = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"
    base, reference = photos / "t1.jpg", photos / "Tom_Hanks_54745.png"
    request = build_request("a photo of a smiling person, detailed skin", negative_prompt="blurry", model=model,
                            seed=7, base_image=base, reference_faces=[reference],
                            face_detailing={"prompt": "[PROMPT] [SEP] [SKIP] [SEP] [PROMPT]"})
    print(f"\nface detailing: the faces of {base.name}, identity from {reference.name}")
    with MeshClient(mesh.address("orchestrator")) as client:
        result = collect_stream(client.generate_stream(request, timeout=300), lambda progress: print(
            f"\r  {progress.phase} step {progress.step}/{progress.total_steps}", end="", flush=True))
    print()
    if not result.images:  # the safety policy withheld it: say why
        print("  withheld: " + format_safety(result.info.safety))
        return
    image = result.images[0]
    final = np.asarray(Image.open(io.BytesIO(image.image.data)).convert("RGB"))
    photo = np.asarray(Image.open(base).convert("RGB"))
    faces_out = out.with_name(out.stem + "-faces.png")
    Image.fromarray(face_panels(photo, final, image.faces)).save(faces_out)
    print(f"wrote {faces_out} (boxes | masks | result){format_faces(image.faces)}")
    print(format_timings(result.info))


def _provenance_demo(mesh: LocalMesh, out: Path) -> None:
    """What `diffmesh provenance` reads back from the file the demo wrote."""
    import json

    from diffmesh.cli.safety import provenance_report

    root = mesh.workdir / "safety" / "c2pa" / "c2pa-dev-root.pem"  # the local mesh's development chain
    report = provenance_report(out, root.read_bytes() if root.exists() else None)
    manifest, watermark = report["manifest"], report["watermark"]
    active = manifest["active_manifest"] or {}
    print(f"\nprovenance of {out} (diffmesh provenance {out} --trust-anchors {root}):")
    print(f"  C2PA manifest: {manifest['state']} ({len(active.get('assertions', []))} assertions)")
    generation = next((a.get("data") for a in active.get("assertions", []) if a.get("label", "").startswith(
        "com.diffmesh")), None)
    if generation:
        print(f"  generation assertion: {json.dumps(generation)}")
    print(f"  watermark ({watermark['method']}): payload {watermark.get('decoded_payload')}, "
          f"{watermark.get('matching_bits', '-')}/{watermark['bits']} bits match the manifest's "
          f"(present: {watermark.get('present')})")


def _blocked_demo(mesh: LocalMesh, model: str) -> None:
    """A prompt the policy blocks: a normal reply with the decision and no images."""
    request = build_request("a graphic photo of a dismembered corpse covered in gore", model=model, seed=1)
    with MeshClient(mesh.address("orchestrator")) as client:
        result = client.generate(request, timeout=60)
    print(f"\na prompt the policy blocks: {len(result.images)} images")
    print("  " + format_safety(result.info.safety))


def run_demo(models_root: Path, out: Path, model: str) -> int:
    from diffmesh.models.tiny import build_tiny_models

    from diffmesh.models.registry import Registry

    registry = models_root / "registry.yaml"
    # A set built before the face stage existed has no face pack: build it again.
    if not registry.exists() or not Registry.load(registry).ids(kinds=("face_analysis",)):
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
        if not result.images:
            raise RuntimeError("the demo's image was withheld: " + format_safety(result.info.safety))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(result.images[0].image.data)
        info = result.info
        print(f"wrote {out} ({info.width}x{info.height}, model {info.model}, {info.scheduler}, "
              f"{info.steps} steps, seed {result.images[0].seed})")
        print(format_timings(info))
        _provenance_demo(mesh, out)
        _blocked_demo(mesh, model)
        services = {spec.program for spec in STAGES if spec.need is Need.ALWAYS}  # the ones txt2img calls
        spans = receiver.collector.wait_for(info.trace_id, services)
        trace_file = out.with_name(out.stem + "-trace.json")
        write_spans(spans, trace_file)
        print(f"\ntrace {info.trace_id}: {len(spans)} spans from {len({s.service for s in spans})} services "
              f"(written to {trace_file})")
        print(format_waterfall(spans))
        _face_demo(mesh, out, model)
    finally:
        codes = mesh.stop()
        receiver.stop()
        print("stopped: " + ", ".join(f"{stage} exit {code}" for stage, code in codes.items()))
    return 0 if all(code == 0 for code in codes.values()) else 1
