"""Multi-node training on Kubernetes: the manifests of one training job, rendered from the typed config.

    python -m components.multinode --recipe strong --image <registry>/cityseg-ops:<tag> \\
        --job-name finetune-<flow-run> train.output_dir=s3://bucket/runs/<run> > job.yaml
    python -m components.multinode --rbac > rbac.yaml   # the Role the flow's pod needs to run such jobs

``orchestration.multinode.engine`` picks the engine, each an existing one:

* ``indexed-job`` (default, no operator): a headless Service plus a ``batch/v1`` Indexed Job. Pod ``i`` is
  ``<job>-i.<job>`` in the Service's DNS, so every agent meets pod 0's c10d rendezvous store; one torchrun
  agent per pod starts one rank per GPU, with ``--nnodes MIN:MAX`` and ``--max-restarts``.
* ``trainjob``: a Kubeflow Trainer ``TrainJob`` on the ``torch-distributed`` runtime, which sets torchrun's
  ``PET_*`` variables itself; its pods mirror the dataset from S3 (``data_claim`` must be null).

Manifests name the credentials Secret, never its values; plain settings (the MLflow and S3 endpoints)
come as ``env`` values. Nodes share no disk, so a multi-node job must checkpoint to ``s3://`` (any node, or
a replacement pod, resumes from it). ``components/k8sjob.py`` submits and follows the job from the flow.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import shlex
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from components.cli import run_cli
from components.config import Config, MultiNodeConfig, load_config
from components.errors import ConfigError
from components.storage import is_s3

CONTAINER_WORKDIR = "/opt/cityseg"  # the image's WORKDIR: relative config paths start here
CONTAINER_RUNS = "/opt/cityseg/runs"
CONTAINER_DATA = "/opt/cityseg/data"
MIRROR_SCRIPT = (
    "import sys; from components.config import load_config; "
    "from components.data.prepare import prepare_dataset; "
    "prepare_dataset(load_config(sys.argv[2], sys.argv[3:]).data)"
)
"""What each pod of a job without a data claim runs first (the Indexed Job's init container, the TrainJob's
trainer before torchrun): mirror data.uri into the pod's data.root."""
IMAGE_UID = 10001  # the image's non-root user (Dockerfile)
TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRAINJOB_API = f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}"
LAUNCHER_ROLE = "cityseg-training-launcher"
"""Role (``--rbac``) that lets the flow's pod submit, follow and delete training jobs in its namespace."""
SUPPORTED_KUBERNETES = ("1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37")
"""Cluster versions whose API schemas the rendered Service and Job are validated against (CI, offline)."""
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""torchrun agents' environment. torch 2.14's agents share one TCP store with their ranks by default, and
that store breaks re-rendezvous: when a replacement node joins, the surviving rank-0 agent does not
publish the new round's MASTER_ADDR, and both agents wait until they time out (tests/test_elastic.py)."""
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
    env: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The Kubernetes objects of one multi-node training job for ``cfg`` (already loaded from
    ``recipe`` + ``overrides``, which the pods receive again: only the config's source travels).
    ``env``: plain, non-secret environment values for the pods (endpoints); credentials come from the
    Secret only."""
    settings = cfg.orchestration.multinode
    _check(cfg, settings, job_name)
    all_labels = {"app.kubernetes.io/name": "cityseg-ops", "app.kubernetes.io/component": "training"}
    all_labels |= {"cityseg-ops/job": job_name} | (labels or {})
    train_args = ["-m", "components.train", "--recipe", recipe, *overrides]
    plain_env = [{"name": name, "value": value} for name, value in {**AGENT_ENV, **(env or {})}.items()]
    mirror_command = ["python", "-c", MIRROR_SCRIPT, "--recipe", recipe, *overrides]
    if settings.engine == "trainjob":
        # The TrainJob API offers no init container or volume that holds across Trainer releases (its pod
        # overrides were renamed and reshaped): the trainer container mirrors the data, then runs torchrun.
        mirror_then_train = f"{shlex.join(mirror_command)} && exec {shlex.join(['torchrun', *train_args])}"
        command = ["sh", "-c", mirror_then_train]
        return [_train_job(settings, image, job_name, all_labels, command, plain_env)]
    endpoint = f"{job_name}-0.{job_name}:{settings.rdzv_port}"
    command = ["torchrun", *torchrun_flags(settings, endpoint, rdzv_id=job_name), *train_args]
    job = _indexed_job(settings, image, job_name, all_labels, command, plain_env)
    if settings.data_claim is None:  # each pod mirrors the dataset from S3 before training starts
        mirror = _container(settings, image, mirror_command, plain_env, gpus=False)
        del mirror["ports"]
        job["spec"]["template"]["spec"]["initContainers"] = [{**mirror, "name": "data"}]
    return [_headless_service(settings, job_name, all_labels), job]


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
    if settings.engine == "trainjob" and settings.data_claim is not None:
        raise ConfigError(
            f"orchestration.multinode.data_claim={settings.data_claim!r}: the trainjob engine mounts no "
            "claim (its pods mirror the data from S3): set orchestration.multinode.data_claim=null "
            "data.source=s3 data.uri=s3://bucket/cityscapes, or use engine=indexed-job"
        )
    if settings.data_claim is None and cfg.data.source != "s3":
        raise ConfigError(
            "orchestration.multinode.data_claim is None, so the data must come from the S3 mirror: "
            "set data.source=s3 data.uri=s3://bucket/cityscapes (or name a read-many data claim)"
        )
    root = posixpath.normpath(posixpath.join(CONTAINER_WORKDIR, cfg.data.root))
    if not root.startswith(f"{CONTAINER_DATA}/"):
        raise ConfigError(
            f"data.root={cfg.data.root!r} is {root} in the pods, outside {CONTAINER_DATA} where the data "
            "claim (or the S3 mirror) is: use a data.root under it, e.g. data/cityscapes"
        )


def torchrun_flags(settings: MultiNodeConfig, endpoint: str, rdzv_id: str) -> list[str]:
    """One node's torchrun agent: elastic between min_nodes and nodes, c10d rendezvous at ``endpoint``
    (pod 0 in a cluster; 127.0.0.1 in tests/test_elastic.py, which runs these flags)."""
    nnodes = f"{settings.min_nodes or settings.nodes}:{settings.nodes}"
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={settings.gpus_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
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
    settings: MultiNodeConfig,
    image: str,
    job_name: str,
    labels: dict[str, str],
    command: list[str],
    plain_env: list[dict[str, Any]],
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
                    # Training never calls the Kubernetes API: no token in the pods (the account may hold
                    # the launcher Role for the flow's own pod).
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": IMAGE_UID,
                        "runAsGroup": IMAGE_UID,
                        "fsGroup": IMAGE_UID,
                    },
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [_container(settings, image, command, plain_env)],
                    "volumes": _volumes(settings),
                },
            },
        },
    }


def _container(
    settings: MultiNodeConfig,
    image: str,
    command: list[str],
    plain_env: list[dict[str, Any]],
    gpus: bool = True,
) -> dict[str, Any]:
    resources = {"cpu": settings.cpu, "memory": settings.memory}
    if gpus:
        resources["nvidia.com/gpu"] = str(settings.gpus_per_node)
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "runs", "mountPath": CONTAINER_RUNS}]
    # A shared claim is read-only; the pod's own mirror is writable (the decode cache lives beside it).
    mounts.append({"name": "data", "mountPath": CONTAINER_DATA, "readOnly": bool(settings.data_claim)})
    return {
        "name": "trainer",
        "image": image,
        "command": command,
        "workingDir": CONTAINER_WORKDIR,
        "env": [*plain_env, *_env(settings)],
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
    else:
        volumes.append({"name": "data", "emptyDir": {}})
    return volumes


def _train_job(
    settings: MultiNodeConfig,
    image: str,
    job_name: str,
    labels: dict[str, str],
    command: list[str],
    plain_env: list[dict[str, Any]],
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
                "env": [*plain_env, *_env(settings)],
            },
        },
    }


def rbac_manifests(cfg: Config) -> list[dict[str, Any]]:
    """Role + RoleBinding for the flow's pod (``service_account``, the work pool's default too): exactly
    the calls ``components/k8sjob.py`` makes in ``namespace``. The training pods mount no token."""
    settings = cfg.orchestration.multinode
    labels = {"app.kubernetes.io/name": "cityseg-ops", "app.kubernetes.io/component": "training-launcher"}
    crud = ["create", "get", "delete"]
    if settings.engine == "trainjob":
        job_rules = [{"apiGroups": [TRAINJOB_GROUP], "resources": [TRAINJOB_PLURAL], "verbs": crud}]
    else:
        job_rules = [
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": crud},
            {"apiGroups": [""], "resources": ["services"], "verbs": crud},
        ]
    pod_rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ]
    metadata = {"name": LAUNCHER_ROLE, "namespace": settings.namespace, "labels": labels}
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata,
            "rules": [*job_rules, *pod_rules],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LAUNCHER_ROLE},
            "subjects": [
                {"kind": "ServiceAccount", "name": settings.service_account, "namespace": settings.namespace}
            ],
        },
    ]


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # objects shared between manifests (labels, resources) are written out, not as &id001


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    return yaml.dump_all(manifests, Dumper=_PlainDumper, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.multinode",
        description="Print the Kubernetes manifests of a multi-node training job (kubectl apply -f -).",
    )
    parser.add_argument("--recipe", default="strong", help="recipe name or YAML path")
    parser.add_argument(
        "--image",
        help="the project image, e.g. <registry>/cityseg-ops:<sha> (default: orchestration.multinode.image)",
    )
    parser.add_argument("--job-name", help="DNS label naming the job, its Service and pods")
    parser.add_argument(
        "--rbac", action="store_true", help="print the Role + RoleBinding the flow's pod needs instead"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. orchestration.multinode.nodes=4")
    args = parser.parse_args(argv)
    if not args.rbac and not args.job_name:
        parser.error("--job-name is required (or --rbac)")

    def render() -> None:
        cfg = load_config(args.recipe, args.overrides)
        if args.rbac:
            manifests = rbac_manifests(cfg)
        else:
            image = args.image or cfg.orchestration.multinode.image
            if not image:
                raise ConfigError("pass --image or set orchestration.multinode.image")
            manifests = training_manifests(
                cfg, image=image, job_name=args.job_name, recipe=args.recipe, overrides=args.overrides
            )
        sys.stdout.write(
            f"# rendered by: python -m components.multinode {shlex.join(argv or sys.argv[1:])}\n"
        )
        sys.stdout.write(to_yaml(manifests))

    return run_cli(render)


if __name__ == "__main__":
    raise SystemExit(main())
