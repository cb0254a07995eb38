# One image for every stage of the pipeline (data preparation, training, evaluation, export, registry)
# and for the Prefect flow runs that drive them. Builds with the classic builder and with BuildKit; every
# byte comes from the base image, the Debian archive (apt) and the package index (pip).
#
#   docker build -t cityseg-ops:latest --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
#
# Build arguments (all optional):
#   BASE_IMAGE       the Debian base; its python3 (3.11 on bookworm) runs everything
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, PIP_TRUSTED_HOST   a PyPI mirror
#   EXTRA_CA_CERT    PEM text of an extra CA (TLS-intercepting proxy); used by apt and pip in the
#                    build stage only, never copied into the final image
#   BAKE_WEIGHTS     true: bake torchvision's pretrained DeepLabv3 weights (GPU nodes without internet)
#
# torch 2.14.1 from PyPI brings its own CUDA 13.0 user-space libraries (nvidia-* wheels): the host only
# needs the NVIDIA driver (>= 580) and the container toolkit, no CUDA base image.
ARG BASE_IMAGE=debian:12.15-slim

# ---- build stage: a virtual environment with the locked dependencies ----
FROM ${BASE_IMAGE} AS builder
# Debian packages follow the pinned base release (security updates included), so no
# per-package version pins: those break with every point release. The same first step in every
# Python builder stage (infra/images too), so the builds share this layer.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ARG EXTRA_CA_CERT=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ARG PIP_NO_INDEX=""
ARG PIP_TRUSTED_HOST=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/tmp/build/ca.pem
RUN mkdir -p /tmp/build \
    && cat /etc/ssl/certs/ca-certificates.crt > /tmp/build/ca.pem \
    && printf '%s\n' "$EXTRA_CA_CERT" >> /tmp/build/ca.pem \
    && python3 -m venv /opt/venv
# Dependencies first (pyproject's runtime list, pinned by the lock) so code changes reuse this layer.
COPY pyproject.toml requirements.lock /tmp/build/
RUN /opt/venv/bin/python -c "import tomllib; \
print('\\n'.join(tomllib.load(open('/tmp/build/pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /tmp/build/runtime.txt
RUN /opt/venv/bin/pip install -r /tmp/build/runtime.txt -c /tmp/build/requirements.lock \
    && /opt/venv/bin/pip uninstall -y pip
# Optionally bake torchvision's pretrained DeepLabv3 weights so GPU nodes need no internet access.
ARG BAKE_WEIGHTS=false
ENV TORCH_HOME=/opt/torch
RUN mkdir -p "$TORCH_HOME" \
    && if [ "$BAKE_WEIGHTS" = "true" ]; then \
        SSL_CERT_FILE=/tmp/build/ca.pem /opt/venv/bin/python -c "import torchvision.models.segmentation as s; \
[w.DEFAULT.get_state_dict(progress=False) for w in (s.DeepLabV3_ResNet50_Weights, \
s.DeepLabV3_ResNet101_Weights, s.DeepLabV3_MobileNet_V3_Large_Weights)]"; \
    fi

# ---- final stage: Python runtime and the venv; no compiler, pip, caches, tests or extra CA ----
FROM ${BASE_IMAGE}
# The same first step as every Python runtime stage (infra/images too): one shared layer.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/cityseg \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/torch \
    MPLCONFIGDIR=/tmp/matplotlib \
    OMP_WAIT_POLICY=PASSIVE
RUN groupadd --system --gid 10001 cityseg \
    && useradd --system --uid 10001 --gid cityseg --create-home --home-dir /home/cityseg cityseg
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/torch /opt/torch
WORKDIR /opt/cityseg
# Code is root-owned (read-only for the runtime user); runs/ and data/ are the writable mount points.
COPY pyproject.toml ./
COPY components ./components
COPY flows ./flows
COPY deploy ./deploy
RUN mkdir -p runs data && chown 10001:10001 runs data
# albumentations looks for a newer release online at every import (a warning and a delay offline).
ENV NO_ALBUMENTATIONS_UPDATE=1
# Last, so a new commit rebuilds only these metadata layers.
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="cityseg-ops" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
ENV GIT_COMMIT=${GIT_COMMIT}
USER 10001:10001
CMD ["python", "-m", "flows.finetune", "--recipe", "demo"]
