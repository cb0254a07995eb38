"""Multi-node training on Kubernetes: the manifests of one training job, rendered from the typed config.

    python -m components.multinode --recipe strong --image <registry>/cityseg-ops:<tag> \\
        --job-name finetune-<flow-run> train.output_dir=s3://bucket/runs/<run> > job.yaml

``orchestration.multinode.engine`` picks the engine, each an existing one:

* ``indexed-job`` (default, no operator): a headless Service plus a ``batch/v1`` Indexed Job. Pod ``i`` is
  ``<job>-i.<job>`` in the Service's DNS, so every agent meets pod 0's c10d rendezvous store; one torchrun
  agent per pod starts one rank per GPU, with ``--nnodes MIN:MAX`` and ``--max-restarts``.
* ``trainjob``: a Kubeflow Trainer ``TrainJob`` on the ``torch-distributed`` runtime, which sets torchrun's
  ``PET_*`` variables itself.

Manifests name the credentials Secret, never its values. Nodes share no disk, so a multi-node job must
checkpoint to ``s3://`` (any node, or a replacement pod, resumes from it).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Any

import yaml

from components.cli import run_cli
from components.config import Config, MultiNodeConfig, load_config
from components.errors import ConfigError
from components.storage import is_s3

CONTAINER_RUNS = "/opt/cityseg/runs"
CONTAINER_DATA = "/opt/cityseg/data"
IMAGE_UID = 10001  # the image's non-root user (Dockerfile)
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
SUPPORTED_KUBERNETES = ("1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37")
"""Cluster versions whose API schemas the rendered Service and Job are validated against (CI, offline)."""
CREDENTIAL_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
"""Secret keys passed to the pods as environment variables when present (``optional``)."""
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def training_manifests(
    cfg: Config,
    *,
    image: str,
    job_name: str,
    recipe: str,
    overrides: list[str],
    labels: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The Kubernetes objects of one multi-node training job for ``cfg`` (already loaded from
    ``recipe`` + ``overrides``, which the pods receive again: only the config's source travels)."""
    settings = cfg.orchestration.multinode
    _check(cfg, settings, job_name)
    all_labels = {"app.kubernetes.io/name": "cityseg-ops", "app.kubernetes.io/component": "training"}
    all_labels |= {"cityseg-ops/job": job_name} | (labels or {})
    train_args = ["-m", "components.train", "--recipe", recipe, *overrides]
    if settings.engine == "trainjob":
        return [_train_job(settings, image, job_name, all_labels, ["torchrun", *train_args])]
    command = ["torchrun", *_torchrun_flags(settings, job_name), *train_args]
    return [
        _headless_service(settings, job_name, all_labels),
        _indexed_job(settings, image, job_name, all_labels, command),
    ]


def _check(cfg: Config, settings: MultiNodeConfig, job_name: str) -> None:
    # Pod hostnames are "<job>-<index>": both must be DNS labels of at most 63 characters.
    if not _DNS_LABEL.match(job_name) or len(job_name) + 1 + len(str(settings.nodes - 1)) > 63:
        raise ConfigError(
            f"job name {job_name!r} must be a DNS label (lowercase letters, digits, '-'), short enough that "
            f"'<name>-{settings.nodes - 1}' fits in 63 characters"
        )
    if settings.nodes > 1 and not is_s3(cfg.train.output_dir):
        raise ConfigError(
            f"train.output_dir={cfg.train.output_dir!r}: a multi-node job needs an s3:// output_dir so that "
            "any node can resume from the checkpoints"
        )
    if settings.data_claim is None and cfg.data.source != "s3":
        raise ConfigError(
            "orchestration.multinode.data_claim is None, so the data must come from the S3 mirror: "
            "set data.source=s3 data.uri=s3://bucket/cityscapes (or name a read-many data claim)"
        )


def _torchrun_flags(settings: MultiNodeConfig, job_name: str) -> list[str]:
    nnodes = f"{settings.min_nodes or settings.nodes}:{settings.nodes}"
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={settings.gpus_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={job_name}-0.{job_name}:{settings.rdzv_port}",
        f"--rdzv-id={job_name}",
        f"--max-restarts={settings.max_restarts}",
    ]


def _headless_service(settings: MultiNodeConfig, job_name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": job_name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            # Agents must resolve pod 0 before it is Ready: the rendezvous happens before any probe passes.
            "publishNotReadyAddresses": True,
            "selector": {"cityseg-ops/job": job_name},
            "ports": [{"name": "rendezvous", "port": settings.rdzv_port, "targetPort": settings.rdzv_port}],
        },
    }


def _indexed_job(
    settings: MultiNodeConfig, image: str, job_name: str, labels: dict[str, str], command: list[str]
) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": settings.nodes,
            "parallelism": settings.nodes,
            # torchrun's elastic agents restart the ranks; a lost pod is replaced by the Job controller,
            # and its new agent rejoins the rendezvous, up to max_restarts times.
            "backoffLimit": settings.max_restarts * settings.nodes,
            "activeDeadlineSeconds": settings.active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "subdomain": job_name,
                    "restartPolicy": "Never",
                    "serviceAccountName": settings.service_account,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": IMAGE_UID,
                        "runAsGroup": IMAGE_UID,
                        "fsGroup": IMAGE_UID,
                    },
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [_container(settings, image, command)],
                    "volumes": _volumes(settings),
                },
            },
        },
    }


def _container(settings: MultiNodeConfig, image: str, command: list[str]) -> dict[str, Any]:
    resources = {
        "cpu": settings.cpu,
        "memory": settings.memory,
        "nvidia.com/gpu": str(settings.gpus_per_node),
    }
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "runs", "mountPath": CONTAINER_RUNS}]
    if settings.data_claim:
        mounts.append({"name": "data", "mountPath": CONTAINER_DATA, "readOnly": True})
    return {
        "name": "trainer",
        "image": image,
        "command": command,
        "workingDir": "/opt/cityseg",
        "env": _env(settings),
        "ports": [{"name": "rendezvous", "containerPort": settings.rdzv_port}],
        "resources": {"requests": resources, "limits": resources},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }


def _env(settings: MultiNodeConfig) -> list[dict[str, Any]]:
    return [
        {
            "name": key,
            "valueFrom": {
                "secretKeyRef": {"name": settings.credentials_secret, "key": key, "optional": True}
            },
        }
        for key in CREDENTIAL_KEYS
    ]


def _volumes(settings: MultiNodeConfig) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        # run_dir (relative "runs") is pod-local scratch: checkpoints go to s3://, results to MLflow.
        {"name": "runs", "emptyDir": {}},
    ]
    if settings.data_claim:
        volumes.append(
            {"name": "data", "persistentVolumeClaim": {"claimName": settings.data_claim, "readOnly": True}}
        )
    return volumes


def _train_job(
    settings: MultiNodeConfig, image: str, job_name: str, labels: dict[str, str], command: list[str]
) -> dict[str, Any]:
    return {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": {"name": job_name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": "torch-distributed"},
            "trainer": {
                "image": image,
                "command": command,
                "numNodes": settings.nodes,
                "resourcesPerNode": {"limits": {"nvidia.com/gpu": str(settings.gpus_per_node)}},
                "env": _env(settings),
            },
        },
    }


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(manifests, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.multinode",
        description="Print the Kubernetes manifests of a multi-node training job (kubectl apply -f -).",
    )
    parser.add_argument("--recipe", default="strong", help="recipe name or YAML path")
    parser.add_argument("--image", required=True, help="the project image, e.g. <registry>/cityseg-ops:<sha>")
    parser.add_argument("--job-name", required=True, help="DNS label naming the job, its Service and pods")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. orchestration.multinode.nodes=4")
    args = parser.parse_args(argv)

    def render() -> None:
        cfg = load_config(args.recipe, args.overrides)
        manifests = training_manifests(
            cfg, image=args.image, job_name=args.job_name, recipe=args.recipe, overrides=args.overrides
        )
        sys.stdout.write(
            f"# rendered by: python -m components.multinode {shlex.join(argv or sys.argv[1:])}\n"
        )
        sys.stdout.write(to_yaml(manifests))

    return run_cli(render)


if __name__ == "__main__":
    raise SystemExit(main())
