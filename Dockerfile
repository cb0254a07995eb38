# syntax=docker/dockerfile:1.7
# One image for every stage of the pipeline (data preparation, training, evaluation, export, registry)
# and for the Prefect flow runs that drive them.
#
#   docker build -t cityseg-ops:$(git rev-parse --short HEAD) --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
#       [--build-arg BAKE_WEIGHTS=true] .
#
# torch 2.14.1 from PyPI brings its own CUDA 13.0 libraries (nvidia-* wheels); the CUDA base image
# provides the matching user-space runtime and cuDNN for the host's driver (>= 580).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.9.5 AS uv

# ---- build stage: Python 3.11 (python-build-standalone, no compiler needed), locked dependencies ----
FROM ${CUDA_IMAGE} AS builder
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN uv python install 3.11.14 && uv venv --python 3.11.14 /opt/venv
# Dependencies first (from pyproject's runtime list, pinned by the lock) so code changes reuse this layer.
COPY pyproject.toml requirements.lock /tmp/build/
RUN uv pip install --python /opt/venv/bin/python -r /tmp/build/pyproject.toml -c /tmp/build/requirements.lock
# Optionally bake torchvision's pretrained DeepLabv3 weights so GPU nodes need no internet access.
ARG BAKE_WEIGHTS=false
ENV TORCH_HOME=/opt/torch
RUN mkdir -p "$TORCH_HOME" \
    && if [ "$BAKE_WEIGHTS" = "true" ]; then \
        /opt/venv/bin/python -c "import torchvision.models.segmentation as s; \
[w.DEFAULT.get_state_dict(progress=False) for w in (s.DeepLabV3_ResNet50_Weights, \
s.DeepLabV3_ResNet101_Weights, s.DeepLabV3_MobileNet_V3_Large_Weights)]"; \
    fi

# ---- final stage: runtime only, no uv, no build caches, non-root ----
FROM ${CUDA_IMAGE}
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="cityseg-ops" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/cityseg \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/torch \
    MPLCONFIGDIR=/tmp/matplotlib \
    OMP_WAIT_POLICY=PASSIVE \
    GIT_COMMIT=${GIT_COMMIT}
RUN groupadd --system --gid 10001 cityseg \
    && useradd --system --uid 10001 --gid cityseg --create-home --home-dir /home/cityseg cityseg
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/torch /opt/torch
WORKDIR /opt/cityseg
# Code is root-owned (read-only for the runtime user); runs/ and data/ are the writable mount points.
COPY pyproject.toml ./
COPY components ./components
COPY flows ./flows
COPY deploy ./deploy
RUN mkdir -p runs data && chown 10001:10001 runs data
USER 10001:10001
CMD ["python", "-m", "flows.finetune", "--recipe", "demo"]
