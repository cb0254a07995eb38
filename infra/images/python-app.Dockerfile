# Offline stand-in for a public Python application image (the MLflow server, the Prefect server and
# worker): Debian's python3 (3.11 on bookworm) and the given packages in /opt/venv, pip included so that
# images derived from it (infra/mlflow, infra/prefect) can add packages as they do on the public image.
# Built by infra/images/build.sh, which tags it as the public image it replaces.
ARG BASE_IMAGE=debian:12.15-slim

FROM ${BASE_IMAGE} AS builder
# The same first step as the project's builder stage: one shared layer.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ARG PACKAGES
ARG EXTRA_CA_CERT=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ARG PIP_NO_INDEX=""
ARG PIP_TRUSTED_HOST=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/tmp/ca.pem
RUN cat /etc/ssl/certs/ca-certificates.crt > /tmp/ca.pem \
    && printf '%s\n' "$EXTRA_CA_CERT" >> /tmp/ca.pem \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ${PACKAGES:?pass --build-arg PACKAGES}

FROM ${BASE_IMAGE}
# The same first step as the project's runtime stage: one shared layer.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
COPY --from=builder /opt/venv /opt/venv
