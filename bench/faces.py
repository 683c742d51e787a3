"""Face detailing, measured in one run on one mesh:

- faces per second for N = 1, 2, 4 faces of one image (insightface's group photo t1.jpg as the
  base, its N largest faces): batched (stage 2 re-renders all N in ONE denoiser call, one
  vae.Encode and one vae.Decode) vs one face per request, as ADetailer works (N requests, each
  re-rendering one face: the others are [SKIP]). The time counted is stage 2's re-rendering
  (the "faces" phase's text_encoder, vae and denoiser calls, wall time as the orchestrator saw
  it); analysis and compositing are the same work either way and are reported apart. Requests
  alternate between the two ways so drift hits both.
- the face stage's Analyze latency on t1.jpg (all six faces, with embeddings), over gRPC, and
  the same pack in-process.
"""
from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.e2e import MODEL, _registry
from bench.stats import summarize_ms

RERENDER_STAGES = ("text_encoder", "vae.encode", "denoiser", "vae.decode")
FACE_COUNTS = (1, 2, 4)


def _photo() -> Path:
    return Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images" / "t1.jpg"


def _rerender_ms(info) -> float:
    return sum(t.wall_ms for t in info.timings if t.phase == "faces" and t.stage in RERENDER_STAGES)


def _request(photo: bytes, n: int, only: int | None, seed: int):
    from diffmesh.client import build_request

    prompt = "a detailed face"
    face_prompt = "" if only is None else " [SEP] ".join("[PROMPT]" if j == only else "[SKIP]" for j in range(n))
    return build_request(prompt, model=MODEL, seed=seed, base_image=photo, detail_faces=True,
                         face_detailing={"max_faces": n, "prompt": face_prompt, "steps": 20, "strength": 0.4})


def run_faces(models_root: Path, runs: int = 8, warmup: int = 2) -> dict[str, Any]:
    from diffmesh.client import MeshClient
    from diffmesh.mesh import LocalMesh
    from diffmesh.proto.v1 import face_pb2, face_pb2_grpc
    from diffmesh.runtime import codec
    from diffmesh.imaging import decode_image
    import grpc

    registry = _registry(models_root)
    photo = _photo().read_bytes()
    pixels = decode_image(photo, "t1.jpg")
    mesh = LocalMesh(registry=registry, workdir=Path(tempfile.mkdtemp(prefix="diffmesh-bench-faces-")), ports={})
    mesh.start()
    result: dict[str, Any] = {"image": "insightface data/images/t1.jpg", "model": MODEL,
                              "counted_stages": list(RERENDER_STAGES)}
    try:
        mesh.wait_ready()
        per_n: dict[str, Any] = {}
        with MeshClient(mesh.address("orchestrator")) as client:
            for n in FACE_COUNTS:
                batched, one_by_one, batched_total, single_total = [], [], [], []
                for i in range(warmup + runs):
                    start = time.perf_counter()
                    reply = client.generate(_request(photo, n, None, 100 + i), timeout=300)
                    total = (time.perf_counter() - start) * 1000.0
                    detailed = [f for f in reply.images[0].faces.faces if not f.skipped]
                    assert len(detailed) == n, f"expected {n} detailed faces, got {len(detailed)}"
                    calls = sum(1 for t in reply.info.timings if t.stage == "denoiser" and t.phase == "faces")
                    assert calls == 1, f"batched: {calls} denoiser calls"
                    rerender, totals = 0.0, 0.0
                    for j in range(n):
                        start = time.perf_counter()
                        single = client.generate(_request(photo, n, j, 100 + i), timeout=300)
                        totals += (time.perf_counter() - start) * 1000.0
                        rerender += _rerender_ms(single.info)
                    if i >= warmup:
                        batched.append(_rerender_ms(reply.info))
                        one_by_one.append(rerender)
                        batched_total.append(total)
                        single_total.append(totals)
                b, s = summarize_ms(batched), summarize_ms(one_by_one)
                per_n[str(n)] = {
                    "batched_rerender": b, "one_per_call_rerender": s,
                    "batched_faces_per_s": n / (b["p50_ms"] / 1000.0),
                    "one_per_call_faces_per_s": n / (s["p50_ms"] / 1000.0),
                    "speedup_p50": s["p50_ms"] / b["p50_ms"],
                    "batched_request_total": summarize_ms(batched_total),
                    "one_per_call_requests_total": summarize_ms(single_total),
                }
        result["faces_per_second"] = per_n

        latencies = []
        with grpc.insecure_channel(mesh.address("face")) as channel:
            stub = face_pb2_grpc.FaceServiceStub(channel)
            request = face_pb2.AnalyzeRequest(images=[codec.from_numpy(pixels)])
            found = 0
            for i in range(warmup + runs):
                start = time.perf_counter()
                reply = stub.Analyze(request, timeout=60)
                if i >= warmup:
                    latencies.append((time.perf_counter() - start) * 1000.0)
                found = len(reply.images[0].faces)
        result["analyze_grpc"] = {**summarize_ms(latencies), "faces": found, "model": reply.model_id}
    finally:
        result["exit_codes"] = mesh.stop()
    result["analyze_in_process"] = _analyze_in_process(registry, pixels, runs, warmup)
    return result


def _analyze_in_process(registry: Path, pixels: np.ndarray, runs: int, warmup: int) -> dict[str, Any]:
    from diffmesh.models.registry import Kind, Registry
    from services.face.analysis import load_face_pack

    reg = Registry.load(registry)
    pack = load_face_pack(reg.get(reg.ids(kinds=(Kind.FACE_ANALYSIS,))[0]))
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        pack.analyze(pixels)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return {**summarize_ms(times), "model": pack.model_id}
