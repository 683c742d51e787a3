"""The denoiser's step-level batching in-process, without the rest of the mesh: N requests'
sampling loops (each its own thread, as the servicer runs them) on one UNetDenoiser, at
concurrency 1, 4 and 8, batching on and off, rounds interleaved. This is the device check: on
a GPU machine it needs only torch, diffusers and this repo (no gRPC stack, no safety models).

    python -m bench.denoiser_load --device cuda --dtype float16 --out $OUT/denoiser_load.json
    bash bench/device.sh          # the same, as the device tool runs it

Images/s = requests / wall time of a round; latency is each request's own loop time.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.stats import summarize_ms

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 8)


def _job(denoiser: Any, index: int, steps: int, size: int, guidance: float) -> Any:
    from diffmesh.models.latent_space import seeded_generators
    from diffmesh.models.schedulers import SCHEDULERS
    from services.denoiser.sampler import Conditioning, DenoiseJob

    gen = torch.Generator().manual_seed(index)
    dim, dtype, device = denoiser.cross_attention_dim, denoiser.dtype, denoiser.device

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    cond = Conditioning(draw(1, 77, dim), draw(1, 77, dim))
    if denoiser.is_sdxl:
        cond.pooled_prompt_embeds = draw(1, denoiser.pooled_dim)
        cond.negative_pooled_prompt_embeds = draw(1, denoiser.pooled_dim)
    return DenoiseJob(scheduler=SCHEDULERS["euler"], steps=steps, guidance_scale=guidance, width=size, height=size,
                      conditioning=cond, generators=seeded_generators([index]))


def _round(denoiser: Any, concurrency: int, requests: int, first: int, steps: int, size: int,
           guidance: float) -> dict[str, Any]:
    latencies: list[float] = []

    def one(index: int) -> None:
        job = _job(denoiser, first + index, steps, size, guidance)
        start = time.perf_counter()
        denoiser.denoise([job])
        if denoiser.device.type == "cuda":
            torch.cuda.synchronize(denoiser.device)
        latencies.append((time.perf_counter() - start) * 1000.0)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "images_per_s": requests / wall, "latency": summarize_ms(latencies)}


def run_denoiser_load(registry: Path, model: str = "tiny-sdxl", device: str = "cpu", dtype: str = "float32",
                      requests: int = 16, steps: int = 10, size: int = 128, guidance: float = 5.0,
                      lone_runs: int = 20) -> dict[str, Any]:
    from diffmesh.models.registry import Registry
    from diffmesh.runtime.batching import BatchPolicy
    from services.denoiser.sampler import UNetDenoiser

    entry = Registry.load(registry).get(model)
    torch_device, torch_dtype = torch.device(device), getattr(torch, dtype)
    denoisers = {"on": UNetDenoiser(entry, torch_device, torch_dtype, BatchPolicy(enabled=True)),
                 "off": UNetDenoiser(entry, torch_device, torch_dtype, BatchPolicy(enabled=False))}
    results: dict[str, dict[str, Any]] = {mode: {"rounds": {}} for mode in denoisers}
    for denoiser in denoisers.values():
        _round(denoiser, max(CONCURRENCY), max(CONCURRENCY), 10_000, steps, size, guidance)  # warm-up
    first = 0
    for concurrency in CONCURRENCY:
        for mode, denoiser in denoisers.items():
            results[mode]["rounds"][str(concurrency)] = _round(denoiser, concurrency, requests, first, steps, size,
                                                               guidance)
        first += requests
    lone: dict[str, list[float]] = {"on": [], "off": []}
    for index in range(lone_runs):
        for mode in (("on", "off") if index % 2 == 0 else ("off", "on")):
            lone[mode].append(_round(denoisers[mode], 1, 1, first + index, steps, size, guidance)["latency"]["p50_ms"])
    for mode in denoisers:
        results[mode]["lone"] = summarize_ms(lone[mode])
    speedup = {mode: {c: r["images_per_s"] / results[mode]["rounds"]["1"]["images_per_s"]
                      for c, r in results[mode]["rounds"].items()} for mode in results}
    return {
        "workload": {"model": model, "device": device, "dtype": dtype, "size": size, "steps": steps,
                     "guidance_scale": guidance, "requests_per_round": requests,
                     "gpu": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else None},
        "batching_on": results["on"], "batching_off": results["off"], "speedup_vs_concurrency_1": speedup,
        "c8_on_vs_off": results["on"]["rounds"]["8"]["images_per_s"] / results["off"]["rounds"]["8"]["images_per_s"],
        "lone_p50_on_vs_off": results["on"]["lone"]["p50_ms"] / results["off"]["lone"]["p50_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.denoiser_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, default=ROOT / ".models" / "registry.yaml")
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float16 on CUDA, float32 on the CPU unless given")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "denoiser_load.json")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    result = run_denoiser_load(args.registry, args.model, args.device, dtype, args.requests, args.steps, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for concurrency in map(str, CONCURRENCY):
        on, off = result["batching_on"]["rounds"][concurrency], result["batching_off"]["rounds"][concurrency]
        print(f"concurrency {concurrency}: on {on['images_per_s']:.2f} img/s (p50 {on['latency']['p50_ms']:.0f} ms), "
              f"off {off['images_per_s']:.2f} img/s (p50 {off['latency']['p50_ms']:.0f} ms)")
    print(f"c8/c1 on {result['speedup_vs_concurrency_1']['on']['8']:.2f}x, c8 on/off {result['c8_on_vs_off']:.2f}x, "
          f"lone p50 on/off {result['lone_p50_on_vs_off']:.3f}x; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
