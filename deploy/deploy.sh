#!/usr/bin/env bash
# Create the work pools of one deployment variant and deploy it from deploy/prefect.yaml.
#
#   deploy/deploy.sh local                                   # process pool "local" on this machine
#   CITYSEG_IMAGE=registry/cityseg-ops:TAG deploy/deploy.sh docker      # pools gpu-docker, cpu-docker
#   CITYSEG_IMAGE=registry/cityseg-ops:TAG deploy/deploy.sh kubernetes  # pools gpu-k8s, cpu-k8s
#
# Needs PREFECT_API_URL pointing at the server (infra/docker-compose.yml publishes http://127.0.0.1:4200/api).
# The docker and kubernetes pool types need `prefect-docker` / `prefect-kubernetes` installed where this
# runs and in the worker. Start a worker per pool afterwards, e.g.
#   prefect worker start --pool local --type process
# Then it creates the alert automation of deploy/automations.yaml (deploy/alerts.py, run by $PYTHON,
# default python3, which needs prefect): CITYSEG_ALERT_WEBHOOK_URL=<Slack or any webhook URL> saves the
# notification block cityseg-alerts; without it an existing block of that name is used, or alerts stay
# off (a message says so).
# Run from anywhere: it works from the repository root (entrypoints are relative to it).
set -euo pipefail

variant="${1:?usage: deploy/deploy.sh local|docker|kubernetes}"
cd "$(dirname "$0")/.."
prefect_cli="${PREFECT_CLI:-prefect}"

create_pool() {  # name type [base-job-template]
    if "$prefect_cli" work-pool inspect "$1" >/dev/null 2>&1; then
        echo "work pool $1 exists"
    elif [[ $# -eq 3 ]]; then
        "$prefect_cli" work-pool create "$1" --type "$2" --base-job-template "$3"
    else
        "$prefect_cli" work-pool create "$1" --type "$2"
    fi
}

case "$variant" in
    local)
        create_pool local process
        deployment=cityscapes-local
        ;;
    docker)
        : "${CITYSEG_IMAGE:?set CITYSEG_IMAGE to the image built from the Dockerfile}"
        create_pool gpu-docker docker
        create_pool cpu-docker docker
        deployment=cityscapes
        ;;
    kubernetes)
        : "${CITYSEG_IMAGE:?set CITYSEG_IMAGE to the image built from the Dockerfile}"
        create_pool gpu-k8s kubernetes deploy/kubernetes-job-template.json
        create_pool cpu-k8s kubernetes deploy/kubernetes-job-template.json
        deployment=cityscapes-k8s
        ;;
    *)
        echo "unknown variant $variant: choose local, docker or kubernetes" >&2
        exit 2
        ;;
esac

# The name selects this variant's finetune flow, its data-preparation stage, its sweep and batch inference.
"$prefect_cli" --no-prompt deploy --prefect-file deploy/prefect.yaml --name "$deployment"
# Alerts on failed or crashed finetune, sweep and predict runs (idempotent: updated in place by name).
"${PYTHON:-python3}" deploy/alerts.py
