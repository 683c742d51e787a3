"""End to end: the mesh (every stage its own process on loopback) vs diffusers in-process.

Both sides generate the same images: tiny-sdxl, 128x128, 20 steps, Euler, guidance 5.0 with a
negative prompt, one image, seed 1000 + run index. Runs are interleaved (in-process, mesh,
in-process, mesh, ...) so drift hits both, and every run index has its own prompt (the same list on
both sides), so the text_encoder's embedding cache never answers: the mesh does all the work
diffusers does. The in-process side is timed with and without PNG encoding (the mesh returns PNG
bytes, encoded by the vae stage with zlib level 4, so the in-process PNG uses level 4 too).
"""
from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.stats import summarize_ms

MODEL = "tiny-sdxl"
WIDTH = HEIGHT = 128
STEPS = 20
SCHEDULER = "euler"
GUIDANCE = 5.0
NEGATIVE = "blurry, low quality, watermark"
SEED0 = 1000
PNG_LEVEL = 4  # the vae stage's default png_compress_level
RATIO_TARGET = 1.03

_SUBJECTS = ("a cat", "a lighthouse", "a bowl of ramen", "an old bicycle", "a mountain lake", "a red fox",
             "a city street", "a sailing boat", "a cup of coffee", "a desert canyon", "a snowy forest",
             "a vintage car", "a wooden cabin", "a jellyfish", "a sunflower field", "a robot",
             "a stone bridge", "a hot air balloon", "a violin", "a waterfall")
_STYLES = ("photo", "watercolor painting", "pencil sketch", "oil painting", "35mm film still")


def prompts(n: int) -> list[str]:
    """n distinct prompts, one per run index (warm-up included)."""
    return [f"a {_STYLES[i % len(_STYLES)]} of {_SUBJECTS[i % len(_SUBJECTS)]}, variation {i}" for i in range(n)]


def _timing_fields() -> tuple[str, ...]:
    """The numeric StageTiming fields this checkout's protos have (the message grows over time)."""
    from diffmesh.proto.v1 import common_pb2
    known = common_pb2.StageTiming.DESCRIPTOR.fields_by_name
    return tuple(name for name in ("wall_ms", "compute_ms", "queue_ms", "bytes_sent", "bytes_received")
                 if name in known)


_TIMING_FIELDS = _timing_fields()


def _registry(models_root: Path) -> Path:
    registry = models_root / "registry.yaml"
    if not registry.exists():
        from diffmesh.models.tiny import build_tiny_models
        print(f"building the tiny model set in {models_root}/ ...", flush=True)
        build_tiny_models(models_root)
    return registry.resolve()


def _model_dir(registry: Path) -> Path:
    import yaml
    entry = yaml.safe_load(registry.read_text())["models"][MODEL]
    path = Path(entry["path"])
    return path if path.is_absolute() else registry.parent / path


def _load_pipeline(model_dir: Path) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _PhaseTimer:
    """Wraps a few of the pipeline's own calls (prompt encoding, VAE decode, post-processing) to
    time them exactly; one perf_counter pair per call, negligible next to the work."""

    def __init__(self, pipe: Any) -> None:
        self.ms: dict[str, float] = {}
        pipe.encode_prompt = self._wrap("encode_prompt", pipe.encode_prompt)
        pipe.vae.decode = self._wrap("vae_decode", pipe.vae.decode)
        pipe.image_processor.postprocess = self._wrap("postprocess", pipe.image_processor.postprocess)

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0
        return timed


def _in_process(pipe: Any, timer: _PhaseTimer, prompt: str,
                seed: int) -> tuple[float, float, np.ndarray, dict[str, float]]:
    """(pipeline ms, pipeline + PNG ms, pixels, phases ms)."""
    timer.ms = {}
    start = time.perf_counter()
    image = pipe(prompt, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE, num_images_per_prompt=1,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images[0]
    done = time.perf_counter()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_LEVEL)
    png = buffer.getvalue()
    end = time.perf_counter()
    assert png
    pipeline_ms = (done - start) * 1000.0
    phases = dict(timer.ms)
    phases["png"] = (end - done) * 1000.0
    phases["steps_and_setup (the rest of the call)"] = pipeline_ms - sum(timer.ms.values())
    return pipeline_ms, (end - start) * 1000.0, np.asarray(image), phases


def _mesh_once(client: Any, prompt: str, seed: int) -> tuple[float, Any]:
    from diffmesh.client import build_request
    request = build_request(prompt, negative_prompt=NEGATIVE, model=MODEL, width=WIDTH, height=HEIGHT,
                            steps=STEPS, scheduler=SCHEDULER, guidance_scale=GUIDANCE, seed=seed, count=1,
                            output_format="png")
    start = time.perf_counter()
    response = client.generate(request, timeout=300)
    return (time.perf_counter() - start) * 1000.0, response


def _stream_step_times(client: Any, texts: list[str]) -> list[float]:
    """Diagnostics only (not in the ratio): per-step times of the mesh's denoiser, from the
    progress events of GenerateStream (differences of the orchestrator's elapsed_ms)."""
    from diffmesh.client import build_request
    steps: list[float] = []
    for i, prompt in enumerate(texts):
        request = build_request(prompt, negative_prompt=NEGATIVE, model=MODEL, width=WIDTH, height=HEIGHT,
                                steps=STEPS, scheduler=SCHEDULER, guidance_scale=GUIDANCE, seed=SEED0 + 500 + i,
                                count=1, output_format="png")
        elapsed = [e.progress.elapsed_ms for e in client.generate_stream(request, timeout=300)
                   if e.HasField("progress")]
        steps += list(np.diff(elapsed))
    return steps


def _health_floor(mesh: Any, stages: tuple[str, ...], iters: int = 50) -> dict[str, float]:
    """Diagnostics: a grpc.health Check round trip to each stage (a tiny unary call the stage's
    runtime answers without its servicer, interceptors' work or compute): the floor under
    `outside_compute` of a stage call, from this process over a fresh channel."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from diffmesh.runtime.channels import channel_options
    channels = {s: grpc.insecure_channel(mesh.address(s), options=channel_options(256)) for s in stages}
    stubs = {s: health_pb2_grpc.HealthStub(c) for s, c in channels.items()}
    samples: dict[str, list[float]] = {s: [] for s in stages}
    try:
        for i in range(iters + 5):
            for stage, stub in stubs.items():
                start = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                if i >= 5:
                    samples[stage].append((time.perf_counter() - start) * 1000.0)
    finally:
        for channel in channels.values():
            channel.close()
    return {stage: statistics.median(v) for stage, v in samples.items()}


def run_e2e(models_root: Path, runs: int = 10, warmup: int = 3, stream_runs: int = 3,
            mesh_env: dict[str, str] | None = None, stage_args: dict[str, list[str]] | None = None,
            deadline: float | None = None,
            min_runs: int = 10, hard_deadline: float | None = None) -> dict[str, Any]:
    """deadline (time.monotonic()): past it, stop adding measured runs once min_runs are in, and
    stop outright (the result is then marked incomplete) once hard_deadline has passed too."""
    from diffmesh.client import MeshClient
    from diffmesh.imaging import decode_image
    from diffmesh.mesh import LocalMesh, free_port
    from diffmesh.stages import STAGES

    default_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    registry = _registry(models_root)
    workdir = Path(tempfile.mkdtemp(prefix="diffmesh-bench-"))
    mesh = LocalMesh(registry=registry, workdir=workdir, ports={stage: free_port() for stage in STAGES.names()},
                     env=dict(mesh_env or {}), extra_args=dict(stage_args or {}))
    t0 = time.perf_counter()
    mesh.start()
    try:
        pipe = _load_pipeline(_model_dir(registry))  # loads while the stages start
        timer = _PhaseTimer(pipe)
        mesh.wait_ready()
        startup_s = time.perf_counter() - t0
        print(f"  mesh SERVING after {startup_s:.1f}s (logs: {mesh.log_dir}/)", flush=True)

        texts = prompts(warmup + runs)
        inproc_pipe, inproc_png, mesh_ms, client_overhead = [], [], [], []
        safety_ms: list[float] = []  # per run: the safety stage's calls (diffusers' SDXL pipeline has no checker)
        stage_fields: dict[str, dict[str, list[float]]] = {}
        orchestrator_total: list[float] = []
        orchestrator_outside: list[float] = []
        inproc_phases: dict[str, list[float]] = {}
        max_diff = 0
        with MeshClient(mesh.address("orchestrator")) as client:
            for i, prompt in enumerate(texts):
                now = time.monotonic()
                if (deadline is not None and i >= warmup + min_runs and now > deadline) or \
                        (hard_deadline is not None and i > warmup and now > hard_deadline):
                    print(f"  time budget reached: stopping after {i - warmup} measured runs", flush=True)
                    break
                seed = SEED0 + i
                p_ms, png_ms, pixels, phases = _in_process(pipe, timer, prompt, seed)
                m_ms, response = _mesh_once(client, prompt, seed)
                mesh_pixels = decode_image(response.images[0].image.data, "image")
                max_diff = max(max_diff, int(np.abs(mesh_pixels.astype(np.int16) - pixels.astype(np.int16)).max()))
                tag = "warm-up" if i < warmup else "run"
                print(f"  {tag} {i:2d}: in-process {png_ms:7.1f} ms (pipeline {p_ms:7.1f}), mesh {m_ms:7.1f} ms",
                      flush=True)
                if i < warmup:
                    continue
                for phase, ms in phases.items():
                    inproc_phases.setdefault(phase, []).append(ms)
                inproc_pipe.append(p_ms)
                inproc_png.append(png_ms)
                mesh_ms.append(m_ms)
                info = response.info
                orchestrator_total.append(info.total_ms)
                orchestrator_outside.append(info.total_ms - sum(t.wall_ms for t in info.timings))
                client_overhead.append(m_ms - info.total_ms)
                safety_ms.append(sum(t.wall_ms for t in info.timings if t.stage.split(".")[0] == "safety"))
                for t in info.timings:
                    fields = stage_fields.setdefault(t.stage, {})
                    for name in _TIMING_FIELDS:
                        fields.setdefault(name, []).append(float(getattr(t, name)))
            health_floor = _health_floor(mesh, tuple(STAGES.names()))
            stream_steps = [] if deadline is not None and time.monotonic() > deadline else \
                _stream_step_times(client, prompts(warmup + runs + stream_runs)[warmup + runs:])
    except BaseException:
        print(f"  mesh logs: {mesh.log_dir}/", flush=True)
        raise
    finally:
        codes = mesh.stop()

    with_png = summarize_ms(inproc_png)
    without_png = summarize_ms(inproc_pipe)
    mesh_stats = summarize_ms(mesh_ms)
    ratio = mesh_stats["p50_ms"] / with_png["p50_ms"]
    stages = {}
    for stage, fields in stage_fields.items():
        stages[stage] = {f"{name}_p50": statistics.median(values) for name, values in fields.items()}
        outside = [w - c - q for w, c, q in zip(fields["wall_ms"], fields["compute_ms"],
                                                  fields.get("queue_ms", [0.0] * len(fields["wall_ms"])))]
        stages[stage]["outside_compute_ms_p50"] = statistics.median(outside)
    stage_sum = sum(s["wall_ms_p50"] for s in stages.values())
    orch_p50 = statistics.median(orchestrator_total)
    return {
        "config": {"model": MODEL, "width": WIDTH, "height": HEIGHT, "steps": STEPS, "scheduler": SCHEDULER,
                   "guidance_scale": GUIDANCE, "negative_prompt": NEGATIVE, "count": 1,
                   "seeds": f"{SEED0} + run index (same on both sides)", "png_compress_level": PNG_LEVEL},
        "method": ("interleaved in-process, mesh, in-process, mesh, ...; unary Orchestrator.Generate via "
                   "MeshClient; in-process: StableDiffusionXLPipeline.from_pretrained(local_files_only=True) "
                   "with EulerDiscreteScheduler.from_config, output_type='pil', then PIL PNG encode"),
        "prompts": ("a distinct prompt per run index (warm-up included), the same list on both sides, so the "
                    "text_encoder's embedding cache never hits and the mesh does every step diffusers does"),
        "warmup": warmup,
        "runs": len(mesh_ms),
        "complete": len(mesh_ms) >= min(min_runs, runs),
        "samples_ms": {"in_process_with_png": inproc_png, "in_process_without_png": inproc_pipe, "mesh": mesh_ms},
        "torch_threads": {"in_process": torch.get_num_threads(),
                          "mesh_services": f"torch default (a fresh process here gets {default_threads})"},
        "mesh_startup_s": startup_s,
        "mesh_env": dict(mesh_env or {}),
        "mesh_stage_args": dict(stage_args or {}),
        "in_process_with_png": with_png,
        "in_process_without_png": without_png,
        "mesh": mesh_stats,
        "ratio_p50": ratio,
        "ratio_p95": mesh_stats["p95_ms"] / with_png["p95_ms"],
        "ratio_p50_vs_without_png": mesh_stats["p50_ms"] / without_png["p50_ms"],
        "overhead_p50_ms": mesh_stats["p50_ms"] - with_png["p50_ms"],
        # What the mesh costs beyond diffusers' own work once the safety calls (prompt check, image
        # check, watermark + C2PA), which the in-process side does not do, are taken out per run.
        "safety_calls_ms_p50": statistics.median(safety_ms) if safety_ms else 0.0,
        "ratio_p50_without_safety_calls": statistics.median(
            [m - sa for m, sa in zip(mesh_ms, safety_ms)]) / with_png["p50_ms"] if safety_ms else ratio,
        "target_ratio_p50_max": RATIO_TARGET,
        "pass": ratio <= RATIO_TARGET,
        "mesh_attribution": {
            "note": ("per stage call as the orchestrator records it (GenerationInfo.timings): wall_ms is the "
                     "call's wall time seen by the orchestrator, compute_ms the stage's own compute, queue_ms its "
                     "admission wait (when reported); outside_compute = wall - compute - queue: the hop, "
                     "(de)serialisation and the servicer around the model call"),
            "stages": stages,
            "sum_of_stage_wall_ms_p50": stage_sum,
            "orchestrator_total_ms_p50": orch_p50,
            "orchestrator_outside_stages_ms_p50": statistics.median(orchestrator_outside),
            "client_to_orchestrator_ms_p50": statistics.median(client_overhead),
            "grpc_health_check_round_trip_ms_p50": health_floor,
        },
        "in_process_phases_ms_p50": {k: statistics.median(v) for k, v in inproc_phases.items()},
        "mesh_denoiser_step_ms_p50_from_stream": statistics.median(stream_steps) if stream_steps else None,
        "stream_diagnostic_runs": stream_runs,
        "max_pixel_difference_mesh_vs_in_process": max_diff,
        "mesh_exit_codes": codes,
        "mesh_logs": str(mesh.log_dir),
    }
