# syntax=docker/dockerfile:1
#
# One image for every diffmesh stage; the stage is the container's argument:
#   docker run ... diffmesh:0.1.0-cpu services.text_encoder      (ENTRYPOINT is `python -m`)
#
# Two variants from one file, chosen by build argument:
#   docker build -t diffmesh:0.1.0-cpu .                           # CPU-only torch (~1 GB)
#   docker build --build-arg VARIANT=cuda -t diffmesh:0.1.0-cuda . # CUDA torch (cu128 wheels)
# The CUDA wheels carry their own CUDA runtime, cuDNN and cuBLAS (nvidia-* packages), so both
# variants share the same Python base image; the host's driver comes from the NVIDIA container
# runtime. The Helm chart runs GPU stages on "-cuda" and CPU stages on "-cpu" tags.
#
# Model weights are never baked in: mount them read-only (the registry file defaults to
# /models/registry.yaml), e.g.
#   docker run --rm -p 50062:50062 -v "$PWD/.models:/models:ro" diffmesh:0.1.0-cpu services.denoiser

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

# cpu or cuda: picks the torch wheel index (an onnxruntime or other accelerated wheel would be
# chosen the same way).
ARG VARIANT=cpu
ARG CUDA_WHEELS=cu128

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, pinned, from the variant's index: an unpinned torch (or a dependency pulling one
# in from PyPI) would bring the wrong build. The project's own torch==2.13.0 pin is then satisfied.
RUN case "$VARIANT" in \
      cpu)  index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index=https://download.pytorch.org/whl/${CUDA_WHEELS} ;; \
      *)    echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 1 ;; \
    esac \
 && pip install --index-url "$index" torch==2.13.0

# The project's pinned dependencies as their own layer (cached until pyproject.toml changes).
# open_clip_torch only supplies CLIP's BPE vocabulary (`diffmesh models build-tiny`): no deps.
COPY pyproject.toml /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps open_clip_torch==3.3.0 \
 && if [ "$VARIANT" = cuda ]; then \
      pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.32.0; \
    fi
# (the cuda image's face stage runs insightface's ONNX packs on onnxruntime-gpu: CUDA provider
# first, CPU fallback; the same onnxruntime version as the CPU image's)

# The project itself (generated gRPC code is committed under diffmesh/proto). The check imports
# every stage's entry module as declared in the stage table (diffmesh/stages.py), so a stage
# added there is checked here without editing this file.
COPY diffmesh /src/diffmesh
COPY services /src/services
RUN pip install --no-deps /src \
 && python -c "from diffmesh.stages import STAGES; [spec.main_module() for spec in STAGES]; print('imports:', ', '.join(spec.module for spec in STAGES))"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="diffmesh" \
      org.opencontainers.image.description="diffmesh gRPC inference mesh: one image, the stage is the argument" \
      io.diffmesh.variant="${VARIANT}"

RUN groupadd --system --gid 10001 diffmesh \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/diffmesh --create-home \
        --shell /usr/sbin/nologin diffmesh

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIFFMESH_HOST=0.0.0.0 \
    DIFFMESH_REGISTRY=/models/registry.yaml \
    HF_HUB_OFFLINE=1 \
    GRPC_VERBOSITY=ERROR \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /home/diffmesh
USER 10001:10001

# Each stage's default gRPC port from diffmesh/stages.py (orchestrator 50051, text_encoder 50061,
# denoiser 50062, vae 50063, face 50064, safety 50065) and the metrics port (metrics 9090);
# tests/deploy checks them against the table. Documentation only: the chart sets each container's ports.
EXPOSE 50051 50061 50062 50063 50064 50065 9090

ENTRYPOINT ["python", "-m"]
CMD ["services.orchestrator"]
