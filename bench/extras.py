"""Ratios measured in one run, each on the same sequence of requests:
- tracing on vs off: two meshes, one sampling every trace (always_on, exporting over OTLP to a
  local receiver) and one sampling none (always_off), requests interleaved between them;
- live previews on vs off: GenerateStream with a preview every step vs none, interleaved;
- the denoiser loop's per-step overhead: the denoiser stage's Denoise call (embeddings prepared
  by the text_encoder) vs diffusers' own loop in-process on the same embeddings, per step.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.e2e import GUIDANCE, HEIGHT, MODEL, NEGATIVE, SCHEDULER, STEPS, WIDTH, _load_pipeline, _model_dir, \
    _registry, prompts
from bench.stats import summarize_ms

TRACING_TARGET = 1.01


def _request(prompt: str, seed: int, **extra: Any) -> Any:
    from diffmesh.client import build_request

    return build_request(prompt, negative_prompt=NEGATIVE, model=MODEL, width=WIDTH, height=HEIGHT, steps=STEPS,
                         scheduler=SCHEDULER, guidance_scale=GUIDANCE, seed=seed, **extra)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def _ratio(a: dict, b: dict) -> float:
    return a["p50_ms"] / b["p50_ms"]


def run_extras(models_root: Path, runs: int = 20, warmup: int = 3) -> dict[str, Any]:
    from diffmesh.client import MeshClient
    from diffmesh.devtools.otlp_receiver import Receiver
    from diffmesh.mesh import LocalMesh

    registry = _registry(models_root)
    receiver = Receiver()
    traced = LocalMesh(registry=registry, workdir=Path(tempfile.mkdtemp(prefix="diffmesh-bench-on-")), ports={},
                       env={**receiver.exporter_env(), "OTEL_TRACES_SAMPLER": "always_on"})
    untraced = LocalMesh(registry=registry, workdir=Path(tempfile.mkdtemp(prefix="diffmesh-bench-off-")), ports={},
                         env={"OTEL_TRACES_SAMPLER": "always_off"})
    for mesh in (traced, untraced):
        mesh.start()
    try:
        pipe = _load_pipeline(_model_dir(registry))
        for mesh in (traced, untraced):
            mesh.wait_ready()
        texts = prompts(warmup + runs)
        on, off, previews_on, previews_off = [], [], [], []
        with MeshClient(traced.address("orchestrator")) as client_on, \
                MeshClient(untraced.address("orchestrator")) as client_off:
            for i, text in enumerate(texts):
                request = _request(text, 2000 + i)
                a = _timed(lambda: client_on.generate(request, timeout=120))
                b = _timed(lambda: client_off.generate(request, timeout=120))
                c = _timed(lambda: list(client_off.generate_stream(_request(text, 2000 + i, preview_every=1),
                                                                   timeout=120)))
                d = _timed(lambda: list(client_off.generate_stream(request, timeout=120)))
                if i >= warmup:
                    on.append(a), off.append(b), previews_on.append(c), previews_off.append(d)
        spans = len(receiver.collector.spans())
        steps = _step_overhead(untraced, pipe, texts[:warmup + runs // 2], warmup)
    finally:
        for mesh in (traced, untraced):
            mesh.stop()
        receiver.stop()
    tracing = {"on": summarize_ms(on), "off": summarize_ms(off)}
    tracing["ratio_p50"] = _ratio(tracing["on"], tracing["off"])
    tracing["spans_exported"] = spans
    tracing["target"] = TRACING_TARGET
    previews = {"on": summarize_ms(previews_on), "off": summarize_ms(previews_off)}
    previews["ratio_p50"] = _ratio(previews["on"], previews["off"])
    previews["per_preview_ms"] = (previews["on"]["p50_ms"] - previews["off"]["p50_ms"]) / STEPS
    return {"method": __doc__, "tracing": tracing, "previews": previews, "denoiser_steps": steps,
            "config": {"model": MODEL, "size": f"{WIDTH}x{HEIGHT}", "steps": STEPS, "scheduler": SCHEDULER}}


def _step_overhead(mesh: Any, pipe: Any, texts: list[str], warmup: int) -> dict[str, Any]:
    """Per step: the denoiser stage (one Denoise call, quiet) vs diffusers' loop on the same embeddings."""
    import grpc

    from diffmesh.proto.v1 import denoiser_pb2, denoiser_pb2_grpc, text_encoder_pb2, text_encoder_pb2_grpc

    with grpc.insecure_channel(mesh.address("text_encoder")) as te, grpc.insecure_channel(mesh.address("denoiser")) as dn:
        encoder, denoiser = text_encoder_pb2_grpc.TextEncoderStub(te), denoiser_pb2_grpc.DenoiserStub(dn)
        stage, local = [], []
        for i, text in enumerate(texts):
            emb = encoder.Encode(text_encoder_pb2.EncodeTextRequest(model_id=MODEL, prompt=text, with_negative=True,
                                                                    negative_prompt=NEGATIVE), timeout=60)
            request = denoiser_pb2.DenoiseRequest(
                model_id=MODEL, scheduler=SCHEDULER, steps=STEPS, guidance_scale=GUIDANCE, width=WIDTH, height=HEIGHT,
                seeds=[3000 + i], quiet=True, prompt_embeds=emb.prompt_embeds,
                negative_prompt_embeds=emb.negative_prompt_embeds, pooled_prompt_embeds=emb.pooled_prompt_embeds,
                negative_pooled_prompt_embeds=emb.negative_pooled_prompt_embeds)
            a = _timed(lambda: list(denoiser.Denoise(request, timeout=60)))
            tensors = {name: torch.frombuffer(bytearray(getattr(emb, name).data), dtype=torch.float32)
                       .reshape(tuple(getattr(emb, name).shape)) for name in
                       ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                        "negative_pooled_prompt_embeds")}
            b = _timed(lambda: pipe(**tensors, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS,
                                    guidance_scale=GUIDANCE, generator=[torch.Generator().manual_seed(3000 + i)],
                                    output_type="latent"))
            if i >= warmup:
                stage.append(a / STEPS), local.append(b / STEPS)
    result = {"denoiser_stage_per_step": summarize_ms(stage), "diffusers_per_step": summarize_ms(local)}
    result["ratio_p50"] = _ratio(result["denoiser_stage_per_step"], result["diffusers_per_step"])
    result["overhead_per_step_ms"] = result["denoiser_stage_per_step"]["p50_ms"] - result["diffusers_per_step"]["p50_ms"]
    return result
