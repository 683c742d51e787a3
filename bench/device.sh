#!/usr/bin/env bash
# The GPU device check for step-level batching: the denoiser's batching engine in-process on CUDA
# (fp16), concurrency 1, 4 and 8 with batching on and off, as bench/denoiser_load.py measures it.
# Prepared here, run there with the device tool, from the repository root:
#   here, once:  make models   (the tiny set, a few MB, travels in the carry)
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
#   device run:  command "bash bench/device.sh", carry [".models", ".whl"], timeout_s 300
# The device image has torch, transformers, peft, safetensors and PyYAML; diffusers comes from .whl.
# Writes $OUT/denoiser_load.json (or bench/results/ without $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m bench.denoiser_load --device cuda --dtype float16 --requests 32 --out "$out/denoiser_load.json"
# A larger latent (SDXL's 1024x1024 is 128x128 latents) where the tiny UNet is no longer launch-bound.
python3 -m bench.denoiser_load --device cuda --dtype float16 --requests 32 --size 512 --out "$out/denoiser_load_512.json"
